"""A low-bit grid: grouped integer codes with per-group scales and zero points, the rounding onto it
(nearest, or GPTQ's error feedback through the layer's input covariance), and bit-packing.

A weight row is split into groups of ``group`` input channels (the last group may be shorter); group j of
row i dequantizes as ``w = (q - z[i, j]) * s[i, j]`` with integer codes ``q`` in ``[0, 2^bits - 1]``.
Symmetric grids fix ``z = 2^(bits-1)``, so ``q - z`` is a signed code in ``[-2^(bits-1), 2^(bits-1) - 1]``
(the layout of compressed-tensors' and GPTQ's symmetric formats); asymmetric grids take ``z`` from the
group's range (min-max), rounded to an integer so that it packs like a code.

``gptq`` is the rounding of Frantar et al. 2022 (GPTQ: columns rounded in order, each one's error spread
over the columns not yet rounded through the inverse Hessian ``(E[x x^T] + damp)^-1``), with the group's
scale taken when its first column is reached, as GPTQ does without activation reordering.

``pack(codes, bits)`` stores 8 codes of ``bits`` bits in ``bits`` bytes along the input dimension (any
width; the row is zero-padded to a multiple of 8); ``unpack`` (defined in the standalone ``modeling_zoo.py``
that exports carry, and re-exported here) inverts it.

``QuantizedLinear`` is the layer on such a grid (frozen codes, trainable fp32 scales read as fp16 through a
straight-through rounding, an optional Hadamard frame and low-rank correction): ``zoo.Quantize`` builds it for a
whole weight, the low-rank techniques for each of their factors (``factor_bits``, ``zoo.core.lowrank``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..export.modeling_zoo import unpack  # noqa: F401 - the exported file's own, so both read codes alike
from .errors import ZooError
from .hadamard import PHDFrame
from .linalg import rms
from .replacement import Replacement

BITS = (2, 3, 4, 8)
ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class Grid:
    """``bits`` per code, ``group`` input channels per scale, symmetric or min-max (asymmetric)."""

    bits: int
    group: int
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise ZooError(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ZooError(f"group must be a positive int (input channels per scale), got {self.group!r}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, in_features: int) -> int:
        return -(-in_features // self.group)

    def expand(self, per_group: torch.Tensor, in_features: int) -> torch.Tensor:
        """[out, G] -> [out, in]: each group's value over its columns."""
        return per_group.repeat_interleave(self.group, dim=-1)[..., :in_features]

    def bits_per_weight(self, in_features: int, scale_bits: int = 16) -> float:
        """Stored bits per weight of a row: codes, the group scales, and packed zero points when asymmetric."""
        per_group = scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + per_group * self.groups(in_features) / in_features


def _grouped(W: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in] -> [out, G, group], the last group zero-padded (zeros leave min-max and absmax unchanged
    when the group holds both signs, and a padded column is never read back)."""
    out, n = W.shape
    pad = -n % group
    return torch.nn.functional.pad(W, (0, pad)).reshape(out, -1, group)


def grid_params(W: torch.Tensor, grid: Grid, shrink: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales [out, G], integer zero points [out, G]) of ``W`` [out, in] by the groups' range, the range
    shrunk by ``shrink`` (a clipping ratio: 1 keeps the extremes on the grid)."""
    g = _grouped(W.double(), grid.group)
    if grid.symmetric:
        absmax = g.abs().amax(-1) * shrink
        scales = (2 * absmax / grid.maxq).clamp_min(1e-12)
        zeros = torch.full_like(scales, 2 ** (grid.bits - 1))
        return scales, zeros
    lo = g.amin(-1).clamp_max(0) * shrink
    hi = g.amax(-1).clamp_min(0) * shrink
    scales = ((hi - lo) / grid.maxq).clamp_min(1e-12)
    zeros = torch.round(-lo / scales).clamp(0, grid.maxq)
    return scales, zeros


def quantize(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Codes (uint8 [out, in]) of ``W`` on the grid (round to nearest, clamped)."""
    n = W.shape[1]
    q = torch.round(W.double() / grid.expand(scales.double(), n)) + grid.expand(zeros.double(), n)
    return q.clamp(0, grid.maxq).to(torch.uint8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The weight [out, in] the codes stand for, in ``scales``' dtype (differentiable in scales and zeros)."""
    n = codes.shape[1]
    return (codes.to(scales.dtype) - grid.expand(zeros.to(scales.dtype), n)) * grid.expand(scales, n)


def clip_search(W: torch.Tensor, grid: Grid, weights: torch.Tensor | None = None,
                ratios=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the range shrink of ``ratios`` with the least rounding error, weighted per input channel by
    ``weights`` (E[x_i^2]: the output error each column causes; uniform when None). Returns (scales, zeros)."""
    W = W.double()
    n = W.shape[1]
    w = torch.ones(n, dtype=torch.float64, device=W.device) if weights is None else weights.double().to(W.device)
    best, best_err = None, None
    for r in ratios:
        scales, zeros = grid_params(W, grid, r)
        err = (dequantize(quantize(W, scales, zeros, grid), scales, zeros, grid) - W).pow(2) * w
        err = _grouped(err, grid.group).sum(-1)
        if best is None:
            best, best_err = (scales, zeros), err
        else:
            better = err < best_err
            best = (torch.where(better, scales, best[0]), torch.where(better, zeros, best[1]))
            best_err = torch.minimum(err, best_err)
    return best


def gptq(W: torch.Tensor, moment: torch.Tensor, grid: Grid, damp: float = 0.01, block: int = 128,
         clip: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, zeros) of ``W`` [out, in] rounded by GPTQ on the input second moment ``moment``
    [in, in] (fp64 throughout; ``damp`` x mean diagonal added, as GPTQ's percdamp). With ``clip``, each
    group's range is the ``clip_search`` choice on the error-fed weights."""
    if W.device.type == "cpu":  # thousands of small ops: one thread each is faster, and no spin-wait under load
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _gptq(W, moment, grid, damp, block, clip)
        finally:
            torch.set_num_threads(threads)
    return _gptq(W, moment, grid, damp, block, clip)


def _gptq(W: torch.Tensor, moment: torch.Tensor, grid: Grid, damp: float, block: int, clip: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    W = W.detach().double().clone()
    out, n = W.shape
    H = moment.double().to(W.device).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype, device=H.device)
    # the upper Cholesky factor of H^-1: row i holds column i's error-feedback coefficients
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    G = grid.groups(n)
    block = max(block // grid.group, 1) * grid.group  # a group never spans two blocks: its columns are all in Wb
    scales = torch.empty(out, G, dtype=torch.float64, device=W.device)
    zeros = torch.empty_like(scales)
    codes = torch.empty(out, n, dtype=torch.uint8, device=W.device)
    diag = H.diagonal()
    for start in range(0, n, block):
        end = min(start + block, n)
        Wb, Hb = W[:, start:end].clone(), Hinv[start:end, start:end]
        Err = torch.zeros_like(Wb)
        for j in range(end - start):
            col = start + j
            if col % grid.group == 0:
                g = col // grid.group
                # the group's scale from its columns as they are now (earlier errors already fed in)
                cols = Wb[:, j:j + grid.group]
                if clip:
                    s, z = clip_search(cols, grid, diag[col:col + cols.shape[1]])
                else:
                    s, z = grid_params(cols, grid)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            g = col // grid.group
            w = Wb[:, j]
            q = torch.clamp(torch.round(w / scales[:, g]) + zeros[:, g], 0, grid.maxq)
            codes[:, col] = q.to(torch.uint8)
            e = (w - (q - zeros[:, g]) * scales[:, g]) / Hb[j, j]
            Wb[:, j:] -= e[:, None] * Hb[j, j:][None, :]
            Err[:, j] = e
        W[:, end:] -= Err @ Hinv[start:end, end:]
    return codes, scales, zeros


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [out, ceil(in / 8) * bits]: 8 codes of ``bits`` bits in ``bits`` bytes, little-endian."""
    out, n = codes.shape
    c = torch.nn.functional.pad(codes.long(), (0, -n % 8)).reshape(out, -1, 8)
    word = (c << (bits * torch.arange(8, device=codes.device))).sum(-1)  # < 2^(8 bits) <= 2^64
    byte = (word[..., None] >> (8 * torch.arange(bits, device=codes.device))) & 0xFF
    return byte.reshape(out, -1).to(torch.uint8)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to fp16 in the forward, identity in the backward (a straight-through rounding)."""
    return t + (t.half().float() - t).detach()


class QuantizedLinear(Replacement):
    """y = (deq(codes) + A B) (T x) + b: a low-bit grid with trainable group scales (see the module docstring)."""

    fp32_params = ("scales",)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, grid: Grid,
                 bias: torch.Tensor | None = None, frame: PHDFrame | None = None,
                 A: torch.Tensor | None = None, B: torch.Tensor | None = None, train_scales: bool = True):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.grid = grid
        self.frame = frame
        self.register_buffer("codes", codes.to(torch.uint8))  # [out, in], rebuilt from weights + calibration
        self.register_buffer("zeros", zeros.to(torch.uint8))  # [out, G]
        self.scales = nn.Parameter(scales.float(), requires_grad=train_scales)  # [out, G], fp32 in memory
        self.A = nn.Parameter(A) if A is not None else None  # [out, r]
        self.B = nn.Parameter(B) if B is not None else None  # [r, in]
        self.bias = nn.Parameter(bias.clone(), requires_grad=False) if bias is not None else None
        # relative steps, as for the low-rank factors: one lr moves every scale by the same fraction
        self.lr_scales = {n: rms(p) for n, p in self.named_parameters() if p.requires_grad}

    @property
    def correction_rank(self) -> int:
        return 0 if self.A is None else self.A.shape[1]

    def grid_weight(self) -> torch.Tensor:
        """deq(codes) [out, in] in fp32, with the scales as the export stores them (fp16)."""
        return dequantize(self.codes, _fp16(self.scales), self.zeros, self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.frame(x) if self.frame is not None else x
        y = F.linear(h, self.grid_weight().to(h.dtype))
        if self.A is not None:
            y = y + (h @ self.B.T.to(h.dtype)) @ self.A.T.to(h.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        W = self.grid_weight().double()
        if self.A is not None:
            W = W + self.A.double() @ self.B.double()
        return W @ self.frame.matrix().to(W.device) if self.frame is not None else W

    def export_spec(self) -> dict:
        """Packed codes and zero points (uint8), fp16 scales; the frame as its signs, permutation and
        Hadamard block size; the correction as two matmuls beside the grid's."""
        g = self.grid
        frame = []
        tensors = {"w_codes": "uint8", "w_scales": "float16", **({} if g.symmetric else {"w_zeros": "uint8"})}
        if self.frame is not None:
            frame = [{"op": "scale", "t": "signs"}, {"op": "gather", "t": "perm"},
                     {"op": "hadamard", "block": self.frame.block}]
            tensors |= {"signs": "model", "perm": "int64"}
        grid = [{"op": "qmatmul", "t": "w", "bits": g.bits, "group": g.group, "in": self.in_features,
                 "symmetric": g.symmetric}]
        if self.A is not None:
            grid = [{"op": "sum", "branches": [grid, [{"op": "matmul", "t": "B", "transpose": True},
                                                      {"op": "matmul", "t": "A", "transpose": True}]]}]
            tensors |= {"A": "model", "B": "model"}
        program = frame + grid
        if self.bias is not None:
            program.append({"op": "add", "t": "bias"})
            tensors["bias"] = "model"
        return {"program": program, "tensors": tensors,
                "ranks": {"bits": g.bits, "group": g.group, "correction": self.correction_rank}}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        g = self.grid
        out = {"w_codes": pack(self.codes, g.bits), "w_scales": self.scales.detach().half()}
        if not g.symmetric:
            out["w_zeros"] = pack(self.zeros, g.bits)
        if self.frame is not None:
            out |= {"signs": self.frame.signs, "perm": self.frame.perm}
        if self.A is not None:
            out |= {"A": self.A, "B": self.B}
        return out | ({"bias": self.bias} if self.bias is not None else {})

    def extra_repr(self) -> str:
        g = self.grid
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={g.bits}, group={g.group}, "
                f"symmetric={g.symmetric}, hadamard={self.frame is not None}, correction={self.correction_rank}")
