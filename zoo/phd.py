"""Blockwise PHD replacement with a trainable dense core (ZOMBORG, source 000, sections 2.3 and 4.5-4.6).

A target W (out x in) becomes ``W ~ B^T C A``: A = T_in[I, :] and B = T_out[J, :] are r_in and r_out rows
of structured orthogonal frames ``T = blockdiag_b(H) · P · D`` (``zoo.core.hadamard.PHDFrame``, fixed
by a seed: nothing about them is stored), and C (r_out x r_in) is a small dense core, the only tensor
that trains (with the bias). The rows are chosen by data:

- I: the input coordinates t_i = (T_in x)_i carrying the most output energy, ||W T_in^T e_i||^2 E[t_i^2];
- J: the output coordinates (T_out W x)_j with the largest energy E[(T_out W x)_j^2];

under the calibration second moment M = E[x x^T] (its diagonal alone when only that was collected).
C starts at the activation-weighted least-squares optimum ``C = B W M A^T (A M A^T)^-1`` (``core_init:
lstsq``), which minimizes E||B W x - C A x||^2 (and with it the output error of the replacement, since
B has orthonormal rows), or at the plain slice ``B W A^T = (T_out W T_in^T)[J, I]`` (``slice``).

Forward: ``y = up_J(down_I(x) @ C^T) + b``. ``compute: rows`` applies A and B as dense [r, n] buffers
(rebuilt from the seed, never saved; n*r multiply-adds per token), ``transform`` runs the structured
transform and a gather/scatter (n log b or n*b per token); ``auto`` takes rows when r <= b, which costs
fewer operations. ``benchmarks/phd_forward.py`` measures both against the dense layer. The layer, its
subframes and their data-chosen rows live in ``zoo.core.subframes`` (``zoo.CoupledCore`` shares them).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .core.calibration import ActivationStats
from .core.errors import check_choice
from .core.hadamard import FITS
from .core.registry import register
from .core.subframes import (COMPUTES, CORE_INITS, BlockwisePHDLinear, Subframe, check_ranks,  # noqa: F401 - re-exported
                             core_footprint, core_least_squares, frame_energy, init_core, input_energy, output_moment,
                             phd_subframe, resolve_compute, second_moment, subframe_footprint, top_index)
from .core.technique import NO_PLAN, Plan, Technique, TensorSize



@register("blockwise_phd", version=1)
@dataclass(eq=False, repr=False)
class BlockwisePHD(Technique):
    """Spec: replace each target by a ``BlockwisePHDLinear`` (structured frames, data-chosen rows,
    trainable dense core).

    Args:
        targets: module name patterns (see ``zoo.core.targets``).
        rank: r_in, input coordinates kept (the source's best single-layer setting: 64).
        rank_out: r_out, output coordinates kept (default: ``rank``).
        block: Hadamard block size b (a power of two; the source used 512).
        fit: widths that are not a multiple of b: ``divide`` (largest power of two <= b dividing the
            width) or ``pad`` (zero-pad to a multiple of b).
        seed: seed of the signs and permutations (each target and side gets its own, derived from it).
        core_init: ``lstsq`` (activation-weighted least squares) or ``slice`` ((T_out W T_in^T)[J, I]).
        compute: ``auto``, ``rows`` (dense frame rows) or ``transform`` (structured transform + gather).
        train_bias: train the bias (where the layer has one) along with the core.
    """

    targets: str | list[str]
    rank: int = 64
    rank_out: int | None = None
    block: int = 512
    fit: str = "divide"
    seed: int = 0
    core_init: str = "lstsq"
    compute: str = "auto"
    train_bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_ranks(self.rank, self.rank_out)
        check_choice("fit", self.fit, FITS)
        check_choice("core_init", self.core_init, CORE_INITS)
        check_choice("compute", self.compute, COMPUTES)

    def needs(self) -> set[str]:
        return {"input"}

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        """The core [r_out, r_in] (fp32) and bias train; the frame rows (and indices) are rebuilt buffers."""
        opts = dict(block=self.block, fit=self.fit, compute=self.compute, name=name)
        down = subframe_footprint(module.in_features, self.rank, side="input", **opts)
        up = subframe_footprint(module.out_features, self.rank_out or self.rank, side="output", **opts)
        return core_footprint(down, up, module, self.train_bias)

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None,
              plan: Plan = NO_PLAN) -> BlockwisePHDLinear:
        W = module.weight
        M = second_moment(stats, name)
        opts = dict(block=self.block, fit=self.fit, seed=self.seed, compute=self.compute, name=name)
        down = phd_subframe(module.in_features, self.rank, lambda f: input_energy(W, f, M), side="input", **opts)
        up = phd_subframe(module.out_features, self.rank_out or self.rank,
                          lambda f: frame_energy(f, output_moment(W, M)), side="output", **opts)
        core = init_core(W, M, down.rows, up.rows, self.core_init)
        layer = BlockwisePHDLinear(down, core, up, getattr(module, "bias", None), self.train_bias)
        return layer.to(W.device, W.dtype)
