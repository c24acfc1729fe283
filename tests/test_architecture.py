"""The package's import graph: stages import only earlier stages, and no module imports itself back.

The stages, in data-flow order (README, "Layout"). A module may import its own stage and any earlier one.
Imports under `if TYPE_CHECKING:` are annotations only and are not edges. Imports inside functions are
edges too (they run), and outside the places where laziness is the point they are not allowed at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Installed package -> checkout folder (pyproject.toml's package-dir).
PACKAGE_ROOTS = {
    "tiengine": REPO_ROOT / "tiengine",
    "tiengine.kernels": REPO_ROOT / "kernels",
    "tiengine.weights_conv": REPO_ROOT / "weights_conv",
}

# Stage of each top-level part of the installed package, in data-flow order.
STAGES = (
    ("tiengine.errors",),
    ("tiengine.io",),
    ("tiengine.embeddings",),
    ("tiengine.text",),
    ("tiengine.kernels",),
    ("tiengine.models",),
    ("tiengine.diffusion",),
    ("tiengine.weights_conv",),
    ("tiengine.networks",),
    ("tiengine.training",),
    ("tiengine.default_model", "tiengine.settings", "tiengine.results", "tiengine.infotext", "tiengine.engine",
     "tiengine.reports", "tiengine.threads"),
    ("tiengine.toyworld",),
    ("tiengine.integrations",),
    ("tiengine.batch",),
    ("tiengine.serve",),
    ("tiengine.cli", "tiengine.__main__"),
)
# Modules whose function-level imports are deliberate: the package's lazy public names, the command lines
# (fast `--help`), and the attention and fused-op dispatchers, which import the Triton kernels only for CUDA
# tensors.
LAZY_BY_DESIGN = (
    "tiengine", "tiengine.weights_conv", "tiengine.weights_conv.cli", "tiengine.models.attention",
    "tiengine.models.fusions",
)


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the installed package (checkout folders as installed)."""
    found = {}
    for package, folder in PACKAGE_ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported tiengine module, line, at module level) for every runtime import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    annotation_only = _type_checking_lines(tree)
    top_level = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in annotation_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: `from .common import x` in tiengine.kernels.attention
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import module` imports pkg.module when that is a module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            # the package root is every module's parent (its __version__, its lazy names): not an edge
            if target.startswith("tiengine.") and target != name:
                edges.append((target, node.lineno, id(node) in top_level))
    return edges


def _stage(module: str) -> int:
    for index, prefixes in enumerate(STAGES):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    return len(STAGES)  # the package root (lazy exports) sits above every stage


MODULES = _modules()
GRAPH = {name: _imports(name, path, set(MODULES)) for name, path in MODULES.items()}


def test_every_module_belongs_to_a_stage():
    unplaced = [name for name in MODULES if _stage(name) == len(STAGES) and name != "tiengine"]
    assert not unplaced, "\n".join(unplaced)


def test_no_import_points_to_a_later_stage():
    backward = [
        f"{name}:{line} imports {target} (stage {_stage(target)} > {_stage(name)})"
        for name, edges in GRAPH.items() if name != "tiengine"
        for target, line, _ in edges if _stage(target) > _stage(name)
    ]
    assert not backward, "\n".join(backward)


def test_import_graph_has_no_cycle():
    adjacency = {name: sorted({target for target, _, _ in edges if target in MODULES}) for name, edges in GRAPH.items()}
    adjacency["tiengine"] = []  # the lazy public names resolve on first use, not at import
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in adjacency.get(node, []):
            # importing a submodule first runs its package's __init__, which is not a cycle by itself
            if node.startswith(target + "."):
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for module in sorted(adjacency):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_internal_imports_sit_at_module_top(name):
    if name in LAZY_BY_DESIGN or name.startswith("tiengine.cli"):
        pytest.skip("laziness is the point here")
    inner = [f"line {line}: {target}" for target, line, at_top in GRAPH[name] if not at_top]
    assert not inner, "\n".join(inner)
