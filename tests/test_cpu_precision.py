"""A half-precision dtype this CPU has no native kernels for: the engine warns when the model is loaded, the
CLI prints the warning as one line, and the text encoder's oneDNN path steps aside (test_text_encoder.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tiengine.cli import main
from tiengine.engine import Engine
from tiengine.models import cpu_precision
from tiengine.models.cpu_precision import EmulatedPrecisionWarning, emulated_precision_note


@pytest.fixture
def cpu_without_half_kernels(monkeypatch):
    monkeypatch.setattr(cpu_precision, "onednn_bf16_supported", lambda: False)
    monkeypatch.setattr(cpu_precision, "onednn_fp16_supported", lambda: False)


def test_the_note_names_the_dtype_and_what_it_needs(cpu_without_half_kernels, monkeypatch):
    bf16 = emulated_precision_note("cpu", torch.bfloat16)
    fp16 = emulated_precision_note(torch.device("cpu"), torch.float16)
    assert bf16 is not None and "no native bf16 kernels (they need AVX-512 BF16 or AMX)" in bf16
    assert fp16 is not None and "no native fp16 kernels (they need AVX-512 FP16 or AMX-FP16)" in fp16
    assert "use fp32 (--dtype fp32, dtype=torch.float32)" in bf16
    assert emulated_precision_note("cpu", torch.float32) is None
    assert emulated_precision_note("cuda", torch.bfloat16) is None  # the note is about CPU kernels only
    monkeypatch.setattr(cpu_precision, "onednn_bf16_supported", lambda: True)
    assert emulated_precision_note("cpu", torch.bfloat16) is None and emulated_precision_note("cpu", torch.float16)


def test_this_cpu_answers_from_onednn():
    """Whatever this CPU is, the answer is oneDNN's own."""
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert (emulated_precision_note("cpu", torch.bfloat16) is None) == native


def test_engine_load_warns_once_per_load(cpu_without_half_kernels, sd1_folder):
    with pytest.warns(EmulatedPrecisionWarning, match="no native bf16 kernels") as caught:
        Engine.load(sd1_folder, embeddings=False, dtype=torch.bfloat16)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmulatedPrecisionWarning)
        Engine.load(sd1_folder, embeddings=False, dtype=torch.float32)


def test_cli_prints_the_warning_as_one_line(cpu_without_half_kernels, sd1_folder, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert main(["encode", "a cat", "--model", str(sd1_folder), "--out", str(out), "--dtype", "bf16", "--json"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert lines == ["tiengine encode: warning: this CPU has no native bf16 kernels (they need AVX-512 BF16 or AMX): "
                     "bf16 runs emulated, up to about 100 times slower than fp32 (convolutions, matmuls); use fp32 "
                     "(--dtype fp32, dtype=torch.float32)"]
    assert out.is_file()
