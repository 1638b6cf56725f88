"""Cheap package faces: a package's ``__init__`` names its public objects without importing
the modules that define them (and with them torch, Ray or vLLM) until one is first used.

    # embed/__init__.py
    from store.faces import lazy_face
    __getattr__, __dir__, __all__ = lazy_face(__name__, {"embed.pipeline": ["run_embed"]})

``from embed import run_embed`` then imports embed.pipeline at that moment, once; ``import
embed`` alone imports nothing heavy, so ``facetclip --help`` starts in a fraction of a second.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_face(
    package: str, exports: dict[str, list[str]]
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """(``__getattr__``, ``__dir__``, ``__all__``) for ``package``: each name of
    ``exports[module]`` is fetched from ``module`` on first access (PEP 562)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(importlib.import_module(package), name, value)  # next time: a plain lookup
        return value

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__, list(where)
