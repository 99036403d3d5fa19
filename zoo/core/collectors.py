"""Calibration collectors: the named statistics beyond a target's input moments that a technique asks for in
``needs()`` (ZOMBORG, source 000, section 2.2: the statistics that weight the projection).

A ``Collector`` hooks one target's stream, keeps an fp64 sum and a token count, and ``collect``
(``zoo.core.calibration``) all-reduces and normalizes them; ``register_collector`` makes one available by name.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ZooError


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The real tokens of a [batch, seq, ..., width] stream as rows [tokens, width] (``mask``: [batch, seq])."""
    x = x[mask] if mask is not None else x.reshape(-1, *x.shape[2:])
    return x.reshape(-1, x.shape[-1])


class Collector:
    """One named statistic of one target: the mean over the calibration tokens of a per-token ``statistic``
    of one of the target's streams, kept as an fp64 sum and a token count.

    ``stream`` is what the statistic reads: ``input`` (the target's input rows) or ``output_grad`` (the
    gradient of the next-token loss at its output, rows of dL/dy; calibration then runs a backward pass, with
    the target's weight requiring grad). A subclass says its sum's shape (``zeros``) and the per-batch sum
    (``statistic``, of masked fp64 rows [tokens, width]). A statistic of another kind sets ``stream = None``
    and overrides ``attach``/``after_backward``/``sums``/``result`` (``zoo.core.lowrank.FisherRows``).

    Sums are all-reduced across processes before ``result``; its tensors land in
    ``stats.extra["<name>.<key>"]``. ``version`` enters the calibration cache key.
    """

    name = ""
    version = "1"
    stream: str | None = "input"
    key = "mean"  #: the result's key

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.mask: torch.Tensor | None = None  # the batch's real tokens, set by ``collect`` before each step
        self.paused = False  # set by ``collect`` during a ``cross`` batch's teacher-view pass: not this statistic's
        if self.stream is not None:
            self.total = self.zeros().to(device)
            self.tokens = torch.zeros(1, dtype=torch.float64)

    @property
    def backward(self) -> bool:
        return self.stream == "output_grad"

    def zeros(self) -> torch.Tensor:
        """The fp64 sum, empty."""
        raise NotImplementedError

    def statistic(self, rows: torch.Tensor) -> torch.Tensor:
        """The sum over these tokens' rows (fp64) of the per-token statistic."""
        raise NotImplementedError

    def add(self, rows: torch.Tensor) -> None:
        self.total += self.statistic(rows.detach().double()).to(self.total.device)
        self.tokens += len(rows)

    def attach(self) -> list:
        if self.stream is None:
            return []
        if self.stream == "input":
            return [self.module.register_forward_pre_hook(
                lambda _m, args: None if self.paused else self.add(_rows(args[0], self.mask)))]

        def on_output(_module, _args, output):
            if output.requires_grad:  # the gradient arrives in the backward pass: keep this batch's mask
                output.register_hook(lambda g, mask=self.mask: self.add(_rows(g, mask)))

        return [self.module.register_forward_hook(on_output)]

    def after_backward(self) -> None:
        pass

    def sums(self) -> list[torch.Tensor]:
        return [self.total, self.tokens]

    def result(self) -> dict[str, torch.Tensor]:
        return {self.key: (self.total / self.tokens.clamp_min(1).to(self.total.device)).cpu()}


#: collector name -> class; ``needs()`` names these (plus "input" and "taps")
COLLECTORS: dict[str, type[Collector]] = {}


def register_collector(cls: type[Collector]) -> type[Collector]:
    """Make ``cls`` available to ``needs()`` under ``cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ZooError(f"collector {cls.__qualname__} has no name")
    known = COLLECTORS.get(cls.name)
    if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
        raise ZooError(f"a collector named {cls.name!r} is already registered ({known.__qualname__})")
    COLLECTORS[cls.name] = cls
    return cls

