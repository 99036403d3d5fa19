"""Metrics shared by techniques and gates (source 000, sections 3.1 and 4.9
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


class IdentityDeviation(torchmetrics.Metric):
    """d_id = ||x_hat_t - x_t|| / ||x_t|| per token t, reduced over an epoch to its ``statistic``: the
    ``mean`` over tokens or the ``max`` (source 000, 4.9, phase 51).

    ``dims`` restricts both norms to those coordinates (e.g. the residual stream with its
    massive-activation dimensions set apart). Tokens with ||x_t|| = 0 have no defined deviation and are
    skipped. Summed (and maxed) across processes.
    """

    full_state_update = False
    higher_is_better = False
    STATISTICS = ("mean", "max")

    def __init__(self, statistic: str = "mean", **kwargs):
        super().__init__(**kwargs)
        from .errors import check_choice

        self.statistic = check_choice("statistic", statistic, self.STATISTICS)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("peak", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, x_hat: torch.Tensor, x: torch.Tensor, dims: torch.Tensor | None = None) -> None:
        d = token_deviation(x_hat, x, dims)
        d = d[d.isfinite()]
        self.total += d.sum()
        self.count += d.numel()
        if d.numel():
            self.peak = torch.maximum(self.peak, d.max())

    def compute(self) -> torch.Tensor:
        if self.statistic == "max":
            return self.peak
        return self.total / self.count.clamp_min(1.0)


def token_deviation(x_hat: torch.Tensor, x: torch.Tensor, dims: torch.Tensor | None = None) -> torch.Tensor:
    """||x_hat_t - x_t|| / ||x_t|| for every token t (all leading dimensions flattened), fp64; NaN where
    ||x_t|| = 0. ``dims``: only these coordinates count."""
    x_hat, x = x_hat.detach().double(), x.detach().double()
    if dims is not None:
        dims = dims.to(x.device)
        x_hat, x = x_hat.index_select(-1, dims), x.index_select(-1, dims)
    num = (x_hat - x).reshape(-1, x.shape[-1]).norm(dim=-1)
    den = x.reshape(-1, x.shape[-1]).norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


class TokenPerplexity(torchmetrics.Metric):
    """exp(summed NLL / counted tokens) over an epoch: token-weighted, summed across processes."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("nll", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, count: torch.Tensor) -> None:
        self.nll += nll.detach().float()
        self.count += count.float()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.count.clamp_min(1.0))


class TokenMean(torchmetrics.Metric):
    """Token-weighted mean of per-batch means over an epoch, summed across processes.

    (``self.log(..., batch_size=n, sync_dist=True)`` would average the summed batch sizes over processes
    in integer arithmetic under ddp, biasing the mean; this sums exact fp64 totals instead.)
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean: torch.Tensor, count: torch.Tensor) -> None:
        self.total += mean.detach().double() * count.double()
        self.count += count.double()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1.0)).float()
