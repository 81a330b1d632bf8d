"""Packages whose public names load on first use (PEP 562).

``dermcir.index``, ``dermcir.models``, ``dermcir.training`` and ``dermcir.baselines`` hold torch-free modules (an
index's folders and manifest, the encoder registry, the training profiles, the baselines' configs) beside modules
that import torch, which takes seconds.
Importing their names lazily lets the command line read the torch-free parts alone and refuse a mistyped folder or
setting before torch loads.
:func:`registered` does the same for the name registries (encoders, baselines): a built-in entry's module is
imported when the entry is first built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def lazy_exports(
    package: str, namespace: dict[str, Any], modules: dict[str, tuple[str, ...]],
) -> tuple[dict[str, str], Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` whose public names are defined in ``modules`` (module name →
    the names it defines). Returns ``(name → module, __getattr__, __dir__)``.

    ``namespace`` is the package's ``globals()``: a name, once loaded, is stored there, so it is found directly from
    then on (and a test's ``monkeypatch.setattr`` on the package works as on any module).
    """
    defined_in = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = defined_in.get(name)
        if module is None:  # AttributeError, so that ``from package import submodule`` still finds a submodule
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *defined_in})

    return defined_in, __getattr__, __dir__


def registered(name: str, registry: dict[str, T], builtin: dict[str, str]) -> T | None:
    """``registry[name]`` (``None`` when unknown), importing the module that registers a built-in name on its first
    use: ``builtin`` maps each built-in name to that module, so its names are known without importing it (torch)."""
    if name not in registry and name in builtin:
        importlib.import_module(builtin[name])  # registers it
    return registry.get(name)
