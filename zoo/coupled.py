"""Coupled cores with shims over a contiguous layer range (source 000, sections 4.7-4.9 and 5.2; 002 on
coupling by activations, not weights; 003 on orthogonal Procrustes alignment).

Every target of the range is a ``BlockwisePHDLinear`` (``zoo.phd``) whose residual-stream side is
*shared*: all the layers write into (or, with ``residual_side: input``, read from) the same r
coordinates of one frame, so layer l's output subspace is the subspace layer l+1's replacement also
works in. The shared frame is computed from the activations at the interfaces of the whole range —
the pooled second moment ``sum_l Omega_l / tr(Omega_l)`` of what the targets write to the residual
stream (Omega_l = W_l M_l W_l^T; their inputs M_l for the input side) — never from the weights (002:
weight-space coupling improves reconstruction and hurts perplexity):

- ``residual_frame: pca``: the top-r eigenvectors of the pooled moment (a dense orthonormal frame);
- ``residual_frame: phd``: one PHD frame for the range, keeping the r coordinates of highest pooled
  energy (structured; nothing stored).

``align: true`` (pca only) gives each layer its own best subspace (top-r eigenvectors E_l of its
Omega_l) expressed in the shared coordinates by the orthogonal Procrustes rotation R_l = argmin
||E_l R - E||: the coordinates are common while each layer keeps the subspace it writes to (003).
The private side of each target (the MLP side of a down-projection) is its own PHD frame as in
``BlockwisePHD``; each core starts at the least-squares optimum for its two frames.

Shims (``shim_rank`` > 0) add a low-rank connector beside each core, y = core(x) + B A x, with B = 0 at
the start so the shimmed student equals the unshimmed one. ``shim_train`` picks what trains: ``both``,
``A`` (B frozen: it starts random-orthonormal, A at zero) or ``B`` (A frozen: random-orthonormal, B at
zero). Shim dominance ||shim(x)|| / ||core(x)|| is tracked per layer over each validation epoch
(``callbacks.ShimDominanceGate`` keeps it at or below a bound: the core must do the work, a shim that
takes over is a hidden LoRA).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from .core.calibration import ActivationStats
from .core.errors import ZooError, check_choice
from .core.hadamard import FITS, PHDFrame
from .core.linalg import procrustes, rms
from .core.metrics import NormRatio
from .core.registry import register
from .core.replacement import Replacement
from .core.seeds import derive_seed, generator
from .core.subframes import (COMPUTES, CORE_INITS, BlockwisePHDLinear, Subframe, check_ranks, core_footprint,
                             frame_energy, init_core, input_energy, output_moment, phd_subframe, resolve_compute,
                             second_moment, subframe_footprint, top_index)
from .core.technique import NO_PLAN, Plan, Technique, TensorSize
from .export.spec import nested

log = logging.getLogger(__name__)

RESIDUAL_SIDES = ("output", "input")
RESIDUAL_FRAMES = ("pca", "phd")
SHIM_TRAIN = ("both", "A", "B")
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class Shim(Replacement):
    """A low-rank connector x -> B A x (A [r, in], B [out, r]), kept in fp32, starting at zero output.

    The factor that starts at zero is always a trainable one; the other is random with orthonormal
    rows (A) or columns (B), drawn from ``seed``. ``scale`` is the size of a weight of the layer the
    shim sits beside (the RMS of the original W): the factors' relative learning-rate scales are the
    magnitudes at which the shim's output would match that layer's.
    """

    fp32_params = ("A", "B")

    def __init__(self, in_features: int, out_features: int, rank: int, train: str = "both", seed: int = 0,
                 scale: float = 1.0):
        super().__init__()
        check_choice("shim_train", train, SHIM_TRAIN)
        if not 1 <= rank <= min(in_features, out_features):
            raise ZooError(f"shim rank {rank} is out of range: it must be between 1 and "
                           f"min(in={in_features}, out={out_features})")
        g = generator(seed)
        A = torch.linalg.qr(torch.randn(in_features, rank, generator=g, dtype=torch.float64))[0].T
        B = torch.linalg.qr(torch.randn(out_features, rank, generator=g, dtype=torch.float64))[0]
        if train == "A":
            A = torch.zeros_like(A)
        else:
            B = torch.zeros_like(B)
        self.A = nn.Parameter(A.float(), requires_grad=train in ("both", "A"))
        self.B = nn.Parameter(B.float(), requires_grad=train in ("both", "B"))
        self.train_factors = train
        # W x has entries ~ rms(W) |x| sqrt(in); B (A x) matches that when B ~ rms(W) sqrt(in / r)
        # (A orthonormal), or A ~ rms(W) sqrt(out / r) (B orthonormal)
        self.lr_scales = {
            "A": scale * (out_features / rank) ** 0.5 if train == "A" else rms(self.A),
            "B": scale * (in_features / rank) ** 0.5,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.T.to(x.dtype)) @ self.B.T.to(x.dtype)

    def export_spec(self) -> dict:
        return {"program": [{"op": "matmul", "t": "A", "transpose": True}, {"op": "matmul", "t": "B", "transpose": True}],
                "tensors": {"A": "float32", "B": "float32"}, "ranks": {"shim_rank": self.A.shape[0]}}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A, "B": self.B}

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, train={self.train_factors}"


class ShimmedLinear(Replacement):
    """y = core(x) + shim(x); while ``tracking`` (validation epochs) it accumulates shim dominance."""

    def __init__(self, core: nn.Module, shim: Shim):
        super().__init__()
        self.core, self.shim = core, shim
        self.in_features = getattr(core, "in_features", None)
        self.out_features = getattr(core, "out_features", None)
        self.dominance = NormRatio()
        self.tracking = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y_core, y_shim = self.core(x), self.shim(x)
        if self.tracking:
            self.dominance.update(y_shim, y_core)
        return y_core + y_shim

    def metrics(self) -> dict[str, NormRatio]:
        return {"shim_dominance": self.dominance}

    def dense_weight(self) -> torch.Tensor:
        return self.core.dense_weight() + self.shim.B.double() @ self.shim.A.double()

    def export_spec(self) -> dict:
        """core(x) + shim(x): a sum of the two programs."""
        core, shim = nested("core_", self.core)[0], nested("shim_", self.shim)[0]
        return {"program": [{"op": "sum", "branches": [core["program"], shim["program"]]}],
                "tensors": core["tensors"] | shim["tensors"], "ranks": core.get("ranks", {}) | shim["ranks"]}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return nested("core_", self.core)[1] | nested("shim_", self.shim)[1]


def layer_index(name: str) -> int:
    match = LAYER_INDEX.search(name)
    if match is None:
        raise ZooError(f"coupled cores need targets inside numbered layers ('...layers.N....'); {name!r} is not")
    return int(match.group(1))


def leading_eigenvectors(moment: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors [n, r] of a symmetric PSD matrix (fp64), each with its largest entry positive
    so that the result is deterministic."""
    values, vectors = torch.linalg.eigh(moment.double())
    top = vectors[:, torch.argsort(values, descending=True)[:r]]
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    return top * signs


@register("coupled_core", version=1)
@dataclass(eq=False, repr=False)
class CoupledCore(Technique):
    """Spec: PHD cores over a contiguous layer range sharing one residual-side frame, optionally
    Procrustes-aligned per layer, optionally with shims.

    Args:
        targets: module name patterns over a contiguous layer range, e.g.
            ``model.layers.{14..21}.mlp.down_proj``.
        rank: r of the private side (the input of a down-projection).
        rank_out: r of the residual side, shared by the range (default: ``rank``).
        residual_side: which side of each target is the residual stream: ``output`` (down_proj,
            o_proj) or ``input`` (up/gate/q/k/v projections).
        residual_frame: ``pca`` (eigenvectors of the pooled interface moment) or ``phd`` (one PHD frame,
            coordinates of highest pooled energy).
        align: per-layer orthogonal Procrustes alignment of each layer's own top-r subspace to the
            shared coordinates (``pca`` only).
        shim_rank: rank r_s of a shim beside each core (0: no shims).
        shim_train: ``both``, ``A`` or ``B``: which shim factors train.
        block, fit, seed, core_init, compute, train_bias: as in ``zoo.BlockwisePHD``.
    """

    targets: str | list[str]
    rank: int = 64
    rank_out: int | None = None
    residual_side: str = "output"
    residual_frame: str = "pca"
    align: bool = False
    shim_rank: int = 0
    shim_train: str = "both"
    block: int = 512
    fit: str = "divide"
    seed: int = 0
    core_init: str = "lstsq"
    compute: str = "auto"
    train_bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_ranks(self.rank, self.rank_out)
        check_choice("residual_side", self.residual_side, RESIDUAL_SIDES)
        check_choice("residual_frame", self.residual_frame, RESIDUAL_FRAMES)
        if self.align and self.residual_frame != "pca":
            raise ZooError("align=True rotates each layer's own eigenbasis onto the shared one: it needs "
                           f"residual_frame='pca', not {self.residual_frame!r}")
        if isinstance(self.shim_rank, bool) or not isinstance(self.shim_rank, int) or self.shim_rank < 0:
            raise ZooError(f"shim_rank must be an int >= 0 (0: no shims), got {self.shim_rank!r}")
        check_choice("shim_train", self.shim_train, SHIM_TRAIN)
        check_choice("fit", self.fit, FITS)
        check_choice("core_init", self.core_init, CORE_INITS)
        check_choice("compute", self.compute, COMPUTES)

    def needs(self) -> set[str]:
        return {"input"}

    def _interface_moment(self, module: nn.Module, stats: ActivationStats | None, name: str) -> torch.Tensor:
        """What target ``name`` exchanges with the residual stream, as a second moment (full or diagonal)."""
        M = second_moment(stats, name)
        return output_moment(module.weight, M) if self.residual_side == "output" else M

    def plan(self, modules: dict[str, nn.Module], stats: dict[str, ActivationStats]) -> Plan:
        """The shared residual-side frame of the range (and each layer's aligned rows): {target: Subframe}."""
        if not modules:
            return NO_PLAN
        layers = sorted({layer_index(n) for n in modules})
        missing = sorted(set(range(layers[0], layers[-1] + 1)) - set(layers))
        if missing:
            raise ZooError(f"coupled targets must cover a contiguous layer range; {layers[0]}..{layers[-1]} "
                           f"lacks layer(s) {missing}")
        side = "out_features" if self.residual_side == "output" else "in_features"
        widths = {getattr(m, side) for m in modules.values()}
        if len(widths) != 1:
            raise ZooError(f"coupled targets must share one residual width on their {self.residual_side} side; "
                           f"got {sorted(widths)}")
        width = widths.pop()
        r = self.rank_out or self.rank
        if not 1 <= r <= width:
            raise ZooError(f"residual rank {r} is out of range: it must be between 1 and the residual width {width}")
        moments = {n: self._interface_moment(m, stats.get(n), n) for n, m in modules.items()}

        def full(M):  # a diagonal moment as a matrix, for pooling and eigenvectors
            return torch.diag(M) if M.dim() == 1 else M

        # each layer weighs the same, however loud its interface is
        pooled = sum(full(M) / full(M).diagonal().sum().clamp_min(1e-300) for M in moments.values())
        if self.residual_frame == "phd":
            frame = PHDFrame(width, self.block, derive_seed(self.seed, "coupled", *sorted(modules)), self.fit)
            if r > frame.n_pad:
                raise ZooError(f"residual rank {r} exceeds the frame width {frame.n_pad}")
            index = top_index(frame_energy(frame, pooled), r)
            shared = Subframe(frame.rows(index), frame, index, resolve_compute(self.compute, r, frame.block))
            log.info("coupled PHD residual frame over layers %d..%d: %d of %d coordinates", layers[0],
                     layers[-1], r, frame.n_pad)
            return Plan({n: shared for n in modules})
        E = leading_eigenvectors(pooled, r)  # [width, r]
        captured = float((E * (pooled @ E)).sum() / pooled.diagonal().sum())
        residual = {}
        for name in modules:
            rows = E.T
            if self.align:
                own = leading_eigenvectors(full(moments[name]), r)
                rows = (own @ procrustes(own, E)).T
            residual[name] = Subframe(rows)
        log.info("coupled PCA residual frame over layers %d..%d: rank %d captures %.1f%% of the pooled "
                 "interface energy%s", layers[0], layers[-1], r, 100 * captured,
                 " (Procrustes-aligned per layer)" if self.align else "")
        return Plan(residual)

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        """A ``BlockwisePHDLinear`` whose residual side is the shared frame (dense rows for ``pca``; rows,
        index and frame for ``phd``), plus the shim's A [r_s, in] and B [out, r_s] in fp32."""
        layer_index(name)
        opts = dict(block=self.block, fit=self.fit, compute=self.compute, name=name)
        width = module.out_features if self.residual_side == "output" else module.in_features
        r = self.rank_out or self.rank
        if not 1 <= r <= width:
            raise ZooError(f"residual rank {r} is out of range: it must be between 1 and the residual width {width}")
        residual = subframe_footprint(width, r, side="residual", indexed=self.residual_frame == "phd", **opts)
        if self.residual_side == "output":
            down = subframe_footprint(module.in_features, self.rank, side="input", **opts)
            up = residual
        else:
            down = residual
            up = subframe_footprint(module.out_features, self.rank, side="output", **opts)
        sizes = core_footprint(down, up, module, self.train_bias)
        if not self.shim_rank:
            return sizes
        if not 1 <= self.shim_rank <= min(module.in_features, module.out_features):
            raise ZooError(f"shim rank {self.shim_rank} is out of range: it must be between 1 and "
                           f"min(in={module.in_features}, out={module.out_features})")
        return {**{f"core.{k}": v for k, v in sizes.items()},
                "shim.A": TensorSize((self.shim_rank, module.in_features),
                                     "trainable" if self.shim_train in ("both", "A") else "frozen", "float32"),
                "shim.B": TensorSize((module.out_features, self.shim_rank),
                                     "trainable" if self.shim_train in ("both", "B") else "frozen", "float32")}

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None, plan: Plan = NO_PLAN) -> nn.Module:
        residual = plan.require(name, self)
        W = module.weight
        M = second_moment(stats, name)
        opts = dict(block=self.block, fit=self.fit, seed=self.seed, compute=self.compute, name=name)
        if self.residual_side == "output":
            down = phd_subframe(module.in_features, self.rank, lambda f: input_energy(W, f, M), side="input", **opts)
            up = residual
        else:
            down = residual
            up = phd_subframe(module.out_features, self.rank, lambda f: frame_energy(f, output_moment(W, M)),
                              side="output", **opts)
        core = init_core(W, M, down.rows, up.rows, self.core_init)
        layer = BlockwisePHDLinear(_own(down), core, _own(up), getattr(module, "bias", None), self.train_bias)
        if self.shim_rank:
            shim = Shim(module.in_features, module.out_features, self.shim_rank, self.shim_train,
                        derive_seed(self.seed, name, "shim"), rms(W))
            layer = ShimmedLinear(layer, shim)
        return layer.to(W.device, W.dtype)


def _own(subframe: Subframe) -> Subframe:
    """A per-layer copy of a shared subframe (so moving one layer's device or dtype moves only its own)."""
    copy = Subframe(subframe.rows, subframe.frame, subframe.index,
                    subframe.compute if subframe.frame is not None else "rows")
    return copy
