"""Packaging contracts: cheap imports, no reference libraries in the engine, lazily resolved public names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "triton", "transformers", "diffusers", "PIL", "ftfy", "fastapi", "uvicorn")


def imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(output.stdout.strip().splitlines()[-1])


def test_import_tiengine_loads_no_heavy_module():
    loaded = imported_after("import tiengine")
    assert not [name for name in HEAVY if name in loaded]


def test_cli_help_loads_no_heavy_module():
    loaded = imported_after("from tiengine.cli import build_parser\nbuild_parser().format_help()")
    assert not [name for name in HEAVY if name in loaded]


def test_tokenizer_needs_no_torch():
    loaded = imported_after("import tiengine\ntiengine.ClipTokenizer.default().encode('a cat')")
    assert "torch" not in loaded


@pytest.mark.parametrize("package", ["tiengine", "kernels", "weights_conv"])
def test_engine_code_never_imports_reference_libraries(package):
    offenders = []
    for path in (REPO / package).rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith(("import transformers", "from transformers", "import diffusers", "from diffusers")):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {stripped}")
    assert not offenders


def test_public_names_resolve():
    import tiengine

    for name in tiengine.__all__:
        assert getattr(tiengine, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        tiengine.Nope  # noqa: B018


def test_subpackages_install_inside_tiengine():
    import tiengine.kernels
    import tiengine.weights_conv

    assert Path(tiengine.kernels.__file__).parent.name == "kernels"
    assert Path(tiengine.weights_conv.__file__).parent.name == "weights_conv"


def test_every_package_folder_is_installed():
    """A non-editable install ships exactly pyproject's `packages`: every folder of the package is listed."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    roots = {package: REPO / folder for package, folder in setuptools["package-dir"].items()}
    folders = set()
    for package, root in roots.items():
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            folders.add(".".join((package, *parts)))
    assert sorted(folders - set(setuptools["packages"])) == []


def test_triton_is_an_extra_not_a_requirement():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [spec for spec in project["dependencies"] if spec.startswith("triton")]
    extras = project["optional-dependencies"]
    assert [spec for spec in extras["cuda"] if spec.startswith("triton")]
    # the kernel interpreter tests: the README's test command (and CI) install [cuda] with [test]
    # (and k-diffusion, the sampler reference, without its declared torchvision)
    command = 'pip install -e ".[test,cuda,serve,ray]" && pip install --no-deps k-diffusion==0.0.16 && python -m pytest'
    assert command in (REPO / "README.md").read_text(encoding="utf-8")
    assert command in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_dispatcher_falls_back_to_sdpa_when_triton_is_missing():
    """With triton not importable, CUDA inputs resolve to SDPA instead of failing (fresh interpreter)."""
    probe = (
        "import sys, types\n"
        "sys.modules['triton'] = None  # import triton raises ImportError\n"
        "from tiengine.models.attention import resolve_backend\n"
        "cuda_like = types.SimpleNamespace(is_cuda=True)\n"
        "print(resolve_backend(cuda_like, cuda_like, cuda_like))\n"
    )
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert output.stdout.strip() == "sdpa"
