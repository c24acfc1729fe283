"""Every command that writes: a path whose parent is a file, a path that is a directory, and a folder that
refuses writes get a named error (WriteError, or the command's own) as one line on stderr and exit 2,
never an OSError traceback; and the writing layer itself names the path and the reason.

Tests run as root in CI, where permission bits do not stop writes, so "read-only" is an os.link /
os.replace that raises PermissionError, as a read-only folder makes them do.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from model_builders import tiny_model_folder
from PIL import Image
from tiengine.weights_conv.cli import main as weights_conv_main

from tiengine.cli import main as tiengine_main
from tiengine.embeddings.embedding import Embedding, save_embedding
from tiengine.io.atomic import FileExistsRefusal, WriteError, atomic_write_bytes, ensure_folder, os_error_line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "model", "sd1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{index}.png")
    save_embedding(Embedding("toy", {"clip_l": torch.randn(2, 48)}), folder / "toy.safetensors")
    return folder


# command name -> (main, argv for an output path, suffix of the output, whether the output is a folder)
def command_line(command, model, inputs, out):
    return {
        "generate": (tiengine_main, ["generate", "a cat", "--model", str(model), "--steps", "1", "--json",
                                     "--out", str(out)]),
        "encode": (tiengine_main, ["encode", "a cat", "--model", str(model), "--steps", "1", "--out", str(out)]),
        "embeddings convert": (tiengine_main, ["embeddings", "convert", str(inputs / "toy.safetensors"), str(out)]),
        "train-embedding": (tiengine_main, ["train-embedding", str(inputs / "images"), "--name", "zorbly",
                                            "--model", str(model), "--steps", "1", "--json", "--out", str(out)]),
        "demo": (tiengine_main, ["demo", "--steps", "1", "--json", "--out", str(out)]),
        "weights-conv convert": (weights_conv_main, ["convert", str(model), str(out)]),
    }[command]


SUFFIX = {"generate": ".png", "encode": ".safetensors", "embeddings convert": ".pt",
          "train-embedding": ".safetensors", "demo": "", "weights-conv convert": ""}
COMMANDS = list(SUFFIX)


def run(command, model, inputs, out, capsys):
    entry, argv = command_line(command, model, inputs, out)
    status = entry(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line and "%|" not in line]
    return status, lines


def assert_one_named_line(status, lines, *needles):
    assert status == 2, lines
    assert not any("Traceback" in line for line in lines)
    message = [line for line in lines if any(needle in line for needle in needles)]
    assert len(message) == 1, (needles, lines)
    return message[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_output_whose_parent_is_a_file(command, model, inputs, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file, not a folder")
    status, lines = run(command, model, inputs, blocker / f"out{SUFFIX[command]}", capsys)
    line = assert_one_named_line(status, lines, "is a file")
    assert str(blocker) in line and "parent" in line
    assert blocker.read_bytes() == b"a file, not a folder"


@pytest.mark.parametrize("command", COMMANDS)
def test_output_that_is_a_directory_or_a_file_where_a_folder_goes(command, model, inputs, tmp_path, capsys):
    out = tmp_path / f"out{SUFFIX[command]}"
    if SUFFIX[command]:  # the command writes a file: a directory of that name is refused, and kept
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        status, lines = run(command, model, inputs, out, capsys)
        line = assert_one_named_line(status, lines, "is a directory")
        assert str(out) in line and (out / "keep.txt").read_text() == "mine"
    else:  # the command writes a folder: a file of that name is refused, and kept
        out.write_bytes(b"mine")
        status, lines = run(command, model, inputs, out, capsys)
        line = assert_one_named_line(status, lines, "not a folder")
        assert str(out) in line and out.read_bytes() == b"mine"


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_folder(command, model, inputs, tmp_path, capsys, monkeypatch):
    target = tmp_path / "readonly"

    def refuse(original):
        def call(source, destination, *args, **kwargs):
            if str(destination).startswith(str(target)):
                raise PermissionError(errno.EACCES, "Permission denied", str(destination))
            return original(source, destination, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "link", refuse(os.link))
    monkeypatch.setattr(os, "replace", refuse(os.replace))
    status, lines = run(command, model, inputs, target / f"out{SUFFIX[command]}", capsys)
    line = assert_one_named_line(status, lines, "permission denied")
    assert str(target) in line and "cannot write" in line


# ---------------------------------------------------------------------------------- the writing layer


def test_atomic_write_names_the_path_and_reason(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(WriteError, match=r"deeper.bin: cannot write \(parent .*file is a file\)"):
        atomic_write_bytes(blocker / "deeper" / "deeper.bin", b"data")
    with pytest.raises(WriteError, match=r"cannot create the folder \(it is a file, not a folder\)"):
        ensure_folder(blocker)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(WriteError, match=r"folder: cannot write \(is a directory\)"):
        atomic_write_bytes(folder, b"data", overwrite=True)
    (folder / "there.bin").write_bytes(b"old")
    with pytest.raises(FileExistsRefusal, match="already exists"):
        atomic_write_bytes(folder / "there.bin", b"new")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(WriteError, match=r"there.bin: cannot write \(no space left on device\)"):
        atomic_write_bytes(folder / "there.bin", b"new", overwrite=True)
    assert (folder / "there.bin").read_bytes() == b"old"
    assert sorted(p.name for p in folder.iterdir()) == ["there.bin"]  # no temporary file left behind


def test_last_resort_line_for_a_stray_os_error(tmp_path, capsys, monkeypatch):
    error = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x.png"))
    assert os_error_line(error) == f"{tmp_path / 'x.png'}: permission denied"

    def stray(args):
        raise error

    import tiengine.cli.parse as parse_command

    monkeypatch.setattr(parse_command, "run_parse", stray, raising=False)
    from tiengine.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["parse", "a cat"])
    monkeypatch.setattr("tiengine.cli.build_parser", lambda: _Fixed(parser, args, stray))
    assert tiengine_main(["parse", "a cat"]) == 2
    assert capsys.readouterr().err.strip() == f"tiengine parse: {tmp_path / 'x.png'}: permission denied"


class _Fixed:
    """A parser whose parse_args returns `args` with `func` replaced."""

    def __init__(self, parser, args, func):
        self.parser, self.args = parser, args
        self.args.func = func

    def parse_args(self, argv):
        return self.args

    def print_help(self):
        self.parser.print_help()
