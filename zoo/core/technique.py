"""The technique spec: what every technique plugs into (DESIGN.md, "The techniques").

A ``Technique`` is a small plain object: its target patterns, its hyper-parameters (its ``__init__``
arguments, stored under the same names), which calibration statistics it needs, and how to build a
replacement for one target from the original module and that target's statistics. The
LightningModule side (``DistillationModule``) is the same for every technique; mixing techniques is
a list of specs (``zoo.Composite``).
"""
from __future__ import annotations

import inspect

from torch import nn

from .calibration import ActivationStats
from .targets import find_targets

#: statistics a technique may ask calibration for; "taps": the streams of ``Technique.tap``
NEEDS = ("input", "fisher", "taps")


class Technique:
    """Base class of technique specs. Subclasses store every ``__init__`` argument as an attribute.

    ``target_kind`` is what the spec's patterns match (``zoo.core.targets.TARGET_KINDS``).
    """

    target_kind = "linear"

    def __init__(self, targets: str | list[str]):
        self.targets = [targets] if isinstance(targets, str) else list(targets)

    def needs(self) -> set[str]:
        """The calibration statistics ``build`` uses: a subset of ``NEEDS`` (may depend on options)."""
        return set()

    def resolve(self, model: nn.Module) -> list[str]:
        """Module names this spec replaces in ``model``."""
        return find_targets(model, self.targets, self.target_kind)

    #: a calibration tap run on each target when ``needs()`` has "taps": ``tap(module, args, kwargs,
    #: output) -> {stream: tensor}`` (see ``zoo.core.calibration``); its statistics reach ``plan`` as
    #: ``stats["<target>:<stream>"]``. ``tap_version`` names it in the calibration cache key.
    tap = None
    tap_version = ""

    def report(self, model: nn.Module) -> dict[str, float]:
        """Run-level numbers about the built student (e.g. its KV-cache size), added to the run's summary."""
        return {}

    def plan(self, modules: dict[str, nn.Module], stats: dict[str, ActivationStats]) -> None:
        """Called once with all of this spec's targets before any is built: a hook for decisions made
        across targets (e.g. a per-layer rank allocation under one budget). Default: nothing."""

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None) -> nn.Module:
        """The replacement for target ``name``; its trainable tensors have ``requires_grad=True``."""
        raise NotImplementedError

    def init_args(self) -> dict:
        """The spec's configuration, as given to ``__init__`` (JSON-serializable)."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}

    def describe(self) -> dict:
        cls = type(self)
        return {"technique": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"
