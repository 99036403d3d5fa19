"""A low-bit grid as one more projection, repaired by distillation (ZOMBORG, source 000, section 2: project the
chosen maps onto a constrained manifold, then repair the few tensors that carry function; here the manifold is
a grid of 2-8 bit integer codes with per-group scales).

Each target W [out, in] is replaced by

    y = (deq(Q) + A B) (T x) + b,     deq(Q) = (Q - Z) * S   (per group of ``group`` input channels)

- ``T`` (``hadamard=True``): a seeded orthogonal frame ``blockdiag(H) P D`` of ``zoo.core.hadamard`` applied to
  the input on the fly, with W read in the frame (``W T^T``), so outlier channels spread over their block
  before rounding (incoherence processing, as in QuIP# and QuaRot; the frame is rebuilt from the seed, never
  stored);
- ``Q``: frozen codes (``bits`` in 2, 3, 4, 8), rounded to nearest or by GPTQ's error feedback through the
  layer's input covariance (``rounding="gptq"``, the data-aware rounding of GPTQ; ``zoo.core.lowbit``), with
  an optional clipping search of each group's range (``clip``);
- ``S`` (trainable, stored fp16: the forward reads the fp16-rounded value, so the student computes what the
  export stores) and ``Z`` (integer zero points, frozen; ``symmetric`` fixes them at 2^(bits-1));
- ``A B`` (``correction=r``): a rank-r correction of the rounding error ``W T^T - deq(Q)``, initialized from
  its covariance-weighted SVD (SVD-LLM's whitening, so it removes the error the calibration inputs see most;
  as LQER/CALDERA do), trained with S.

Repair trains S (and A, B) by the same KL distillation as every technique: the codes never move, the
gradient reaches the scales through the dequantized weight (EfficientQAT's end-to-end stage). Bytes, not
parameters, are what this saves: a student's ``bits_per_weight`` and ``student_bytes``
(``zoo.export.writer.size_report``, in every run's summary) count the packed codes, fp16 scales, packed zero
points and the correction as the export stores them. The layer, ``QuantizedLinear``, lives in ``zoo.core.lowbit``
(the low-rank techniques store their factors with it: ``factor_bits``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .core.calibration import ActivationStats
from .core.errors import ZooError, check_choice
from .core.hadamard import PHDFrame
from .core.linalg import thin_svd, whitening
from .core.lowbit import (ROUNDINGS, Grid, QuantizedLinear, clip_search, dequantize, gptq,  # noqa: F401 - re-exported
                          grid_params, quantize)
from .core.registry import register
from .core.seeds import derive_seed
from .core.technique import NO_PLAN, Plan, Technique, TensorSize

log = logging.getLogger(__name__)


def weighted_correction(residual: torch.Tensor, moment: torch.Tensor | None, rank: int, name: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [out, r], B [r, in]) minimizing E||(R - A B) x||^2 over the calibration inputs (``moment`` = E[x x^T];
    plain SVD without it): the truncated SVD of R S, S = chol(E[x x^T]), mapped back through S^-1."""
    R = residual.double()
    if moment is None:
        P, s, Qh = thin_svd(R)
        return P[:, :rank] * s[:rank], Qh[:rank]
    S, unwhiten = whitening(moment.to(R.device), name)
    P, s, Qh = thin_svd(R @ S)
    return P[:, :rank] * s[:rank], unwhiten(Qh[:rank]).T


@register("quantize", version=1)
@dataclass(eq=False, repr=False)
class Quantize(Technique):
    """Spec: replace each target by a ``QuantizedLinear`` (see the module docstring).

    Args:
        targets: module name patterns (see ``zoo.core.targets``).
        bits: bits per code: 2, 3, 4 or 8.
        group: input channels sharing one scale (and zero point); the last group of a row may be shorter; 0: one
            scale per output channel (the whole row).
        symmetric: zero points fixed at 2^(bits-1) (not stored); else min-max integer zero points per group.
        rounding: ``nearest`` or ``gptq`` (error feedback through the input covariance; needs calibration).
        clip: search each group's range shrink for the least (input-weighted) rounding error.
        hadamard: read W in a seeded Hadamard frame of the input side (block ``block``), applied on the fly.
        block: Hadamard block (a power of two; the largest power of two dividing the width if it does not).
        correction: rank of a trained low-rank correction of the rounding error (0: none).
        train_scales: train the group scales in repair (the correction trains whenever it exists).
        damp: GPTQ's dampening, a fraction of the mean diagonal of E[x x^T].
        seed: seed of the frames' signs and permutations (each target gets its own).
    """

    targets: str | list[str]
    bits: int = 4
    group: int = 64
    symmetric: bool = False
    rounding: str = "gptq"
    clip: bool = False
    hadamard: bool = False
    block: int = 512
    correction: int = 0
    train_scales: bool = True
    damp: float = 0.01
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 0:
            raise ZooError(f"group must be an int >= 0 (input channels per scale; 0: one scale per output channel), "
                           f"got {self.group!r}")
        self.grid(1)  # validates bits
        check_choice("rounding", self.rounding, ROUNDINGS)
        if isinstance(self.correction, bool) or not isinstance(self.correction, int) or self.correction < 0:
            raise ZooError(f"correction must be an int rank >= 0 (0: no low-rank correction), got {self.correction!r}")
        if not 0 <= self.damp < 1:
            raise ZooError(f"damp must be in [0, 1), got {self.damp!r}")
        PHDFrame(self.block, self.block) if self.hadamard else None  # validates the block

    def grid(self, in_features: int) -> Grid:
        """The grid of a target with ``in_features`` inputs (``group=0``: the whole row is one group)."""
        return Grid(self.bits, self.group or in_features, self.symmetric)

    def needs(self) -> set[str]:
        return {"input"} if self.rounding == "gptq" or self.clip or self.correction else set()

    def _frame(self, name: str, in_features: int) -> PHDFrame | None:
        return PHDFrame(in_features, self.block, derive_seed(self.seed, name, "input")) if self.hadamard else None

    def _rank(self, module: nn.Module, name: str) -> int:
        if self.correction > min(module.out_features, module.in_features):
            raise ZooError(f"correction rank {self.correction} for {name} exceeds min(out, in) = "
                           f"{min(module.out_features, module.in_features)}")
        return self.correction

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        """codes [out, in] and zero points [out, G] (uint8 buffers), scales [out, G] fp32, the frame's buffers,
        the correction A [out, r], B [r, in] and the bias."""
        out_f, in_f = module.out_features, module.in_features
        G = self.grid(in_f).groups(in_f)
        sizes = {"codes": TensorSize((out_f, in_f), "buffer", "uint8"), "zeros": TensorSize((out_f, G), "buffer", "uint8"),
                 "scales": TensorSize((out_f, G), "trainable" if self.train_scales else "frozen", "float32")}
        r = self._rank(module, name)
        if r:
            sizes |= {"A": TensorSize((out_f, r)), "B": TensorSize((r, in_f))}
        if getattr(module, "bias", None) is not None:
            sizes["bias"] = TensorSize((out_f,), "frozen")
        if self.hadamard:
            sizes |= {"frame.signs": TensorSize((in_f,), "buffer"), "frame.perm": TensorSize((in_f,), "buffer", "int64"),
                      "frame.inverse_perm": TensorSize((in_f,), "buffer", "int64")}
        return sizes

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None,
              plan: Plan = NO_PLAN) -> QuantizedLinear:
        weight = module.weight
        grid, frame = self.grid(module.in_features), self._frame(name, module.in_features)
        W = weight.detach().double()
        moment = None
        if stats is not None:
            moment = stats.second_moment if stats.second_moment is not None else torch.diag(stats.diag)
            moment = moment.to(W.device, torch.float64)
        elif self.needs():
            raise ZooError(f"{name}: rounding={self.rounding!r}, clip or correction need calibration statistics")
        if frame is not None:
            frame = frame.to(W.device)
            T = frame.matrix().to(W.device)  # [n, n], orthogonal: W x = (W T^T)(T x)
            W = W @ T.T
            moment = T @ moment @ T.T if moment is not None else None
        if self.rounding == "gptq":
            codes, scales, zeros = gptq(W, moment, grid, self.damp, clip=self.clip)
        else:
            scales, zeros = clip_search(W, grid, moment.diagonal()) if self.clip else grid_params(W, grid)
            codes = quantize(W, scales, zeros, grid)
        scales = scales.half().float()  # what the export stores, from the start
        A = B = None
        r = self._rank(module, name)
        if r:
            A, B = weighted_correction(W - dequantize(codes, scales.double(), zeros, grid), moment, r, name)
            A, B = A.to(weight.dtype).contiguous(), B.to(weight.dtype).contiguous()
        bias = getattr(module, "bias", None)
        frame = frame.to(weight.dtype) if frame is not None else None  # its signs follow the model's dtype
        layer = QuantizedLinear(codes, scales, zeros, grid, None if bias is None else bias.detach(), frame, A, B,
                                self.train_scales)
        return layer.to(weight.device)
