"""The replacement-layer protocol and the wrapper that holds a replacement beside its original (ZOMBORG,
source 000, section 2.4: the student is the teacher with some maps replaced; only the replacements train).

A technique's ``build`` returns a ``Replacement``: an ``nn.Module`` with the target's call signature that
also says

- which of its tensors train (``requires_grad``) and at what learning-rate scale (``lr_scales``),
- which metrics it updates while ``tracking`` is on (``metrics()``, e.g. shim dominance),
- the dense map it computes, when it is a linear map (``dense_weight``; ``affine`` False when it is not), and
- how ``zoo export`` writes it (``export_spec``/``export_tensors``, in ``zoo.export.spec``'s ops).

Layers of other libraries (PEFT's LoRA) are accepted as they are; the protocol functions below give them
the defaults (no lr scales, no metrics). ``Replaced(original, replacement)`` is what sits in the model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ZooError
from .linalg import FP32Params

if TYPE_CHECKING:  # a hint only: torchmetrics costs seconds to import, and most replacements have no metric
    import torchmetrics


class Replacement(FP32Params):
    """Base class of the zoo's replacement layers (see the module docstring).

    Subclasses set ``lr_scales`` in ``__init__`` (``{parameter name: multiplier of the run's lr}``) when one
    learning rate does not suit all their tensors, and list fp32 tensors in ``fp32_params``.
    """

    #: per-parameter learning-rate multipliers; an instance attribute replaces this empty default
    lr_scales: dict[str, float] = {}
    #: set by the training module during validation epochs: the layer updates its ``metrics()`` then
    tracking: bool = False
    #: False for a layer whose map is not affine in its input (a top-k sparse code): ``zoo export --merge``
    #: cannot fold it, or any replacement holding it, into a dense weight
    affine: bool = True

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        """{metric name: metric this layer updates in its forward while ``tracking``}; default none."""
        return {}

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] matrix this layer computes (fp64), for layers that are linear maps."""
        raise ZooError(f"{type(self).__name__} is not a linear map with a dense equivalent")

    def export_spec(self) -> dict:
        """The forward in ``zoo.export`` ops: ``{"program": [...], "tensors": {name: dtype kind}, ...}``."""
        raise ZooError(f"{type(self).__name__} has no export description")

    def export_tensors(self) -> dict[str, torch.Tensor]:
        raise ZooError(f"{type(self).__name__} has no export description")


def lr_scales_of(module: nn.Module) -> dict[str, float]:
    return dict(module.lr_scales) if isinstance(module, Replacement) else {}


def metrics_of(module: nn.Module) -> dict[str, torchmetrics.Metric]:
    return module.metrics() if isinstance(module, Replacement) else {}


def is_affine(module: nn.Module) -> bool:
    """Whether ``module`` and every layer inside it compute an affine map (``Replacement.affine``); layers of
    other libraries (PEFT's LoRA) are."""
    return all(getattr(m, "affine", True) for m in module.modules())


def set_tracking(module: nn.Module, on: bool) -> None:
    if isinstance(module, Replacement):
        module.tracking = on


class Replaced(nn.Module):
    """A target module with its replacement. Forwards through the replacement unless in teacher view."""

    def __init__(self, original: nn.Module, replacement: nn.Module):
        super().__init__()
        self.original = original
        self.replacement = replacement
        self.original.requires_grad_(False)
        self.use_original = False
        # keep the Linear interface so later pattern matching and shape queries still work
        self.in_features = getattr(original, "in_features", None)
        self.out_features = getattr(original, "out_features", None)

    @property
    def weight(self):  # transformers touches `.weight.dtype/.device` of some projections
        return self.original.weight

    def forward(self, *args, **kwargs):
        return (self.original if self.use_original else self.replacement)(*args, **kwargs)

    def extra_repr(self) -> str:
        return "teacher view" if self.use_original else "student view"
