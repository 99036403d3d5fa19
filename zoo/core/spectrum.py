"""Eigen-spectra of covariances: participation ratio, rank for a variance target, outlier dimensions
(source 004, "Experimental Results" 1-2).

- ``participation_ratio(eigs) = (sum l)^2 / sum l^2`` (Df): the effective number of dimensions. It is
  d for an isotropic spectrum of d equal eigenvalues and 1 for a rank-1 spectrum.
- ``rank_for_variance(eigs, 0.95)``: the smallest k whose top-k eigenvalues hold 95% of the trace.
- ``outlier_dims`` / ``drop_dims``: the massive-activation caveat. In the middle layers of an LLM a few
  "massive activation" dimensions of the residual stream carry almost all of ||x||^2, so the raw
  spectrum collapses to Df ~ 1 - an artifact of those few coordinates, not low-dimensional structure.
  Report the spectrum with those dimensions set apart too (and on the normalized inputs that the
  projections consume).

Everything runs in fp64; eigenvalues come back in descending order, clamped at 0 (a PSD matrix's tiny
negative eigenvalues are round-off).
"""
from __future__ import annotations

import torch

from .errors import ZooError


def eigenvalues(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix, descending, fp64, round-off negatives set to 0."""
    m = matrix.detach().double()
    m = (m + m.T) / 2
    return torch.linalg.eigvalsh(m).flip(0).clamp_min(0.0)


def eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, eigenvectors as columns in the same order) of a symmetric matrix, fp64."""
    m = matrix.detach().double()
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vals.flip(0).clamp_min(0.0), vecs.flip(1)


def participation_ratio(eigs: torch.Tensor) -> float:
    """Df = (sum l)^2 / sum l^2 of non-negative eigenvalues (0 for an all-zero spectrum)."""
    l = torch.as_tensor(eigs).double().clamp_min(0.0)
    denom = float(l.pow(2).sum())
    return float(l.sum()) ** 2 / denom if denom > 0 else 0.0


def cumulative_variance(eigs: torch.Tensor) -> torch.Tensor:
    """Fraction of the trace held by the top-k eigenvalues, for k = 1..d (eigs descending)."""
    l = torch.as_tensor(eigs).double().clamp_min(0.0)
    total = l.sum()
    if total <= 0:
        return torch.ones_like(l)
    return (l.cumsum(0) / total).clamp_max(1.0)


def rank_for_variance(eigs: torch.Tensor, target: float = 0.95) -> int:
    """The smallest k whose top-k eigenvalues hold at least ``target`` of the trace (eigs descending)."""
    if not 0 < target <= 1:
        raise ZooError(f"variance target must be in (0, 1], got {target}")
    cum = cumulative_variance(eigs)
    # a tolerance so that target=1.0 is reached despite round-off in the cumulative sum
    hits = torch.nonzero(cum >= target - 1e-12)
    return int(hits[0]) + 1 if len(hits) else len(cum)


def outlier_dims(diag: torch.Tensor, ratio: float = 100.0) -> torch.Tensor:
    """Indices of the dimensions whose mean square E[x_i^2] exceeds ``ratio`` times the median's.

    Massive activations are orders of magnitude above the typical coordinate (Sun et al. 2024 report
    ~1000x the median magnitude), so a ratio of 100 on the mean square (10x on the RMS) picks them
    and nothing else in a healthy residual stream.
    """
    if ratio <= 1:
        raise ZooError(f"outlier ratio must be > 1 (a multiple of the median mean square), got {ratio}")
    d = torch.as_tensor(diag).double()
    return torch.nonzero(d > ratio * d.median().clamp_min(1e-300)).flatten()


def drop_dims(matrix: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """The principal submatrix of ``matrix`` without the rows and columns ``dims``."""
    keep = torch.ones(matrix.shape[0], dtype=torch.bool)
    keep[torch.as_tensor(dims, dtype=torch.long)] = False
    return matrix[keep][:, keep]


def summarize(eigs: torch.Tensor, target: float = 0.95) -> dict:
    """Df, k for ``target``, the dimension and the trace of one spectrum (JSON-ready)."""
    return {"df": participation_ratio(eigs), "k": rank_for_variance(eigs, target), "dim": int(len(eigs)),
            "trace": float(torch.as_tensor(eigs).double().sum())}


def block_diagonal(matrix: torch.Tensor, n_blocks: int) -> list[torch.Tensor]:
    """The ``n_blocks`` equal diagonal blocks of a square matrix (per-head covariances of a projection)."""
    size, rem = divmod(matrix.shape[0], n_blocks)
    if rem:
        raise ZooError(f"a {matrix.shape[0]}-wide matrix does not split into {n_blocks} equal blocks")
    return [matrix[i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(n_blocks)]
