"""Packages whose public names are imported on first use (PEP 562).

``import zoo.core.errors`` runs ``zoo/__init__.py`` and ``zoo/core/__init__.py`` first: if those imported
every technique, ``zoo --help`` would load torch, transformers and Lightning before printing a line. A
package lists where each public name lives instead, and the name's module is imported when the name is
first read (``zoo.FisherSVD``, ``from zoo import FisherSVD``, a config's ``class_path: zoo.FisherSVD``).
"""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """``(__all__, __getattr__, __dir__)`` of ``package``, whose names ``exports`` gives by module
    (``{".fisher_svd": ["FisherSVD", ...]}``, relative to the package)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # later reads skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return list(where), __getattr__, __dir__


def load_all(package: str) -> None:
    """Import every public name of ``package`` now: for what finds classes by subclassing rather than by
    name (jsonargparse's short class names, ``Technique.__subclasses__()``)."""
    module = importlib.import_module(package)
    for name in module.__all__:
        getattr(module, name)
