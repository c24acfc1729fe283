"""`tiengine parse`: JSON and table output, files of prompts, and its errors (through tiengine.cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiengine.cli import main

S = 1 / 1.1


def _json_lines(capsys) -> list[dict]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


def test_json_for_one_prompt(capsys) -> None:
    assert main(["parse", "a (b:1.2) BREAK [c|d] AND e:0.5", "--steps", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert '["BREAK", -1]' in out  # the marker stays the integer -1, as the reference returns it
    (report,) = [json.loads(line) for line in out.splitlines()]
    assert report == {
        "prompt": "a (b:1.2) BREAK [c|d] AND e:0.5",
        # " BREAK " splits into "", BREAK, ""; only "c|d" is inside the square brackets; ":0.5" has no ")"
        "fragments": [["a ", 1.0], ["b", 1.2], ["", 1.0], ["BREAK", -1], ["", 1.0], ["c|d", S], [" AND e:0.5", 1.0]],
        "schedules": [[1, "a (b:1.2) BREAK c AND e:0.5"], [2, "a (b:1.2) BREAK d AND e:0.5"]],
        "and_parts": [["a (b:1.2) BREAK [c|d]", 1.0], [" e", 0.5]],
    }


def test_second_order_doubles_the_schedule(capsys) -> None:
    assert main(["parse", "[x:y:0.5]", "--steps", "10", "--second-order", "--json"]) == 0
    (report,) = _json_lines(capsys)
    assert report["schedules"] == [[10, "x"], [20, "y"]]
    assert main(["parse", "[x:y:0.5]", "--steps", "10", "--json"]) == 0
    (report,) = _json_lines(capsys)
    assert report["schedules"] == [[5, "x"], [10, "y"]]


def test_file_gives_one_json_line_per_prompt(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("first [a:b:3]\r\n\n(caf\u00e9:1.5)\nlast|line\n".encode("utf-8"))
    assert main(["parse", "--file", str(prompts), "--steps", "4", "--json"]) == 0
    reports = _json_lines(capsys)
    assert [report["prompt"] for report in reports] == ["first [a:b:3]", "", "(caf\u00e9:1.5)", "last|line"]
    assert reports[0]["schedules"] == [[3, "first a"], [4, "first b"]]
    assert reports[1] == {"prompt": "", "fragments": [["", 1.0]], "schedules": [[4, ""]], "and_parts": [["", 1.0]]}
    assert reports[2]["fragments"] == [["caf\u00e9", 1.5]]
    assert reports[3]["schedules"] == [[4, "last|line"]]  # "|" outside [..]: the prompt is used as is


def test_table_output(capsys) -> None:
    assert main(["parse", "a [b:c:2] (d)", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "prompt: 'a [b:c:2] (d)'" in out
    assert "1.1                   'd'" in out
    assert "         2  'a b (d)'" in out
    assert "         3  'a c (d)'" in out
    assert "1.0                   'a [b:c:2] (d)'" in out  # the single AND part


def test_table_separates_prompts_of_a_file(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n", encoding="utf-8")
    assert main(["parse", "--file", str(prompts), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("prompt: ") == 2 and "\n\nprompt: 'two'" in out


def test_missing_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.txt"
    assert main(["parse", "--file", str(missing), "--steps", "20"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err


def test_folder_and_non_utf8_file_are_clear_errors(tmp_path: Path, capsys) -> None:
    assert main(["parse", "--file", str(tmp_path), "--steps", "20"]) == 2
    assert "is a folder" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9\n".encode("latin-1"))
    assert main(["parse", "--file", str(latin1), "--steps", "20"]) == 2
    err = capsys.readouterr().err
    assert str(latin1) in err and "not UTF-8" in err


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_steps_below_one_are_rejected(steps: str, capsys) -> None:
    assert main(["parse", "x", "--steps", steps]) == 2
    err = capsys.readouterr().err
    assert "--steps must be at least 1" in err and steps in err


def test_prompt_the_reference_cannot_parse_is_an_error_not_a_crash(capsys) -> None:
    assert main(["parse", "(x:1.2.3)", "--steps", "20"]) == 2
    assert "'1.2.3' is not a number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["parse", "--steps", "20"],  # neither TEXT nor --file
        ["parse", "x", "--file", "f.txt", "--steps", "20"],  # both
        ["parse", "x"],  # no --steps
        ["parse", "x", "--steps", "many"],
    ],
)
def test_usage_errors_exit_with_status_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err
