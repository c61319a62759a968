"""The layering of docs/architecture.md, checked on the source: which package may import which.

Imports are read with `ast` (module level and inside functions alike), so a lazy import
that runs back up the stages is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BASE = {"elude_export.errors", "elude_export.vocabulary", "elude_export.artifacts"}
ROOT_PACKAGE = {"elude_export", "elude_export.__version__"}  # the package itself, not what lies under it
# package -> the packages (prefixes) it may import besides itself and BASE; the pipeline order
ALLOWED: dict[str, set[str]] = {
    "elude_export.data": set(),
    "elude_export.models": {"elude_export.data"},
    "elude_export.layers": set(),
    "elude_export.plan": {"elude_export.models.spec"},
    "elude_export.compare": set(),
    "elude_export.rewrite": {"elude_export.models", "elude_export.layers", "elude_export.plan",
                             "elude_export.compare", "elude_export.data"},
    "elude_export.fitting": {"elude_export.data", "elude_export.models", "elude_export.layers", "elude_export.plan",
                             "elude_export.rewrite"},
    "elude_export.export": {"elude_export.data", "elude_export.models", "elude_export.layers", "elude_export.plan",
                            "elude_export.rewrite", "elude_export.compare"},
    "elude_export.evidence": {"elude_export.data", "elude_export.models", "elude_export.layers",
                              "elude_export.plan", "elude_export.rewrite", "elude_export.fitting",
                              "elude_export.export"},
    "elude_export.cli": {"elude_export.data", "elude_export.models", "elude_export.layers", "elude_export.plan",
                         "elude_export.fitting", "elude_export.rewrite", "elude_export.export", "elude_export.evidence",
                         "serving.cli"},
    # the server works from the .onnx file alone: the contract and the onnxruntime session helper
    "serving": {"elude_export.export.contract", "elude_export.export.options", "elude_export.export.ort_session"},
}
# modules that must stay torch-free (the server and any consumer of the file alone import them)
TORCH_FREE = ["elude_export/errors.py", "elude_export/vocabulary.py", "elude_export/artifacts.py",
              "elude_export/export/contract.py", "elude_export/export/options.py",
              "elude_export/export/ort_session.py", "elude_export/export/interface.py", "serving"]
HEAVY = {"torch", "timm", "transformers", "elude_export.rewrite", "elude_export.fitting", "elude_export.models"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _owner(module: str) -> str | None:
    matches = [package for package in ALLOWED if module == package or module.startswith(package + ".")]
    return max(matches, key=len) if matches else None


def _sources(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in ((ROOT / root).rglob("*.py") if (ROOT / root).is_dir()
                                                 else [ROOT / root]))


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", _sources("elude_export", "serving"), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layering(path: Path) -> None:
    module = _module_name(path)
    owner = _owner(module)
    if owner is None:
        assert module in BASE | ROOT_PACKAGE, f"{module} is in no layer of docs/architecture.md"
        allowed = BASE
    else:
        allowed = BASE | ALLOWED[owner] | {owner}
    ours = [name for name in _imports(path) if _is_under(name, "elude_export") or _is_under(name, "serving")]
    # `from elude_export.x import y` yields both `elude_export.x` and `elude_export.x.y`: judge the module
    bad = sorted({name for name in ours if name not in ROOT_PACKAGE and not any(
        _is_under(name, prefix) or prefix.startswith(name + ".") for prefix in allowed)})
    assert not bad, f"{module} imports {bad}; allowed: {sorted(allowed)}"


@pytest.mark.parametrize("path", _sources(*TORCH_FREE), ids=lambda p: str(p.relative_to(ROOT)))
def test_torch_free_modules_stay_light(path: Path) -> None:
    heavy = sorted({name for name in _imports(path) if any(_is_under(name, h) for h in HEAVY)})
    assert not heavy, f"{path.relative_to(ROOT)} must not import {heavy}"
