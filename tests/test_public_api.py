"""The public API: every name in `elude_export.__all__` is the function or class it says, always.

A submodule with the same name as a public function would replace the attribute once it is
imported (`from elude_export import fit` then gave the module): import every submodule first.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import elude_export


def test_public_names_are_not_modules_even_after_every_submodule_is_imported() -> None:
    for info in pkgutil.walk_packages(elude_export.__path__, prefix="elude_export."):
        if info.name.endswith("triton_python_model"):  # runs inside Triton only (imports its backend utils)
            continue
        importlib.import_module(info.name)
    for name in elude_export.__all__:
        value = getattr(elude_export, name)
        assert not inspect.ismodule(value), f"elude_export.{name} is a module"
        if name != "__version__":
            assert callable(value), f"elude_export.{name} is not callable"
    from elude_export import evaluate, fit

    assert inspect.isfunction(fit) and fit.__name__ == "fit"
    assert inspect.isfunction(evaluate) and evaluate.__name__ == "evaluate"


def test_unknown_public_name_is_an_attribute_error() -> None:
    try:
        elude_export.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
