"""K-FAC-weighted SVD: a low-rank factorization weighted on both sides by the Kronecker-factored Fisher
(ZOMBORG, source 000, section 2.2, "Fisher-weighted SVD", taken from FWSVD's per-row Fisher to the K-FAC
approximation of Martens & Grosse, 2015, as LLM Surgeon, van der Ouderaa et al., 2023, uses it for
structured compression).

For a linear target y = W x inside the model, the Fisher of the next-token loss w.r.t. W is approximated
by A (x) G, with A = E[x x^T] (the input second moment) and G = E[g g^T], g = dL/dy the gradient at the
target's output. The loss increase of replacing W by W_r is then about

    tr(dW^T G dW A) = || L_G^T (W - W_r) R_A ||_F^2,    G = L_G L_G^T,  A = R_A R_A^T

so the rank-r optimum is the truncated SVD of ``M = L_G^T W R_A`` mapped back:
``U = L_G^-T P_r``, ``sigma = S_r``, ``V = R_A^-T Q_r``. With G = I this is SVD-LLM's whitening
(``FisherSVD(weighting="covariance")``); with A = I and a diagonal G it is close to FWSVD.

G is a statistic the core calibration does not collect: this module registers the ``grad_output``
collector (``zoo.core.calibration.Collector``) and the spec asks for it in ``needs()``. The replacement is
``FisherSVDLinear`` (sigma repair, optionally the factors), so training, export and repair states are
those of Fisher-SVD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .core.calibration import ActivationStats, Collector, register_collector
from .core.errors import ZooError
from .core.linalg import cholesky_jittered, thin_svd
from .core.lowrank import (check_factor_bits, factor_lora_rank, linear_footprint, low_rank_from_state, low_rank_layer,
                           rank_report)
from .core.ranks import check_rank, resolve_rank
from .core.registry import register
from .core.technique import NO_PLAN, Plan, Technique, TensorSize


@register_collector
class GradOutputCovariance(Collector):
    """G = E[g g^T] over the real tokens, g = dL/dy at the target's output (the mean next-token loss of
    each calibration batch, so g carries that batch's 1 / tokens factor; a common scale does not move the
    weighted SVD)."""

    name, stream, key = "grad_output", "output_grad", "second_moment"

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.module.out_features, self.module.out_features, dtype=torch.float64)

    def statistic(self, g: torch.Tensor) -> torch.Tensor:
        return g.T @ g


def kfac_svd(weight: torch.Tensor, rank: int, stats: ActivationStats, name: str = ""
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [out, r], sigma [r], V [in, r]) minimizing ||L_G^T (W - U diag(sigma) V^T) R_A||_F, in fp64."""
    G = stats.extra.get("grad_output.second_moment")
    if G is None:
        raise ZooError(f"K-FAC weighting of {name} needs the grad_output statistic (calibration)")
    A = stats.second_moment if stats.second_moment is not None else torch.diag(stats.diag)
    W = weight.detach().double()
    L_G = cholesky_jittered(G.to(W.device, torch.float64), name=f"{name} (output gradients)")
    R_A = cholesky_jittered(A.to(W.device, torch.float64), name=name)
    P, s, Qh = thin_svd(L_G.T @ W @ R_A)
    U = torch.linalg.solve_triangular(L_G.T, P[:, :rank], upper=True)
    V = torch.linalg.solve_triangular(R_A.T, Qh[:rank].T, upper=True)
    return U, s[:rank], V


@register("kfac_svd", version=1)
@dataclass(eq=False, repr=False)
class KFACSVD(Technique):
    """Spec: replace each target by a rank-r ``FisherSVDLinear`` from the K-FAC-weighted SVD.

    Args:
        targets: module name patterns (see ``zoo.core.targets``).
        rank: an int rank, or a float parameter ratio in (0, 1] (as ``zoo.FisherSVD``).
        train_factors: also train U and V (default: sigma and bias only).
        refit: re-fit U diag(sigma) in closed form after truncation, V fixed (``zoo.core.lowrank.refit_factors``).
        factor_lora: rank of a trained LoRA correction of U and of V (0: none; as ``zoo.FisherSVD``).
        factor_bits, factor_group: store the factors on a low-bit grid (as ``zoo.FisherSVD``).
    """

    targets: str | list[str]
    rank: int | float = 64
    train_factors: bool = False
    refit: bool = False
    factor_lora: int = 0
    factor_bits: int = 0
    factor_group: int = 64

    def __post_init__(self):
        super().__post_init__()
        check_rank(self.rank)
        factor_lora_rank(self.factor_lora, 1)
        check_factor_bits(self.factor_bits, self.factor_group, self.train_factors, self.factor_lora)

    def report(self, model: nn.Module) -> dict[str, float]:
        return rank_report(model)

    def needs(self) -> set[str]:
        return {"input", "grad_output"}

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        return linear_footprint(module, resolve_rank(self.rank, module.out_features, module.in_features, name),
                                self.train_factors, self.factor_lora, self.factor_bits, self.factor_group)

    def from_state(self, name: str, module: nn.Module, tensors: dict) -> nn.Module | None:
        """With ``train_factors`` the repair state holds the whole layer (``low_rank_from_state``)."""
        return low_rank_from_state(module, tensors, self.train_factors, self.factor_lora, self.factor_bits)

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None, plan: Plan = NO_PLAN) -> nn.Module:
        if stats is None:
            raise ZooError(f"K-FAC weighting of {name} needs calibration statistics")
        U, sigma, V = kfac_svd(module.weight, resolve_rank(self.rank, module.out_features, module.in_features, name),
                               stats, name)
        return low_rank_layer(module, U, sigma, V, stats, self.refit, self.train_factors, name, self.factor_lora,
                              self.factor_bits, self.factor_group)
