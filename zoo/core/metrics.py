"""Metrics shared by techniques and gates (DESIGN.md, "Core: metrics"; source 000, section 3.1 and 4.9
for shim dominance)."""
from __future__ import annotations

import torch
import torchmetrics


class NormRatio(torchmetrics.Metric):
    """||a|| / ||b|| over everything seen in an epoch: sqrt(sum ||a_t||^2 / sum ||b_t||^2) over tokens t
    (summed across processes). As shim dominance, a = the shim's output and b = the core's."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("numerator", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.numerator += a.detach().double().pow(2).sum()
        self.denominator += b.detach().double().pow(2).sum()

    def compute(self) -> torch.Tensor:
        return (self.numerator / self.denominator.clamp_min(1e-300)).sqrt()
