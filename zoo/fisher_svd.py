"""Fisher/covariance-weighted SVD with sigma repair (source 000, sections 2.1-2.2 and 4.1-4.2;
DESIGN.md, "FisherSVDRepair").

W (out x in) ~ U diag(sigma) V^T at rank r. The decomposition is an SVD of a weighted matrix
``A = L W R`` truncated to rank r and mapped back: ``U = L^-1 P_r``, ``V = R^-T Q_r``, ``sigma = S_r``.

- ``covariance``: R = chol(E[x x^T]) (jittered), L = I. Minimizes E||W x - W_r x||^2 over the
  calibration distribution exactly (SVD-LLM's truncation-aware whitening).
- ``diagonal``: R = diag(sqrt(E[x_i^2]))^alpha, L = I (ASVD); used automatically for covariance
  weighting when only the diagonal was collected (in_features > full_cov_max).
- ``fisher``: L = diag(sqrt(row Fisher)), R = I (FWSVD): rows whose weights matter to the loss
  are approximated better.
- ``none``: plain SVD.

Forward: ``((x @ V) * sigma.float()).to(x.dtype) @ U.T + bias`` — matmuls in the input dtype, the
diagonal scale in fp32. Sigma (and bias) train by default; ``train_factors`` also trains U and V.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .core.calibration import ActivationStats
from .core.errors import ZooError, check_choice
from .core.module import DistillationModule
from .core.technique import Technique

log = logging.getLogger(__name__)

WEIGHTINGS = ("covariance", "diagonal", "fisher", "none")


class FisherSVDLinear(nn.Module):
    """y = U diag(sigma) V^T x + b, sigma kept in fp32."""

    def __init__(self, U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                 train_factors: bool = False):
        super().__init__()
        self.in_features, self.out_features = V.shape[0], U.shape[0]
        self.U = nn.Parameter(U, requires_grad=train_factors)  # [out, r]
        self.V = nn.Parameter(V, requires_grad=train_factors)  # [in, r]
        self.sigma = nn.Parameter(sigma.float())  # [r], fp32 whatever the model's dtype
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        # Adafactor-style relative step: each tensor's lr is scaled by its initial RMS, so one lr
        # means the same relative change for a layer whose singular values are 1e-3 or 10
        self.lr_scales = {n: rms(p) for n, p in self.named_parameters()}

    @property
    def rank(self) -> int:
        return self.sigma.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the matmuls run in the input dtype (autocast picks bf16 under bf16-mixed); the diagonal
        # scale runs in fp32 and the result goes back to the matmul dtype
        h = x @ self.V.to(x.dtype)
        h = (h.float() * self.sigma.float()).to(h.dtype)
        y = h @ self.U.T.to(h.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def _apply(self, fn, recurse=True):
        # casting the model to bf16 (e.g. precision "bf16-true") must not cast sigma
        super()._apply(fn, recurse)
        if self.sigma.dtype != torch.float32:
            self.sigma.data = self.sigma.data.float()
        return self

    def dense_weight(self) -> torch.Tensor:
        return (self.U.double() * self.sigma.double()) @ self.V.double().T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def rms(t: torch.Tensor) -> float:
    """Root mean square of ``t`` (1.0 for an all-zero tensor)."""
    value = float(t.detach().float().pow(2).mean().sqrt())
    return value if value > 0 else 1.0


def resolve_rank(rank: int | float, out_features: int, in_features: int, name: str = "") -> int:
    """An int rank as given, or a float parameter ratio: r = ratio * in*out / (in + out)."""
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ZooError(f"rank must be an int or a parameter-ratio float, got {rank!r}")
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise ZooError(f"rank ratio {rank} for {name or 'layer'} must be in (0, 1]")
        r = max(1, int(rank * in_features * out_features / (in_features + out_features)))
        return min(r, limit)
    if not 1 <= rank <= limit:
        raise ZooError(
            f"rank {rank} for {name or 'layer'} is out of range: it must be between 1 and "
            f"min(out_features={out_features}, in_features={in_features}) = {limit}"
        )
    return rank


def cholesky_jittered(matrix: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Lower Cholesky factor of a PSD matrix, adding jitter * mean(diag) * I until it succeeds."""
    scale = matrix.diagonal().mean().clamp_min(1e-30)
    jitter = 0.0
    for attempt in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * scale * torch.eye(len(matrix), dtype=matrix.dtype,
                                                                                     device=matrix.device))
        if int(info) == 0:
            if jitter:
                log.warning("covariance was ill-conditioned; Cholesky needed jitter %.1e", jitter)
            return factor
        jitter = 1e-10 if jitter == 0 else jitter * 10
    raise ZooError("covariance is not positive definite even with jitter; collect more calibration tokens")


def weighted_svd(
    weight: torch.Tensor,
    rank: int,
    weighting: str = "covariance",
    stats: ActivationStats | None = None,
    alpha: float = 0.5,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U [out, r], sigma [r], V [in, r], weighting actually used), computed in fp64."""
    check_choice("weighting", weighting, WEIGHTINGS)
    W = weight.detach().double()
    device = W.device
    if weighting == "covariance" and (stats is None or stats.second_moment is None):
        if stats is None:
            raise ZooError(f"covariance weighting of {name} needs calibration statistics")
        log.info("%s: only the diagonal of the input covariance is available; using diagonal weighting", name)
        weighting = "diagonal"
    if weighting in ("diagonal", "fisher") and stats is None:
        raise ZooError(f"{weighting} weighting of {name} needs calibration statistics")

    if weighting == "covariance":
        S = cholesky_jittered(stats.second_moment.to(device, torch.float64))
        P, s, Qh = torch.linalg.svd(W @ S, full_matrices=False)
        U = P[:, :rank]
        # V = S^-T Q_r, so that x @ V = (S^-1 ... )-whitened coordinates
        V = torch.linalg.solve_triangular(S.T, Qh[:rank].T, upper=True)
    elif weighting == "diagonal":
        d = stats.diag.to(device, torch.float64).sqrt()
        d = d.clamp_min(d.mean() * 1e-6 + 1e-30).pow(alpha)
        P, s, Qh = torch.linalg.svd(W * d, full_matrices=False)
        U, V = P[:, :rank], Qh[:rank].T / d[:, None]
    elif weighting == "fisher":
        if stats.fisher_rows is None:
            raise ZooError(f"fisher weighting of {name} needs Fisher statistics (calibration with fisher)")
        f = stats.fisher_rows.to(device, torch.float64).sqrt()
        f = f.clamp_min(f.mean() * 1e-6 + 1e-30)
        P, s, Qh = torch.linalg.svd(f[:, None] * W, full_matrices=False)
        U, V = P[:, :rank] / f[:, None], Qh[:rank].T
    else:
        P, s, Qh = torch.linalg.svd(W, full_matrices=False)
        U, V = P[:, :rank], Qh[:rank].T
    return U, s[:rank], V, weighting


class FisherSVD(Technique):
    """Spec: replace each target by a weighted rank-r ``FisherSVDLinear``.

    Args:
        targets: module name patterns (see ``zoo.core.targets``).
        rank: an int rank, or a float parameter ratio in (0, 1] (r = ratio * in*out / (in+out)).
        weighting: ``covariance``, ``diagonal``, ``fisher`` or ``none``.
        alpha: exponent of the diagonal (ASVD) weighting.
        train_factors: also train U and V (default: sigma and bias only).
    """

    def __init__(self, targets: str | list[str], rank: int | float = 64, weighting: str = "covariance",
                 alpha: float = 0.5, train_factors: bool = False):
        super().__init__(targets)
        self.rank = rank
        self.weighting = check_choice("weighting", weighting, WEIGHTINGS)
        self.alpha = alpha
        self.train_factors = train_factors

    def needs(self) -> set[str]:
        return {"covariance": {"input"}, "diagonal": {"input"}, "fisher": {"fisher"}, "none": set()}[self.weighting]

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None) -> FisherSVDLinear:
        weight = module.weight
        rank = resolve_rank(self.rank, module.out_features, module.in_features, name)
        U, sigma, V, used = weighted_svd(weight, rank, self.weighting, stats, self.alpha, name)
        bias = getattr(module, "bias", None)
        layer = FisherSVDLinear(U.to(weight.dtype), sigma, V.to(weight.dtype),
                                None if bias is None else bias.detach(), self.train_factors)
        return layer.to(weight.device)


class FisherSVDRepair(DistillationModule):
    """Sigma repair of Fisher/covariance-weighted SVD replacements (source 000, 2.1-2.2, 2.4).

    Args:
        targets: module name patterns, e.g. ``model.layers.15.mlp.down_proj``.
        rank: int rank or float parameter ratio.
        weighting: ``covariance``, ``diagonal``, ``fisher`` or ``none``.
        alpha: exponent of the diagonal weighting.
        train_factors: also train U and V.
        **kwargs: the shared training options of ``DistillationModule`` (teacher, lr, ...).
    """

    def __init__(self, targets: str | list[str], rank: int | float = 64, weighting: str = "covariance",
                 alpha: float = 0.5, train_factors: bool = False, **kwargs):
        super().__init__(parts=[FisherSVD(targets, rank, weighting, alpha, train_factors)], **kwargs)
