"""The low-rank layer every low-rank technique builds (ZOMBORG, source 000, sections 2.1 and 2.4: a rank-r map
whose singular values are repaired), its footprint, the closed-form refit of its left factor, and the report of
a student's ranks; and the row Fisher collector (``fisher``: FWSVD's weighting, source 000 4.1), read as
``stats.fisher_rows``.

``FisherSVDLinear``: y = U diag(sigma) V^T x + b. Forward: ``((x @ V) * sigma.float()).to(x.dtype) @ U.T + bias``
— matmuls in the input dtype, the diagonal scale in fp32. Sigma (and bias) train by default; ``train_factors``
also trains U and V; ``factor_lora=k`` reads U and V as ``U + B_U A_U`` and ``V + B_V A_V`` with rank-k
corrections (B zero at the start), merged on export. ``zoo.FisherSVD`` and ``zoo.KFACSVD`` differ only in how
they weight the SVD whose truncated factors ``low_rank_layer`` turns into this layer.

``factor_bits=b`` stores the factors on a b-bit grid instead (``QuantizedFactorsLinear``; issue 25's "low-rank
techniques can store their factors quantized"): sigma is folded into the first factor, ``down = diag(sigma) V^T``
[r, in] (a per-row scale, which each row's group scales absorb, so it costs no rounding error), ``up = U``
[out, r]; each is a ``zoo.core.lowbit.QuantizedLinear`` with groups of ``factor_group`` along its input.
``down`` is rounded by GPTQ through the calibration's E[x x^T] (to nearest without it), then ``up`` by GPTQ
through the moment of ``down``'s dequantized output, so the second rounding sees the first one's error. The
codes are frozen; the group scales (fp32, read as fp16 like ``zoo.Quantize``'s) and the bias train.
"""
from __future__ import annotations

import torch
from torch import nn

from .calibration import ActivationStats
from .collectors import Collector, register_collector
from ..export.spec import nested
from .errors import ZooError
from .linalg import refit_left, rms
from .lowbit import Grid, QuantizedLinear, dequantize, gptq, grid_params, quantize
from .replacement import Replacement
from .surgery import replaced_modules
from .technique import TensorSize


class FisherSVDLinear(Replacement):
    """y = U diag(sigma) V^T x + b, sigma kept in fp32 (also when the model is cast to bf16)."""

    fp32_params = ("sigma",)

    def __init__(self, U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                 train_factors: bool = False, factor_lora: int = 0):
        super().__init__()
        self.in_features, self.out_features = V.shape[0], U.shape[0]
        self.U = nn.Parameter(U, requires_grad=train_factors)  # [out, r]
        self.V = nn.Parameter(V, requires_grad=train_factors)  # [in, r]
        self.sigma = nn.Parameter(sigma.float())  # [r], fp32 whatever the model's dtype
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        # Adafactor-style relative step: each tensor's lr is scaled by its initial RMS, so one lr
        # means the same relative change for a layer whose singular values are 1e-3 or 10
        self.lr_scales = {n: rms(p) for n, p in self.named_parameters()}
        self.factor_lora = factor_lora_rank(factor_lora, self.rank)
        if self.factor_lora:
            r, k = self.rank, self.factor_lora
            for f, factor in (("U", U), ("V", V)):
                # A: orthonormal rows, so no direction of the rank space is favoured; B: zero, so dW = 0 at start
                A = torch.linalg.qr(torch.randn(r, k, dtype=torch.float64)).Q.T.to(factor.dtype).to(factor.device)
                setattr(self, f"{f}_lora_A", nn.Parameter(A.contiguous()))  # [k, r]
                setattr(self, f"{f}_lora_B", nn.Parameter(torch.zeros(factor.shape[0], k, dtype=factor.dtype,
                                                                      device=factor.device)))  # [out or in, k]
                # a step of B moves the factor by about lr x its own RMS (B A sums k terms of size 1/sqrt(r))
                self.lr_scales[f"{f}_lora_A"] = rms(A)
                self.lr_scales[f"{f}_lora_B"] = rms(factor) * (r / k) ** 0.5

    @property
    def rank(self) -> int:
        return self.sigma.numel()

    def factor(self, name: str) -> torch.Tensor:
        """U or V as the forward reads it: with ``factor_lora``, plus its trained correction."""
        base = getattr(self, name)
        if not self.factor_lora:
            return base
        return base + getattr(self, f"{name}_lora_B") @ getattr(self, f"{name}_lora_A")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the matmuls run in the input dtype (autocast picks bf16 under bf16-mixed); the diagonal
        # scale runs in fp32 and the result goes back to the matmul dtype. LoRA corrections are applied as
        # their own rank-k products, which cost less than re-forming U + B A and V + B A at every step
        h = x @ self.V.to(x.dtype)
        if self.factor_lora:
            h = h + (x @ self.V_lora_B.to(x.dtype)) @ self.V_lora_A.to(x.dtype)
        h = (h.float() * self.sigma.float()).to(h.dtype)
        y = h @ self.U.T.to(h.dtype)
        if self.factor_lora:
            y = y + (h @ self.U_lora_A.T.to(h.dtype)) @ self.U_lora_B.T.to(h.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        return (self.factor("U").double() * self.sigma.double()) @ self.factor("V").double().T

    def export_spec(self) -> dict:
        """The forward above in ``zoo.export`` ops (issue 15): U and V in the model dtype, sigma fp32."""
        program = [{"op": "matmul", "t": "V"}, {"op": "scale", "t": "sigma"}, {"op": "matmul", "t": "U", "transpose": True}]
        tensors = {"V": "model", "sigma": "float32", "U": "model"}
        if self.bias is not None:
            program.append({"op": "add", "t": "bias"})
            tensors["bias"] = "model"
        return {"program": program, "tensors": tensors, "ranks": {"rank": self.rank}}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """U and V merged with their LoRA corrections: the exported map is the plain rank-r one."""
        return {"V": self.factor("V"), "sigma": self.sigma, "U": self.factor("U"),
                **({"bias": self.bias} if self.bias is not None else {})}

    def extra_repr(self) -> str:
        lora = f", factor_lora={self.factor_lora}" if self.factor_lora else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{lora}"


def factor_lora_rank(k: int, rank: int) -> int:
    """The LoRA rank of the factors of a rank-``rank`` map: ``k``, at most ``rank`` (a correction of U [out, r]
    through more than r directions is no more expressive)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ZooError(f"factor_lora must be an int >= 0 (0: no LoRA on the factors), got {k!r}")
    return min(k, rank)


def rank_report(model: nn.Module) -> dict[str, float]:
    """Min, mean and max rank of the ``FisherSVDLinear`` maps of ``model`` per layer type (the last part of the
    module name, e.g. ``ranks/q_proj/mean``): what a frontier table shows of an allocation; and
    ``low_rank_maps`` and ``low_rank_parameters``, how many maps and what they export (``export_tensors``: the
    student's size under any allocation, where the plan only knows the uniform rank)."""
    by_type: dict[str, list[int]] = {}
    exported = 0
    for name, wrapper in replaced_modules(model).items():
        layer = wrapper.replacement
        if isinstance(layer, FisherSVDLinear):
            by_type.setdefault(name.rsplit(".", 1)[-1], []).append(layer.rank)
            exported += sum(t.numel() for t in layer.export_tensors().values())
    report = {f"ranks/{t}/{stat}": float(f(rs)) for t, rs in sorted(by_type.items())
              for stat, f in (("min", min), ("mean", lambda x: sum(x) / len(x)), ("max", max))}
    maps = sum(map(len, by_type.values()))
    return report | ({"low_rank_maps": maps, "low_rank_parameters": exported} if maps else {})


def linear_footprint(module: nn.Module, rank: int, train_factors: bool, factor_lora: int = 0, factor_bits: int = 0,
                     factor_group: int = 64) -> dict[str, TensorSize]:
    """The tensors of a rank-``rank`` ``FisherSVDLinear`` (``QuantizedFactorsLinear`` with ``factor_bits``)
    replacing ``module``."""
    if factor_bits:
        return quantized_footprint(module, rank, factor_bits, factor_group)
    out_f, in_f = module.out_features, module.in_features
    factors = "trainable" if train_factors else "frozen"
    sizes = {"U": TensorSize((out_f, rank), factors), "sigma": TensorSize((rank,), "trainable", "float32"),
             "V": TensorSize((in_f, rank), factors)}
    k = factor_lora_rank(factor_lora, rank)
    if k:
        for f, rows in (("U", out_f), ("V", in_f)):
            sizes[f"{f}_lora_A"] = TensorSize((k, rank), "trainable", exported=False)  # merged into the factor
            sizes[f"{f}_lora_B"] = TensorSize((rows, k), "trainable", exported=False)
    if getattr(module, "bias", None) is not None:
        sizes["bias"] = TensorSize((out_f,))
    return sizes


def refit_factors(weight: torch.Tensor, V: torch.Tensor, stats: ActivationStats | None, name: str = ""
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, sigma) of the closed-form refit ``refit_left`` with V fixed: sigma the column norms of the refit B
    (unit columns of U, as a truncated SVD gives them), on the student's inputs and, where calibration
    measured it, the cross moment with the teacher's."""
    if stats is None:
        raise ZooError(f"refit of {name} needs calibration statistics")
    moment = stats.second_moment if stats.second_moment is not None else stats.diag
    cross = stats.extra.get("cross.second_moment")
    if cross is None and stats.second_moment is None:
        cross = stats.extra.get("cross.diag")
    B = refit_left(weight, V, moment, cross)
    sigma = B.norm(dim=0).clamp_min(1e-30)
    return B / sigma, sigma


def low_rank_layer(module: nn.Module, U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor,
                   stats: ActivationStats | None, refit: bool, train_factors: bool, name: str = "",
                   factor_lora: int = 0, factor_bits: int = 0, factor_group: int = 64) -> nn.Module:
    """The ``FisherSVDLinear`` replacing ``module`` from truncated factors (refit first with ``refit``), with
    the module's bias, in its dtype and on its device: the one builder of every low-rank technique's layer, so
    each gets the refit, the repair modes (``train_factors``, ``factor_lora``) and ``factor_bits`` (then a
    ``QuantizedFactorsLinear``)."""
    weight = module.weight
    if refit:
        U, sigma = refit_factors(weight, V, stats, name)
    bias = getattr(module, "bias", None)
    if factor_bits:
        moment = None
        if stats is not None:
            moment = (stats.second_moment if stats.second_moment is not None else stats.diag).to(U.device)
        layer = quantized_factors(U, sigma, V, factor_bits, factor_group, moment,
                                  None if bias is None else bias.detach())
        return layer.to(weight.device, weight.dtype)
    layer = FisherSVDLinear(U.to(weight.dtype), sigma, V.to(weight.dtype), None if bias is None else bias.detach(),
                            train_factors, factor_lora)
    return layer.to(weight.device)


def low_rank_from_state(module: nn.Module, tensors: dict[str, torch.Tensor], train_factors: bool, factor_lora: int,
                        factor_bits: int) -> FisherSVDLinear | None:
    """The ``FisherSVDLinear`` a repair state alone rebuilds: one that trained its factors (``train_factors``, no
    ``factor_lora`` or ``factor_bits``) holds U, V, sigma and the bias, every tensor of the layer, so no
    calibration or factorization is needed; None otherwise (frozen factors come from calibration). The layer's
    ``lr_scales`` are then those of the state's tensors: fit for evaluating and exporting, not for going on
    training from it."""
    bias = getattr(module, "bias", None)
    need = {"U", "V", "sigma"} | ({"bias"} if bias is not None else set())
    if not train_factors or factor_lora or factor_bits or not need <= tensors.keys():
        return None
    weight = module.weight
    layer = FisherSVDLinear(tensors["U"].to(weight.dtype), tensors["sigma"], tensors["V"].to(weight.dtype),
                            tensors["bias"].to(weight.dtype) if bias is not None else None, train_factors=True)
    return layer.to(weight.device)


class QuantizedFactorsLinear(Replacement):
    """y = up(down(x)) + b: the rank-r map with its factors on low-bit grids (see the module docstring)."""

    def __init__(self, down: QuantizedLinear, up: QuantizedLinear, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = down.in_features, up.out_features
        self.down, self.up = down, up
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        self.lr_scales = {"bias": rms(self.bias)} if bias is not None else {}

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        return self.up.dense_weight() @ self.down.dense_weight()

    def export_spec(self) -> dict:
        """Two ``qmatmul`` ops (the first with sigma folded in), then the bias."""
        down, up = nested("down_", self.down)[0], nested("up_", self.up)[0]
        program, tensors = down["program"] + up["program"], {**down["tensors"], **up["tensors"]}
        if self.bias is not None:
            program.append({"op": "add", "t": "bias"})
            tensors["bias"] = "model"
        g = self.down.grid
        return {"program": program, "tensors": tensors, "ranks": {"rank": self.rank, "bits": g.bits, "group": g.group}}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {**nested("down_", self.down)[1], **nested("up_", self.up)[1],
                **({"bias": self.bias} if self.bias is not None else {})}

    def extra_repr(self) -> str:
        g = self.down.grid
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bits={g.bits}"


def check_factor_bits(bits: int, group: int, train_factors: bool, factor_lora: int) -> None:
    """``factor_bits`` (0: full-precision factors) and ``factor_group`` of a low-rank spec, and the repair modes
    they exclude: quantized factors are frozen codes, so neither ``train_factors`` nor ``factor_lora`` applies."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        raise ZooError(f"factor_group must be an int >= 0 (0: one scale per factor row), got {group!r}")
    if not bits:
        return
    Grid(bits, 1)  # validates bits
    if train_factors or factor_lora:
        raise ZooError("factor_bits stores the factors as frozen low-bit codes (their group scales train): "
                       "it excludes train_factors and factor_lora")


def factor_grid(bits: int, group: int, width: int) -> Grid:
    """The grid of a factor with ``width`` inputs: groups of ``group`` (0, or more than the width: the whole row)."""
    return Grid(bits, min(group or width, width))


def _on_grid(W: torch.Tensor, grid: Grid, moment: torch.Tensor | None) -> QuantizedLinear:
    """``W`` [out, in] (fp64) as a ``QuantizedLinear``: GPTQ through ``moment`` (E[x x^T] of its inputs), else
    rounded to nearest; the scales rounded to fp16 from the start, as the export stores them."""
    if moment is not None:
        codes, scales, zeros = gptq(W, moment, grid)
    else:
        scales, zeros = grid_params(W, grid)
        codes = quantize(W, scales, zeros, grid)
    return QuantizedLinear(codes, scales.half().float(), zeros, grid)


def quantized_factors(U: torch.Tensor, sigma: torch.Tensor, V: torch.Tensor, bits: int, group: int,
                      moment: torch.Tensor | None, bias: torch.Tensor | None = None) -> QuantizedFactorsLinear:
    """The ``QuantizedFactorsLinear`` of ``U diag(sigma) V^T`` (``moment``: the full or diagonal E[x x^T] of its
    inputs, fp64 on the factors' device; None rounds both factors to nearest)."""
    down_W = sigma.double()[:, None] * V.double().T  # [r, in]
    if moment is not None and moment.dim() == 1:
        moment = torch.diag(moment)
    down = _on_grid(down_W, factor_grid(bits, group, down_W.shape[1]), moment)
    mid = None
    if moment is not None:
        D = dequantize(down.codes, down.scales.double(), down.zeros, down.grid)
        mid = D @ moment.double() @ D.T
    up = _on_grid(U.double(), factor_grid(bits, group, U.shape[1]), mid)
    return QuantizedFactorsLinear(down, up, bias)


def quantized_footprint(module: nn.Module, rank: int, bits: int, group: int) -> dict[str, TensorSize]:
    """The tensors of a rank-``rank`` ``QuantizedFactorsLinear`` replacing ``module``."""
    sizes = {}
    for f, rows, width in (("down", rank, module.in_features), ("up", module.out_features, rank)):
        G = factor_grid(bits, group, width).groups(width)
        sizes |= {f"{f}.codes": TensorSize((rows, width), "buffer", "uint8"),
                  f"{f}.zeros": TensorSize((rows, G), "buffer", "uint8"),
                  f"{f}.scales": TensorSize((rows, G), "trainable", "float32")}
    if getattr(module, "bias", None) is not None:
        sizes["bias"] = TensorSize((module.out_features,))
    return sizes


@register_collector
class FisherRows(Collector):
    """FWSVD's row Fisher: per weight row, the squared gradient of the next-token loss summed over batches
    (``stats.extra["fisher.rows"]``, also ``stats.fisher_rows``)."""

    name, stream = "fisher", None
    backward = True

    def __init__(self, module, device):
        super().__init__(module, device)
        self.fisher = torch.zeros(module.out_features, dtype=torch.float64, device=device)

    def after_backward(self) -> None:
        self.fisher += self.module.weight.grad.detach().double().pow(2).sum(1).to(self.fisher.device)

    def sums(self):
        return [self.fisher]

    def result(self):
        return {"rows": self.fisher.cpu()}
