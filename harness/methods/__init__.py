"""Self-supervised methods and the two baselines, by name.

Each method is one file here: a torch-free declaration ``SPEC = MethodSpec(...)`` at its top (its
knobs and per-method defaults with their citation, whether it trains and uses labels, its cross-knob
rules, its colour; see ``harness.spec.MethodSpec``) and one ``Method`` subclass (``base.py`` has the
interface) with ``spec = SPEC``. Adding a method is that file plus its line in ``METHOD_FILES``.

This package imports no torch itself: ``harness.spec`` reads the declarations from the files'
source. ``METHODS`` (name -> method class) is built on first use, importing the method files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.methods.base import Method

# The method files, in the order tables list the methods (baselines last).
METHOD_FILES: tuple[str, ...] = (
    "simclr",
    "moco",
    "mocov3",
    "byol",
    "simsiam",
    "barlow_twins",
    "vicreg",
    "swav",
    "dino",
    "nnclr",
    "supcon",
    "random_init",
    "supervised",
)

_METHODS: dict[str, type[Method]] = {}


def _load_methods() -> dict[str, type[Method]]:
    import importlib
    import inspect

    from harness.methods.base import Method

    if not _METHODS:
        for module_name in METHOD_FILES:
            module = importlib.import_module(f"harness.methods.{module_name}")
            classes = [
                value
                for value in vars(module).values()
                if inspect.isclass(value) and issubclass(value, Method) and value.__module__ == module.__name__
            ]
            if len(classes) != 1:
                raise TypeError(f"harness/methods/{module_name}.py must define exactly one Method subclass")
            _METHODS[classes[0].spec.name] = classes[0]
    return _METHODS


def __getattr__(name: str) -> Any:
    if name == "METHODS":
        return _load_methods()
    if name == "Method":
        from harness.methods.base import Method

        return Method
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "METHOD_FILES", "Method"]
