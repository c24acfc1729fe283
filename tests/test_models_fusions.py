"""The fused-op dispatcher (tiengine/models/fusions.py) and its wiring into the UNet and VAE.

- Selection without a GPU: "auto" picks PyTorch for CPU tensors (and never imports triton), a forced
  "triton" on CPU without the interpreter is a clear KernelInputError, unknown names are refused.
- Wiring: every nn.GroupNorm and GEGLU of a tiny UNet / VAE goes through the dispatcher, once per forward,
  with the backend the model was given; in NCHW every GroupNorm input is contiguous, so on CUDA "auto"
  can hand all of them to the kernel.
- The fused path inside the models: one UNet ResnetBlock2D and one Transformer2DModel (GroupNorm,
  attention via SDPA, GEGLU feed-forward) run with fused_backend="triton" in Triton's interpreter (a
  child process: this file run as a script with TRITON_INTERPRET=1, as in test_kernels_fusions.py) and
  compared with the same modules on the PyTorch path.
  fp32 bound: `max |fused - ref64| <= eps32 * max|ref64| + 4 * max |torch32 - ref64|`, the reference's own
  fp32 noise on the same inputs (ref64: the module in fp64 on the PyTorch path) plus one rounding.
  fp16 bound: `max |fused - ref64| <= 2 * max |torch16 - ref64| + eps16 * max|ref64|`: the kernels round
  once where the PyTorch path in fp16 rounds after each op, so they should be no worse than it.
- On a GPU (marked `gpu`): a tiny UNet and a tiny VAE in fp16 with "auto" against "torch", with the
  kernel calls counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tiengine.models import fusions
from tiengine.models.layers import GEGLU, ResnetBlock2D, Transformer2DModel
from tiengine.models.unet import UNet2DConditionModel, UNetConfig
from tiengine.models.vae import AutoencoderKL, VaeConfig

CHILD_TIMEOUT_S = 300
SEED = 1234


def tiny_unet(dtype: torch.dtype = torch.float32, device: str = "cpu", **kwargs) -> UNet2DConditionModel:
    torch.manual_seed(SEED)
    return UNet2DConditionModel(UNetConfig.tiny_sd1(), **kwargs).to(device=device, dtype=dtype).eval()


def tiny_vae(dtype: torch.dtype = torch.float32, device: str = "cpu", **kwargs) -> AutoencoderKL:
    torch.manual_seed(SEED)
    return AutoencoderKL(VaeConfig.tiny(), **kwargs).to(device=device, dtype=dtype).eval()


def unet_inputs(unet: UNet2DConditionModel, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    config = unet.config
    sample = torch.randn(2, config.in_channels, 16, 16, generator=gen).to(device=device, dtype=dtype)
    context = torch.randn(2, 7, config.cross_attention_dim, generator=gen).to(device=device, dtype=dtype)
    return sample, context


class Spy:
    """Wraps the dispatcher's resolve functions: records (module, resolved backend, x contiguous) per call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.group_norm: list[tuple[nn.Module, str, bool]] = []
        self.geglu: list[tuple[nn.Module, str, bool]] = []
        for name, calls in (("resolve_group_norm_backend", self.group_norm), ("resolve_geglu_backend", self.geglu)):
            original = getattr(fusions, name)

            def spy(module, x, backend="auto", _original=original, _calls=calls):
                chosen = _original(module, x, backend)
                _calls.append((module, chosen, x.is_contiguous()))
                return chosen

            monkeypatch.setattr(fusions, name, spy)


def modules_of(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


# ---------------------------------------------------------------- selection, without a GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_auto_picks_torch_for_cpu_tensors(dtype: torch.dtype) -> None:
    norm = nn.GroupNorm(8, 32).to(dtype)
    proj = nn.Linear(32, 2 * 64).to(dtype)
    assert fusions.resolve_group_norm_backend(norm, torch.zeros(2, 32, 4, 4, dtype=dtype)) == "torch"
    assert fusions.resolve_geglu_backend(proj, torch.zeros(2, 5, 32, dtype=dtype)) == "torch"
    assert fusions.resolve_group_norm_backend(norm, torch.zeros(2, 32, 4, 4, dtype=dtype), "triton") == "triton"


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="fused backend must be one of"):
        fusions.group_norm(nn.GroupNorm(8, 32), torch.zeros(1, 32, 2, 2), backend="cuda")
    with pytest.raises(ValueError, match="fused_backend must be one of"):
        UNet2DConditionModel(UNetConfig.tiny_sd1(), fused_backend="fast")
    with pytest.raises(ValueError, match="fused_backend must be one of"):
        AutoencoderKL(VaeConfig.tiny(), fused_backend="fast")


def test_forced_triton_on_cpu_is_a_clear_error() -> None:
    from tiengine.kernels.common import KernelInputError, interpreter_active

    if interpreter_active():
        pytest.skip("TRITON_INTERPRET is set in this process: the kernels would run on CPU")
    with pytest.raises(KernelInputError, match=r"group_norm_silu: x is on cpu; .*TRITON_INTERPRET=1"):
        fusions.group_norm(nn.GroupNorm(8, 32), torch.zeros(1, 32, 2, 2), silu=True, backend="triton")
    with pytest.raises(KernelInputError, match=r"geglu: x is on cpu; .*TRITON_INTERPRET=1"):
        GEGLU(32, 64)(torch.zeros(3, 32), fused_backend="triton")
    unet = tiny_unet(fused_backend="triton")
    sample, context = unet_inputs(unet, torch.float32, "cpu")
    with pytest.raises(KernelInputError, match="TRITON_INTERPRET"), torch.no_grad():
        unet(sample, 1.0, context)


def test_auto_on_cpu_never_imports_triton() -> None:
    """A whole tiny UNet and VAE forward on CPU with every backend "auto" leaves triton unimported."""
    code = (
        "import sys, torch\n"
        "from tiengine.models.unet import UNet2DConditionModel, UNetConfig\n"
        "from tiengine.models.vae import AutoencoderKL, VaeConfig\n"
        "unet = UNet2DConditionModel(UNetConfig.tiny_sd1())\n"
        "with torch.no_grad():\n"
        "    unet(torch.randn(1, 4, 16, 16), 1.0, torch.randn(1, 7, 48))\n"
        "    AutoencoderKL(VaeConfig.tiny()).decode(torch.randn(1, 4, 8, 8))\n"
        "loaded = sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'tiengine.kernels')))\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------- wiring, without a GPU


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_every_unet_group_norm_and_geglu_goes_through_the_dispatcher(
    monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    unet = tiny_unet(fused_backend=backend)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        sample, context = unet_inputs(unet, torch.float32, "cpu")
        unet(sample, 1.0, context)
    group_norms, geglus = modules_of(unet, nn.GroupNorm), modules_of(unet, GEGLU)
    assert group_norms and geglus
    # each module exactly once per forward, all resolved to PyTorch on CPU
    assert sorted(map(id, group_norms)) == sorted(id(m) for m, _, _ in spy.group_norm)
    assert sorted(id(m.proj) for m in geglus) == sorted(id(m) for m, _, _ in spy.geglu)
    assert {chosen for _, chosen, _ in spy.group_norm + spy.geglu} == {"torch"}
    # NCHW activations: every GroupNorm input is contiguous, so supports() can accept it on CUDA
    assert all(contiguous for _, _, contiguous in spy.group_norm + spy.geglu)


def test_forward_override_reaches_every_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """forward(fused_backend=...) overrides the constructor's choice everywhere (it reaches the dispatcher)."""
    unet = tiny_unet(fused_backend="auto")
    seen: list[str] = []
    for name in ("resolve_group_norm_backend", "resolve_geglu_backend"):
        monkeypatch.setattr(fusions, name, lambda module, x, backend="auto": seen.append(backend) or "torch")
    with torch.no_grad():
        sample, context = unet_inputs(unet, torch.float32, "cpu")
        unet(sample, 1.0, context, fused_backend="triton")
    assert seen and set(seen) == {"triton"}


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_vae_group_norm_goes_through_the_dispatcher(monkeypatch: pytest.MonkeyPatch, channels_last: bool) -> None:
    vae = tiny_vae(channels_last=channels_last)
    spy = Spy(monkeypatch)
    with torch.no_grad():
        vae.encode(torch.randn(1, 3, 32, 32))
        vae.decode(torch.randn(1, 4, 8, 8))
    assert sorted(map(id, modules_of(vae, nn.GroupNorm))) == sorted(id(m) for m, _, _ in spy.group_norm)
    contiguous = [c for _, _, c in spy.group_norm]
    if channels_last:  # NHWC activations: the kernel does not take them, "auto" keeps PyTorch on CUDA too
        assert not any(contiguous)
    else:
        assert all(contiguous)


def test_auto_equals_torch_on_cpu() -> None:
    unet = tiny_unet()
    with torch.no_grad():
        sample, context = unet_inputs(unet, torch.float32, "cpu")
        assert torch.equal(unet(sample, 1.0, context), unet(sample, 1.0, context, fused_backend="torch"))
    vae = tiny_vae()
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(vae.decode(latents), vae.decode(latents, fused_backend="torch"))


# ---------------------------------------------------------------- the fused path in Triton's interpreter


def build_blocks(dtype: torch.dtype) -> dict[str, tuple[nn.Module, tuple]]:
    """One UNet ResnetBlock2D (GroupNorm+SiLU twice) and one Transformer2DModel (GroupNorm, GEGLU)."""
    torch.manual_seed(SEED)
    resnet = ResnetBlock2D(32, 48, temb_channels=64, groups=8, eps=1e-5)
    transformer = Transformer2DModel(
        48, heads=2, num_layers=1, context_dim=24, groups=8, use_linear_projection=False, upcast_attention=False
    )
    for module in (resnet, transformer):  # diffusers zero-initialises nothing here; perturb the norms' affine
        for m in module.modules():
            if isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.3)
                nn.init.normal_(m.bias, 0.0, 0.3)
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(2, 32, 8, 6, generator=gen) * 2 + 0.5
    temb = torch.randn(2, 64, generator=gen)
    h = torch.randn(2, 48, 6, 5, generator=gen)
    context = torch.randn(2, 7, 24, generator=gen)
    return {
        "resnet": (resnet.to(dtype).eval(), (x.to(dtype), temb.to(dtype))),
        "transformer": (transformer.to(dtype).eval(), (h.to(dtype), context.to(dtype))),
    }


def run_block(name: str, module: nn.Module, args: tuple, fused_backend: str) -> torch.Tensor:
    with torch.no_grad():
        if name == "resnet":
            return module(*args, fused_backend=fused_backend)
        return module(*args, backend="sdpa", fused_backend=fused_backend)


def run_interpreted(results_path: str) -> int:
    """Child process (TRITON_INTERPRET=1): the blocks with fused_backend="triton", kernel calls counted."""
    from tiengine.kernels import geglu as triton_geglu
    from tiengine.kernels import groupnorm as triton_groupnorm
    from tiengine.kernels.common import interpreter_active

    assert interpreter_active(), "TRITON_INTERPRET must be set before triton is imported"
    calls = {"group_norm_silu": 0, "geglu": 0}
    for module, name in ((triton_groupnorm, "group_norm_silu"), (triton_geglu, "geglu")):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(module, name, counted)
    results: dict = {}
    for dtype in (torch.float32, torch.float16):
        for name, (module, args) in build_blocks(dtype).items():
            start = time.perf_counter()
            before = dict(calls)
            out = run_block(name, module, args, "triton")
            results[f"{name}-{dtype}"] = {
                "out": out,
                "calls": {k: calls[k] - before[k] for k in calls},
                "seconds": time.perf_counter() - start,
            }
    torch.save(results, results_path)
    return 0


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("models_fusions_interpreter")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(folder / "results.pt")],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter child process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    results = torch.load(folder / "results.pt", weights_only=True)
    print(f"interpreter child: {time.perf_counter() - start:.1f} s in all; "
          + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in results.items()))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_fused_path_in_model_blocks_matches_torch(interpreted: dict, name: str, dtype: torch.dtype) -> None:
    result = interpreted[f"{name}-{dtype}"]
    # the kernels really ran: GroupNorm+SiLU twice in the resnet; GroupNorm and GEGLU once in the transformer
    expected_calls = {"group_norm_silu": 2, "geglu": 0} if name == "resnet" else {"group_norm_silu": 1, "geglu": 1}
    assert result["calls"] == expected_calls
    module, args = build_blocks(dtype)[name]
    fused = result["out"]
    torch_path = run_block(name, module, args, "torch")
    module64, args64 = build_blocks(torch.float64)[name]
    ref64 = run_block(name, module64, args64, "torch")
    assert fused.shape == ref64.shape and fused.dtype == dtype and torch.isfinite(fused).all()
    err = (fused.double() - ref64).abs().max().item()
    own = (torch_path.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    if dtype == torch.float32:
        bound = torch.finfo(dtype).eps * scale + 4 * own
    else:
        bound = 2 * own + torch.finfo(dtype).eps * scale
    assert err <= bound, f"{name} {dtype}: fused error {err:.3e} > bound {bound:.3e} (PyTorch path's error {own:.3e})"


# ---------------------------------------------------------------- GPU: the kernels inside the models

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter ran the blocks above)")


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    from tiengine.kernels import geglu as triton_geglu
    from tiengine.kernels import groupnorm as triton_groupnorm
    from tiengine.kernels.common import interpreter_active

    if interpreter_active():
        pytest.skip("TRITON_INTERPRET is set in this process; GPU tests need compiled kernels")
    calls = {"group_norm_silu": 0, "geglu": 0}
    for module, name in ((triton_groupnorm, "group_norm_silu"), (triton_geglu, "geglu")):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def _check_against_fp64(fused: torch.Tensor, torch_path: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    err = (fused.double() - ref64).abs().max().item()
    own = (torch_path.double() - ref64).abs().max().item()
    bound = 2 * own + torch.finfo(fused.dtype).eps * ref64.abs().max().item()
    assert err <= bound, f"{what}: fused error {err:.3e} > bound {bound:.3e} (PyTorch path's error {own:.3e})"


@needs_gpu
@pytest.mark.gpu
def test_gpu_unet_auto_runs_the_kernels(kernel_calls: dict[str, int]) -> None:
    unet = tiny_unet(torch.float16, "cuda")
    sample, context = unet_inputs(unet, torch.float16, "cuda")
    with torch.no_grad():
        fused = unet(sample, 1.0, context)  # attention and fused backends "auto"
        counted = dict(kernel_calls)
        torch_path = unet(sample, 1.0, context, attention_backend="sdpa", fused_backend="torch")
        unet64 = tiny_unet(torch.float64, "cuda")
        ref64 = unet64(sample.double(), 1.0, context.double(), attention_backend="sdpa", fused_backend="torch")
    assert counted == {"group_norm_silu": len(modules_of(unet, nn.GroupNorm)), "geglu": len(modules_of(unet, GEGLU))}
    assert kernel_calls == counted  # the "torch" run called no kernel
    _check_against_fp64(fused, torch_path, ref64, "tiny UNet fp16")


@needs_gpu
@pytest.mark.gpu
def test_gpu_vae_auto_runs_the_kernels(kernel_calls: dict[str, int]) -> None:
    vae = tiny_vae(torch.float16, "cuda", channels_last=False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED)).to("cuda", torch.float16)
    with torch.no_grad():
        fused = vae.decode(latents)
        counted = dict(kernel_calls)
        torch_path = vae.decode(latents, attention_backend="sdpa", fused_backend="torch")
        ref64 = tiny_vae(torch.float64, "cuda", channels_last=False).decode(
            latents.double(), attention_backend="sdpa", fused_backend="torch"
        )
    assert counted["group_norm_silu"] == len(modules_of(vae.decoder, nn.GroupNorm))
    assert kernel_calls == counted
    _check_against_fp64(fused, torch_path, ref64, "tiny VAE decoder fp16")


if __name__ == "__main__":
    sys.exit(run_interpreted(sys.argv[1]))
