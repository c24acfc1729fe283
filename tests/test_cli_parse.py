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


def _entry(until_step: int, text: str, fragments: list) -> dict:
    return {"until_step": until_step, "text": text, "fragments": fragments}


def test_json_for_one_prompt(capsys) -> None:
    assert main(["parse", "a (b:1.2) BREAK [c|d] AND e:0.5", "--steps", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert '["BREAK", -1]' in out  # the marker stays the integer -1, as the reference returns it
    (report,) = [json.loads(line) for line in out.splitlines()]
    # Split on AND first (as Engine.encode), then each part's schedule, then each entry's fragments:
    # " BREAK " splits into "", BREAK, ""; "[c|d]" alternates per step; ":0.5" is the second part's weight
    assert report == {
        "prompt": "a (b:1.2) BREAK [c|d] AND e:0.5",
        "text": "a (b:1.2) BREAK [c|d] AND e:0.5",  # no extra-network tags to remove
        "extra_networks": [],
        "parts": [
            {
                "text": "a (b:1.2) BREAK [c|d]",
                "weight": 1.0,
                "schedule": [
                    _entry(1, "a (b:1.2) BREAK c", [["a ", 1.0], ["b", 1.2], ["", 1.0], ["BREAK", -1], ["c", 1.0]]),
                    _entry(2, "a (b:1.2) BREAK d", [["a ", 1.0], ["b", 1.2], ["", 1.0], ["BREAK", -1], ["d", 1.0]]),
                ],
            },
            {"text": " e", "weight": 0.5, "schedule": [_entry(2, " e", [[" e", 1.0]])]},
        ],
    }


def test_json_shows_no_raw_fragment_the_encoder_never_sees(capsys) -> None:
    assert main(["parse", "a (cat:1.2) [dog:fox:0.5] AND castle:0.3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fragment_texts = [text for part in report["parts"] for entry in part["schedule"] for text, _ in entry["fragments"]]
    assert not [text for text in fragment_texts if ":" in text or "AND" in text]  # no raw syntax left
    first, second = report["parts"]
    assert [entry["fragments"] for entry in first["schedule"]] == [
        [["a ", 1.0], ["cat", 1.2], [" dog", 1.0]],
        [["a ", 1.0], ["cat", 1.2], [" fox", 1.0]],
    ]
    assert second == {"text": " castle", "weight": 0.3, "schedule": [_entry(20, " castle", [[" castle", 1.0]])]}


def test_steps_default_to_20(capsys) -> None:
    assert main(["parse", "[x:y:0.5]", "--json"]) == 0
    (report,) = _json_lines(capsys)
    assert [(e["until_step"], e["text"]) for e in report["parts"][0]["schedule"]] == [(10, "x"), (20, "y")]
    assert main(["parse", "a cat"]) == 0
    assert "until step 20: 'a cat'" in capsys.readouterr().out


def _schedule(report: dict, part: int = 0) -> list[list]:
    return [[entry["until_step"], entry["text"]] for entry in report["parts"][part]["schedule"]]


def test_second_order_doubles_the_schedule(capsys) -> None:
    assert main(["parse", "[x:y:0.5]", "--steps", "10", "--second-order", "--json"]) == 0
    (report,) = _json_lines(capsys)
    assert _schedule(report) == [[10, "x"], [20, "y"]]
    assert main(["parse", "[x:y:0.5]", "--steps", "10", "--json"]) == 0
    (report,) = _json_lines(capsys)
    assert _schedule(report) == [[5, "x"], [10, "y"]]


def test_each_and_part_has_its_own_schedule(capsys) -> None:
    # A schedule spanning an AND is not one: each part is scheduled on its own text, as the engine does
    assert main(["parse", "[a AND b:3]", "--steps", "4", "--json"]) == 0
    (report,) = _json_lines(capsys)
    assert [part["text"] for part in report["parts"]] == ["[a", " b:3]"]
    assert _schedule(report, 0) == [[4, "[a"]] and _schedule(report, 1) == [[4, " b:3]"]]


def test_file_gives_one_json_line_per_prompt(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("first [a:b:3]\r\n\n(caf\u00e9:1.5)\nlast|line\n".encode("utf-8"))
    assert main(["parse", "--file", str(prompts), "--steps", "4", "--json"]) == 0
    reports = _json_lines(capsys)
    assert [report["prompt"] for report in reports] == ["first [a:b:3]", "", "(caf\u00e9:1.5)", "last|line"]
    assert _schedule(reports[0]) == [[3, "first a"], [4, "first b"]]
    assert reports[1] == {
        "prompt": "",
        "text": "",
        "extra_networks": [],
        "parts": [{"text": "", "weight": 1.0, "schedule": [_entry(4, "", [["", 1.0]])]}],
    }
    assert reports[2]["parts"][0]["schedule"][0]["fragments"] == [["caf\u00e9", 1.5]]
    assert _schedule(reports[3]) == [[4, "last|line"]]  # "|" outside [..]: the prompt is used as is


def test_table_output(capsys) -> None:
    assert main(["parse", "a [b:c:2] (d) AND e:0.5", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "prompt: 'a [b:c:2] (d) AND e:0.5'" in out
    assert "AND part 1/2: weight 1.0, text 'a [b:c:2] (d)'" in out
    assert "  until step 2: 'a b (d)'\n" in out
    assert "  until step 3: 'a c (d)'\n" in out
    assert "    1.1                   'd'\n" in out
    assert "AND part 2/2: weight 0.5, text ' e'\n  until step 3: ' e'\n" in out
    assert "[b:c:2]" not in out.split("AND part 1/2")[1].split("\n", 1)[1]  # only scheduled texts below


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
        ["parse", "x", "--steps", "many"],
    ],
)
def test_usage_errors_exit_with_status_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err
