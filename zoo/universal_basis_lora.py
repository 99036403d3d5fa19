"""Coefficient-only adapters over a universal basis (WIZORB; source 001, sections 2.2, 4, 5, 6 phases 4-14:
step 4 of the pipeline). The bank, the basis, projection and controls are ``zoo.universal_basis``.

``UniversalBasisLoRA``: rows V = mu_A + c^A C_A, U = mu_B + c^B C_B; dW = U^T V; only c^A, c^B (r x k
each: 2 r k per module) train. In ``joint`` mode one c (r x k) drives both halves. ``UniversalBasis`` is
its spec: coefficient-only training is ``DistillationModule(parts=[UniversalBasis(...)],
objective="next_token")`` (or the distillation loss); repair states, targets and mixing work as for every
technique.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .core.errors import ZooError, check_choice
from .core.registry import register
from .core.replacement import Replacement
from .core.technique import NO_PLAN, Plan, Technique, TensorSize
from .export.spec import nested
from .universal_basis import CONTROLS, Projection, load_basis, project_adapter


# --------------------------------------------------------------------------------------------------
# step 4: the coefficient-only layer and its spec


class UniversalBasisLoRA(Replacement):
    """y = base(x) + dW x with dW = U^T V, V = mu_A + c^A C_A [r, in], U = mu_B + c^B C_B [r, out].

    Only the coefficients c^A, c^B ([r, k], fp32) train: 2 r k parameters (r k with ``tied``, the joint
    mode, where one c drives both halves). The basis and means are frozen buffers in the model's dtype.
    """

    def __init__(self, base: nn.Module, mean_A: torch.Tensor, components_A: torch.Tensor, mean_B: torch.Tensor,
                 components_B: torch.Tensor, rank: int, coef_A: torch.Tensor | None = None,
                 coef_B: torch.Tensor | None = None, tied: bool = False):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.in_features, self.out_features = mean_A.numel(), mean_B.numel()
        k = components_A.shape[0]
        if components_B.shape[0] != k:
            raise ZooError(f"UniversalBasisLoRA: {components_A.shape[0]} A components but {components_B.shape[0]} B")
        dtype = base.weight.dtype
        self.register_buffer("mean_A", mean_A.to(dtype), persistent=False)
        self.register_buffer("mean_B", mean_B.to(dtype), persistent=False)
        self.register_buffer("components_A", components_A.to(dtype), persistent=False)
        self.register_buffer("components_B", components_B.to(dtype), persistent=False)
        self.rank, self.k, self.tied = rank, k, tied
        self.coef_A = nn.Parameter(torch.zeros(rank, k) if coef_A is None else coef_A.detach().float().clone())
        if tied:
            self.coef_B = None
        else:
            self.coef_B = nn.Parameter(torch.zeros(rank, k) if coef_B is None else coef_B.detach().float().clone())
        for name, p in (("coef_A", self.coef_A), ("coef_B", self.coef_B)):
            if p is not None and p.shape != (rank, k):
                raise ZooError(f"UniversalBasisLoRA: {name} has shape {tuple(p.shape)}, expected ({rank}, {k})")

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V [r, in], U [r, out]) in fp32."""
        coef_B = self.coef_A if self.tied else self.coef_B
        V = self.mean_A.float() + self.coef_A @ self.components_A.float()
        U = self.mean_B.float() + coef_B @ self.components_B.float()
        return V, U

    def delta_weight(self) -> torch.Tensor:
        V, U = self.rows()
        return U.T @ V

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        V, U = self.rows()
        return self.base(x) + (x @ V.T.to(x.dtype)) @ U.to(x.dtype)

    def export_spec(self) -> dict:
        """base(x) + (x V^T) U, with V and U materialized from the coefficients (fp32, as ``rows`` makes them)."""
        base = nested("base_", self.base)[0]
        delta = [{"op": "matmul", "t": "V", "transpose": True}, {"op": "matmul", "t": "U"}]
        return {"program": [{"op": "sum", "branches": [base["program"], delta]}],
                "tensors": base["tensors"] | {"V": "float32", "U": "float32"}, "ranks": {"rank": self.rank, "k": self.k}}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        V, U = self.rows()
        return nested("base_", self.base)[1] | {"V": V, "U": U}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, k={self.k}, "
                f"tied={self.tied}")


@register("universal_basis", version=1)
@dataclass(eq=False, repr=False)
class UniversalBasis(Technique):
    """Spec: each target becomes ``UniversalBasisLoRA`` over the module's frozen basis from ``basis``.

    Args:
        basis: a basis file written by ``zoo basis`` (safetensors).
        k: components per half (0: the mean alone).
        targets: module name patterns; default: every module the basis covers.
        control: ``universal`` (top k), ``random`` (random orthonormal, same k), ``secondary``
            (components k..2k) or ``mean`` (k = 0).
        rank: rows r of each adapter (default: the bank's LoRA rank).
        init_adapter: a PEFT adapter whose projection starts the coefficients (default: c = 0, the mean).
        seed: seeds the random control's basis.
    """

    basis: str
    k: int = 8
    targets: str | list[str] | None = None
    control: str = "universal"
    rank: int | None = None
    init_adapter: str | None = None
    seed: int = 0

    def __post_init__(self):
        self.file = load_basis(self.basis)
        if self.targets is None:
            self.targets = list(self.file.modules)
        super().__post_init__()
        check_choice("control", self.control, CONTROLS)
        self.rank = self.file.rank if self.rank is None else self.rank
        if self.k < 0:
            raise ZooError(f"k={self.k} must be >= 0")
        self._init: Projection | None = None
        if self.init_adapter is not None:
            self._init = project_adapter(self.file, self.init_adapter, self.k, self.control, self.seed)

    def _module_basis(self, name: str, module: nn.Module):
        if name not in self.file.modules:
            raise ZooError(f"basis {self.basis!r} has no module {name!r}; target only the modules it covers")
        mb = self.file.modules[name]
        if (mb.out_features, mb.in_features) != (module.out_features, module.in_features):
            raise ZooError(f"basis {self.basis!r}: {name} is {mb.out_features} x {mb.in_features}, the model's is "
                           f"{module.out_features} x {module.in_features}")
        k = 0 if self.control == "mean" else self.k
        return mb, mb.bases(k, self.control, self.seed, name)

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        """The frozen base layer, the coefficients [r, k] (fp32; one set when joint) and the means and
        components as rebuilt buffers (their k read from the basis file)."""
        mb, bases = self._module_basis(name, module)
        mean_A, C_A, mean_B, C_B = mb.layer_factors(bases)
        k = C_A.shape[0]
        sizes = {"base.weight": TensorSize((module.out_features, module.in_features), "frozen")}
        if getattr(module, "bias", None) is not None:
            sizes["base.bias"] = TensorSize((module.out_features,), "frozen")
        sizes["coef_A"] = TensorSize((self.rank, k), "trainable", "float32")
        if mb.mode != "joint":
            sizes["coef_B"] = TensorSize((self.rank, k), "trainable", "float32")
        return sizes | {n: TensorSize(tuple(t.shape), "buffer") for n, t in
                        (("mean_A", mean_A), ("mean_B", mean_B), ("components_A", C_A), ("components_B", C_B))}

    def build(self, name: str, module: nn.Module, stats=None,
              plan: Plan = NO_PLAN) -> UniversalBasisLoRA:
        mb, bases = self._module_basis(name, module)
        coef_A = coef_B = None
        if self._init is not None:
            coef = self._init.coefficients[name]
            coef_A, coef_B = (coef["AB"], None) if mb.mode == "joint" else (coef["A"], coef["B"])
        layer = UniversalBasisLoRA(module, *mb.layer_factors(bases), self.rank, coef_A, coef_B, tied=mb.mode == "joint")
        return layer.to(module.weight.device)
