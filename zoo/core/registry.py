"""Techniques by stable name (ZOMBORG, source 000, section 2.4: a repair state holds only the trained tensors, so
its header must name the spec they fit in a way that outlives the code's layout).

``@register("fisher_svd", version=1)`` files a technique spec class under a name; ``Technique.describe()`` (and
so a repair state's header) records that name and version, and loading resolves the name here, so a spec's file
can move or be renamed without leaving an import shim behind. The version is the layout of the spec's trained
tensors: bump it when a state written before no longer fits, and a state of the other version is refused.

States written before the registry name each spec by its Python class path; ``LEGACY_CLASS_PATHS`` maps every
path such a state can hold to its name. A spec class that is not registered (a test's or an experiment's) is
still named by its class path, resolved by import.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import NamedTuple

from .errors import ZooError


class Registered(NamedTuple):
    name: str
    version: int


#: name -> technique spec class
REGISTRY: dict[str, type] = {}

#: the class paths states written before the registry hold (including those of specs since moved) -> name
LEGACY_CLASS_PATHS = {
    "zoo.fisher_svd.FisherSVD": "fisher_svd",
    "zoo.kfac.KFACSVD": "kfac_svd",
    "zoo.phd.BlockwisePHD": "blockwise_phd",
    "zoo.coupled.CoupledCore": "coupled_core",
    "zoo.tase.TASECoupledCore": "tase_coupled_core",
    "zoo.eigen_attention.EigenAttention": "eigen_attention",
    "zoo.lora.LoRA": "lora",
    "zoo.universal_basis.UniversalBasis": "universal_basis",
    "zoo.universal_basis_lora.UniversalBasis": "universal_basis",
    "zoo.quant.Quantize": "quantize",
    "zoo.transplant.Transplant": "transplant",
}

#: the version a legacy (class-path) header stands for
LEGACY_VERSION = 1

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_MARK = "_zoo_registered"  # set on the registered class itself, so a subclass is not taken for it


def register(name: str, version: int = 1):
    """Class decorator: file a technique spec class under ``name`` (lower_snake_case, unique) and ``version``."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"technique name {name!r} must be lower_snake_case (it is stored in repair states)")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"technique version must be an int >= 1, got {version!r}")

    def decorate(cls: type) -> type:
        held = REGISTRY.get(name)
        if held is not None and _path(held) != _path(cls):
            raise ValueError(f"technique name {name!r} is taken by {_path(held)}; {_path(cls)} needs another")
        setattr(cls, _MARK, Registered(name, version))
        REGISTRY[name] = cls
        return cls

    return decorate


def registered(cls: type) -> Registered | None:
    """(name, version) of a registered spec class; None for one that is not (a subclass of one included)."""
    return vars(cls).get(_MARK)


def technique_class(name: str) -> type:
    """The spec class a header names: a registered name, a legacy class path, or an unregistered spec's path."""
    if name not in REGISTRY:  # ``zoo`` imports its techniques on first use: a lookup by name needs them all
        from .lazy import load_all

        load_all("zoo")
    if name in REGISTRY:
        return REGISTRY[name]
    if name in LEGACY_CLASS_PATHS:
        return REGISTRY[LEGACY_CLASS_PATHS[name]]
    module, _, attr = name.rpartition(".")
    if module:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            pass
    raise ZooError(f"no technique is registered as {name!r}; registered: {', '.join(sorted(REGISTRY))} (a state "
                   "written by another version of zoo, or by a spec defined outside it, which must be imported first)")


def canonical_parts(parts):
    """Described parts (``Technique.describe()`` dicts, new or legacy) as a header check compares them: each
    spec by its registered name and version (a legacy class path read as version ``LEGACY_VERSION``), without
    the options that equal the spec's default (a state written before a spec gained an option, at its
    default, still matches)."""
    return [canonical(p) for p in parts] if isinstance(parts, list) else parts


def canonical(part: dict) -> dict:
    """One described part as ``canonical_parts`` compares it."""
    if not isinstance(part, dict) or "technique" not in part:
        return part
    cls = technique_class(str(part["technique"]))
    mark = registered(cls)
    ident = {"technique": mark.name, "version": part.get("version", LEGACY_VERSION)} if mark \
        else {"technique": _path(cls)}
    try:
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init
                    and f.default is not dataclasses.MISSING}
    except TypeError:  # not a dataclass: every option is compared
        defaults = {}
    args = {k: v for k, v in part.get("init_args", {}).items() if not (k in defaults and defaults[k] == v)}
    return {**part, **ident, "init_args": args}


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
