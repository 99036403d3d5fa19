"""How a replacement describes itself for export (issue 15): a program over ``modeling_zoo``'s primitive
ops plus the tensors it reads.

A replacement class implements

- ``export_spec() -> {"program": [...], "tensors": {name: kind}, "ranks": {...}}``: ``kind`` is ``model``
  (stored in the export dtype), ``float32`` (kept fp32, e.g. sigma), ``float16`` (kept fp16, e.g. a grid's
  scales), ``int64`` (indices) or ``uint8`` (packed codes);
  ``module: "attention"`` for a replaced attention block instead of a linear map;
- ``export_tensors() -> {name: tensor}``: the values, with exactly the names the spec lists.

Classes the zoo does not own (PEFT's ``lora.Linear``) register the two functions with ``register``.
``describe`` turns a replacement into the ``zoo`` block entry and its tensors; a module with no
description is refused by name, never exported wrong.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.errors import ZooError

KINDS = ("model", "float32", "float16", "int64", "uint8")

#: "module.QualName" of a class -> (export_spec(module), export_tensors(module)) for foreign classes
_REGISTRY: dict[str, tuple[Callable, Callable]] = {}


def register(qualified_name: str, spec: Callable[[nn.Module], dict], tensors: Callable[[nn.Module], dict]) -> None:
    _REGISTRY[qualified_name] = (spec, tensors)


def _qualified(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def describer(module: nn.Module) -> tuple[Callable, Callable] | None:
    if hasattr(module, "export_spec") and hasattr(module, "export_tensors"):
        return type(module).export_spec, type(module).export_tensors
    return _REGISTRY.get(_qualified(module))


def exportable(module: nn.Module) -> bool:
    return describer(module) is not None


def describe(name: str, module: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(zoo-block entry, tensors) of replacement ``module`` at ``name``; checks they agree."""
    found = describer(module)
    if found is None:
        raise ZooError(f"{name}: {type(module).__name__} has no export description")
    spec_of, tensors_of = found
    spec, tensors = dict(spec_of(module)), tensors_of(module)
    kinds = spec.pop("tensors")
    if set(kinds) != set(tensors):
        raise ZooError(f"{name}: {type(module).__name__}'s export spec names tensors {sorted(kinds)}, "
                       f"its export_tensors gives {sorted(tensors)}")
    for t, kind in kinds.items():
        if kind not in KINDS:
            raise ZooError(f"{name}: tensor {t} has kind {kind!r}; valid: {', '.join(KINDS)}")
    entry = {"kind": type(module).__name__, "module": spec.pop("module", "linear"),
             "in_features": getattr(module, "in_features", None), "out_features": getattr(module, "out_features", None),
             **spec,
             "tensors": {t: {"shape": list(tensors[t].shape), "dtype": kinds[t]} for t in kinds}}
    return entry, {t: v.detach() for t, v in tensors.items()}


# ---- building programs --------------------------------------------------------------------------

def dense(weight: str, bias: str | None = None) -> list[dict]:
    """x @ W^T (+ b): a stored dense map in nn.Linear's layout."""
    return [{"op": "matmul", "t": weight, "transpose": True}] + ([{"op": "add", "t": bias}] if bias else [])


def prefixed(program: list[dict], prefix: str) -> list[dict]:
    """``program`` with every tensor name it reads prefixed (to nest one replacement's program in another's)."""
    out = []
    for op in program:
        op = dict(op)
        if "t" in op:
            op["t"] = prefix + op["t"]
        if "branches" in op:
            op["branches"] = [prefixed(b, prefix) for b in op["branches"]]
        out.append(op)
    return out


def nested(prefix: str, module: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(spec, tensors) of a sub-replacement with its tensor names prefixed."""
    found = describer(module)
    if found is None:
        raise ZooError(f"{type(module).__name__} has no export description")
    spec, tensors = found[0](module), found[1](module)
    return ({**spec, "program": prefixed(spec["program"], prefix),
             "tensors": {prefix + k: v for k, v in spec["tensors"].items()}},
            {prefix + k: v for k, v in tensors.items()})


def linear_spec(module: nn.Linear) -> dict:
    """A plain ``nn.Linear`` (e.g. the frozen base beside an adapter)."""
    bias = module.bias is not None
    return {"program": dense("weight", "bias" if bias else None),
            "tensors": {"weight": "model", **({"bias": "model"} if bias else {})}}


def linear_tensors(module: nn.Linear) -> dict[str, torch.Tensor]:
    return {"weight": module.weight, **({"bias": module.bias} if module.bias is not None else {})}


register("torch.nn.modules.linear.Linear", linear_spec, linear_tensors)
