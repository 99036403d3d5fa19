"""TASE: a top-k sparse expanded interface, and its composed use in a coupled PHD block (source 000,
section 4.9, phase 51, and the note after the abstract). The near-identity diagnostic that trains one
on the residual stream, ``TASEDiagnostic``, is ``zoo.tase_diagnostic`` (importable from here too).

For an interface activation x (width d)::

    z = TopK_k(ReLU(W_e (x - b) + c))      width m, at most k non-zeros per token
    x_hat = W_d z + b                       back in x's coordinates

``TASEInterface`` is that map (a plain ``nn.Module``). Its two initializations:

- ``identity``: W_e = [Q; -Q], W_d = W_e^T, c = 0, for Q [m/2, d] with orthonormal columns (needs
  m >= 2d). Each pair of features carries ReLU(q.u) and ReLU(-q.u), whose difference is q.u, so
  W_d z = Q^T Q (x - b) = x - b: the interface is exactly the identity for every k >= m/2 (at most m/2
  features are positive), and only loses what TopK drops below that.
- ``random``: the plain sparse-autoencoder start: W_e with random unit-norm rows, W_d = (2d/m) W_e^T
  (tied, at the scale where the expected reconstruction of the dense ReLU code is x), c = 0, b = the
  data mean. Nothing about it is near identity, so a run from it measures whether
  training *reaches* identity — the number the source reports (k = m: d_id_mean 0.034 by step 200).

Composed use (``TASECoupledCore``): a coupled PHD core whose residual-side coordinates (the r shared
frame coordinates each core writes into) pass through an identity-initialized ``TASEInterface`` of width
``expansion * r`` instead of a shim beside the core: expand, sparsify, and decode back into the
structured substrate's coordinates. Its d_id per layer is tracked over each validation epoch
(``tase_d_id/<target>``, ``tase_d_id_max``) like shim dominance.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .core.calibration import ActivationStats
from .core.errors import ZooError, check_choice
from .core.linalg import rms
from .core.metrics import IdentityDeviation
from .core.registry import register
from .core.replacement import Replacement
from .core.seeds import derive_seed, generator
from .core.technique import NO_PLAN, Plan, TensorSize
from .coupled import CoupledCore
from .export.spec import nested
from .core.subframes import BlockwisePHDLinear

INITS = ("random", "identity")
LOSSES = ("relative", "mse")
_WIDTH = re.compile(r"^\s*(\d+)\s*d\s*$")
_K = re.compile(r"^\s*m\s*(?:/\s*(\d+))?\s*$")


# ---- the interface ---------------------------------------------------------------------------------

def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """TopK_k(ReLU(pre)) over the last dimension: the k largest entries of ReLU(pre) per token, the
    rest zero (so at most k non-zeros; exactly k where at least k entries are positive)."""
    a = F.relu(pre)
    if k >= a.shape[-1]:
        return a
    values, index = a.topk(k, dim=-1)
    return torch.zeros_like(a).scatter(-1, index, values)


def resolve_width(width: int | str, d: int) -> int:
    """m from an int or ``"<N>d"`` (N times the interface width d)."""
    if isinstance(width, str):
        match = _WIDTH.match(width)
        if match is None:
            raise ZooError(f"width {width!r} is not an int or '<N>d' (e.g. '4d' = 4 x the residual width)")
        width = int(match.group(1)) * d
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ZooError(f"width must be a positive int or '<N>d', got {width!r}")
    return width


def resolve_k(k: int | str, m: int) -> int:
    """k from an int or ``"m"`` / ``"m/<N>"`` (the width m, or m divided by N)."""
    if isinstance(k, str):
        match = _K.match(k)
        if match is None:
            raise ZooError(f"k {k!r} is not an int, 'm' or 'm/<N>' (e.g. 'm/4')")
        divisor = int(match.group(1) or 1)
        if divisor < 1 or m // divisor < 1:
            raise ZooError(f"k {k!r} leaves no feature of the m={m} wide interface")
        k = m // divisor
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
        raise ZooError(f"k must be between 1 and the width m={m}, got {k!r}")
    return k


class TASEInterface(Replacement):
    """x -> W_d TopK_k(ReLU(W_e (x - b) + c)) + b, width d -> m -> d (parameters kept in fp32).

    Args:
        d: interface width (the activations' last dimension).
        m: expanded width.
        k: active features per token (default: m, no sparsity).
        init: ``identity`` (exact identity for k >= m/2; needs m >= 2d) or ``random`` (tied SAE start).
        seed: seeds the random directions.
        center: initial b (e.g. the data mean; default zero).
        scale: typical size of one coordinate of x - b: sets the relative learning-rate scales of b and c.
    """

    affine = False  # the top-k code

    fp32_params = ("W_e", "c", "W_d", "b")

    def __init__(self, d: int, m: int, k: int | None = None, init: str = "random", seed: int = 0,
                 center: torch.Tensor | None = None, scale: float = 1.0):
        super().__init__()
        check_choice("init", init, INITS)
        if d < 1 or m < 1:
            raise ZooError(f"TASE widths must be positive, got d={d}, m={m}")
        k = m if k is None else k
        if not 1 <= k <= m:
            raise ZooError(f"k={k} must be between 1 and m={m}")
        self.d, self.m, self.k, self.init = d, m, k, init
        g = generator(seed)
        if init == "identity":
            if m < 2 * d:
                raise ZooError(f"the identity initialization pairs +q and -q features: it needs m >= 2d, "
                               f"got m={m}, d={d}")
            Q = torch.linalg.qr(torch.randn(m // 2, d, generator=g, dtype=torch.float64))[0]  # [m/2, d]
            W_e = torch.cat([Q, -Q, Q.new_zeros(m % 2, d)])
        else:
            W_e = torch.randn(m, d, generator=g, dtype=torch.float64)
            W_e = W_e / W_e.norm(dim=1, keepdim=True)
        self.W_e = nn.Parameter(W_e.float())
        self.c = nn.Parameter(torch.zeros(m))
        # tied; for random unit rows E[W_e^T ReLU(W_e u)] ~ (m / 2d) u, so 2d/m puts the start at the right scale
        W_d = W_e.T if init == "identity" else W_e.T * (2 * d / m)
        self.W_d = nn.Parameter(W_d.contiguous().float())
        b = torch.zeros(d) if center is None else center.detach().float().reshape(d).clone()
        self.b = nn.Parameter(b)
        self.rescale(scale)

    def rescale(self, scale: float) -> None:
        """Relative learning-rate scales (``DistillationModule.lr_scales``): each matrix by its RMS, b by
        the coordinate scale of x, c by the pre-activation scale (row norm of W_e times that)."""
        row = float(self.W_e.detach().norm(dim=1).mean()) or 1.0
        self.lr_scales = {"W_e": rms(self.W_e), "W_d": rms(self.W_d), "b": scale, "c": row * scale}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b.to(x.dtype)) @ self.W_e.T.to(x.dtype) + self.c.to(x.dtype)
        return topk_relu(pre, self.k)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_d.T.to(z.dtype) + self.b.to(z.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def export_spec(self) -> dict:
        """encode then decode in ``zoo.export`` ops (all four tensors fp32)."""
        program = [{"op": "add", "t": "b", "alpha": -1.0}, {"op": "matmul", "t": "W_e", "transpose": True},
                   {"op": "add", "t": "c"}, {"op": "topk_relu", "k": self.k},
                   {"op": "matmul", "t": "W_d", "transpose": True}, {"op": "add", "t": "b"}]
        return {"program": program, "tensors": dict.fromkeys(("W_e", "c", "W_d", "b"), "float32"),
                "ranks": {"d": self.d, "m": self.m, "k": self.k}}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"W_e": self.W_e, "c": self.c, "W_d": self.W_d, "b": self.b}

    def extra_repr(self) -> str:
        return f"d={self.d}, m={self.m}, k={self.k}, init={self.init}"


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "relative") -> torch.Tensor:
    """``relative``: mean over tokens of ||x_hat - x||^2 / ||x||^2 (d_id^2, the gated quantity);
    ``mse``: mean over tokens of ||x_hat - x||^2 / d (dominated by the loudest coordinates)."""
    err = (x_hat.float() - x.float()).pow(2).sum(-1)
    if kind == "mse":
        return err.mean() / x.shape[-1]
    return (err / x.float().pow(2).sum(-1).clamp_min(1e-12)).mean()


# ---- composed use: TASE interfaces in a coupled PHD block instead of shims --------------------------

class TASEConnectedLinear(Replacement):
    """A PHD core whose residual-side coordinates pass through a ``TASEInterface``: for the output side
    y = up(TASE(C down(x))) + bias, for the input side y = up(C TASE(down(x))) + bias. While
    ``tracking`` (validation epochs) it accumulates the interface's d_id on those coordinates."""

    SIDES = ("output", "input")

    def __init__(self, layer: BlockwisePHDLinear, interface: TASEInterface, side: str = "output"):
        super().__init__()
        self.layer, self.interface = layer, interface
        self.side = check_choice("side", side, self.SIDES)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.deviation = IdentityDeviation("mean")
        self.tracking = False

    def _interface(self, u: torch.Tensor) -> torch.Tensor:
        v = self.interface(u)
        if self.tracking:
            self.deviation.update(v, u)
        return v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        u = layer.down.down(x)
        if self.side == "input":
            u = self._interface(u)
        h = u @ layer.core.T.to(u.dtype)
        if self.side == "output":
            h = self._interface(h)
        y = layer.up.up(h)
        return y + layer.bias.to(y.dtype) if layer.bias is not None else y

    def metrics(self) -> dict[str, IdentityDeviation]:
        return {"tase_d_id": self.deviation}

    def _export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        # the interface runs on the core's residual side: after the core (output) or before it (input)
        interface, tensors = nested("tase_", self.interface)
        if self.side == "output":
            spec, own = self.layer.export_parts(interface["program"])
        else:
            spec, own = self.layer.export_parts()
            at = next(i for i, op in enumerate(spec["program"]) if op.get("t") == "core")
            spec["program"][at:at] = interface["program"]
        spec["tensors"] |= interface["tensors"]
        spec["ranks"] |= {f"tase_{k}": v for k, v in interface["ranks"].items()} | {"tase_side": self.side}
        return spec, own | tensors

    def export_spec(self) -> dict:
        return self._export()[0]

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return self._export()[1]


@register("tase_coupled_core", version=1)
@dataclass(eq=False, repr=False)
class TASECoupledCore(CoupledCore):
    """Spec: ``zoo.CoupledCore`` (no shims) with a TASE interface on each core's residual-side coordinates
    (the r coordinates of the shared frame): width ``expansion * r``, ``k`` active features, identity
    initialization by default, so the student starts as the plain coupled core.

    Args:
        targets, rank, rank_out, residual_side, residual_frame, align, block, fit, seed, core_init,
            compute, train_bias: see ``zoo.CoupledCore``.
        expansion: m = expansion * r.
        k: active features: an int, ``"m"`` or ``"m/<N>"``.
        tase_init: ``identity`` or ``random``.
    """

    shim_rank: int = field(default=0, init=False)  # the interface is the connector: no shims
    shim_train: str = field(default="both", init=False)
    expansion: int = 4
    k: int | str = "m"
    tase_init: str = "identity"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.expansion, bool) or not isinstance(self.expansion, int) or self.expansion < 1:
            raise ZooError(f"expansion must be a positive int, got {self.expansion!r}")
        check_choice("tase_init", self.tase_init, INITS)
        resolve_k(self.k, self.expansion * (self.rank_out or self.rank))  # a bad k fails here, not after calibration

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        """``CoupledCore``'s layer under ``layer.``, plus the interface's W_e [m, r], c [m], W_d [r, m] and
        b [r] (fp32, trainable) under ``interface.``."""
        r = self.rank_out or self.rank
        m = self.expansion * r
        sizes = {f"layer.{k}": v for k, v in super().footprint(name, module).items()}
        return sizes | {f"interface.{k}": TensorSize(shape, "trainable", "float32") for k, shape in
                        (("W_e", (m, r)), ("c", (m,)), ("W_d", (r, m)), ("b", (r,)))}

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None, plan: Plan = NO_PLAN) -> nn.Module:
        layer = super().build(name, module, stats, plan)
        r = self.rank_out or self.rank
        m = self.expansion * r
        interface = TASEInterface(r, m, resolve_k(self.k, m), self.tase_init, derive_seed(self.seed, name, "tase"),
                                  scale=rms(layer.core))
        return TASEConnectedLinear(layer, interface, self.residual_side).to(module.weight.device)
