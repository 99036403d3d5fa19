"""Numerics shared by the techniques (source 000, sections 2.2-2.4): fp32 parameters that survive a cast of
the model, relative learning-rate scales, jittered Cholesky, covariance whitening and PSD solves, orthogonal
Procrustes."""
from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ZooError

log = logging.getLogger(__name__)


def rms(t: torch.Tensor) -> float:
    """Root mean square of ``t`` (1.0 for an all-zero tensor)."""
    value = float(t.detach().float().pow(2).mean().sqrt())
    return value if value > 0 else 1.0


class FP32Params(nn.Module):
    """A replacement whose parameters named in ``fp32_params`` stay fp32 when the model is cast
    (e.g. ``precision: bf16-true``): small trainable tensors (sigma, cores, shims) get the optimizer's
    full precision, and the forward casts them to the matmul dtype at use."""

    fp32_params: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self.fp32_params:
            p = getattr(self, name, None)
            if p is not None and p.dtype != torch.float32:
                p.data = p.data.float()
        return self


def cholesky_jittered(matrix: torch.Tensor, max_tries: int = 8, name: str = "") -> torch.Tensor:
    """Lower Cholesky factor of a PSD matrix, adding jitter * mean(diag) * I until it succeeds (the jitter
    used is logged with ``name``, the target the matrix belongs to)."""
    scale = matrix.diagonal().mean().clamp_min(1e-30)
    jitter = 0.0
    eye = torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
    for _ in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * scale * eye)
        if int(info) == 0:
            if jitter:
                log.warning("%scovariance was ill-conditioned; Cholesky needed jitter %.1e x mean(diag)",
                            f"{name}: " if name else "", jitter)
            return factor
        jitter = 1e-10 if jitter == 0 else jitter * 10
    raise ZooError("covariance is not positive definite even with jitter; collect more calibration tokens")


def thin_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(A, full_matrices=False)`` computed on the tall orientation: LAPACK's
    divide-and-conquer SVD of a wide matrix (a down projection, 576 x 1536) takes several times as long as
    the same SVD of its transpose (``benchmarks/svd_orientation.py``)."""
    if A.shape[-2] >= A.shape[-1]:
        return torch.linalg.svd(A, full_matrices=False)
    Q, s, Ph = torch.linalg.svd(A.mT, full_matrices=False)
    return Ph.mT.contiguous(), s, Q.mT.contiguous()  # factors become Parameters: dense, row-major


def whitening(moment: torch.Tensor, name: str = "") -> tuple[torch.Tensor, object]:
    """(S, unwhiten) for input second moment ``moment`` = E[x x^T]: S = chol(E[x x^T]) (jittered), so the SVD of
    ``M S`` truncated to rank r minimizes E||(M - M_r) x||^2 (SVD-LLM's truncation-aware whitening);
    ``unwhiten(Qh_r)`` maps its right factor Qh_r [r, in] back to the input coordinates, ``S^-T Qh_r^T`` [in, r]."""
    S = cholesky_jittered(moment.to(torch.float64), name=name)
    return S, lambda Qh: torch.linalg.solve_triangular(S.T, Qh.T, upper=True)


def singular_values(A: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.svdvals`` on the tall orientation (see ``thin_svd``)."""
    return torch.linalg.svdvals(A if A.shape[-2] >= A.shape[-1] else A.mT)


def solve_psd_right(rhs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``rhs @ gram^-1`` for a PSD ``gram`` (jittered Cholesky)."""
    L = cholesky_jittered(gram)
    return torch.cholesky_solve(rhs.T, L).T


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The orthogonal R minimizing ||source @ R - target||_F (Schoenemann): R = U V^T for
    U S V^T = svd(source^T target)."""
    U, _, Vh = torch.linalg.svd(source.T @ target)
    return U @ Vh


def refit_left(weight: torch.Tensor, V: torch.Tensor, student_moment: torch.Tensor,
               cross_moment: torch.Tensor | None = None) -> torch.Tensor:
    """The closed-form local refit of a factorization ``B V^T`` with V fixed (SVD-LLM's parameter update,
    done in closed form): the B [out, r] minimizing E||B V^T x_s - W x_t||^2 over calibration tokens, where
    x_s is the input the replacement sees (the student's) and x_t the teacher's at the same position.

    ``student_moment`` = E[x_s x_s^T] [in, in] (or its diagonal [in]); ``cross_moment`` = E[x_t x_s^T] (or its
    diagonal; default: the student moment, i.e. x_t = x_s). Normal equations, fp64:
    B = W E[x_t x_s^T] V (V^T E[x_s x_s^T] V)^-1.
    """
    W, V = weight.detach().double(), V.detach().double()
    C_ss = _as_matrix(student_moment).to(W.device)
    C_ts = C_ss if cross_moment is None else _as_matrix(cross_moment).to(W.device)
    return solve_psd_right(W @ C_ts @ V, V.T @ C_ss @ V)


def _as_matrix(moment: torch.Tensor) -> torch.Tensor:
    """A second moment as an fp64 matrix (a diagonal one given as its diagonal)."""
    return torch.diag(moment.double()) if moment.dim() == 1 else moment.double()
