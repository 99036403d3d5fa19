"""LoRA fine-tuning with PEFT's own layers, and LoRA adapters in PEFT's on-disk format (source 001,
sections 2.2 and 3.3: the delta bank, WIZORB step 1).

- ``LoRA``: a technique spec whose replacement of a target is PEFT's ``lora.Linear`` around the frozen
  original: y = W x + (alpha / r) B A x (``alpha / sqrt(r)`` with rsLoRA). The layer is made by
  ``peft.inject_adapter_in_model``, so its initialization, dropout and scaling are PEFT's. ``adapter``
  loads an existing PEFT adapter into the layers instead of PEFT's initialization.
- fine-tuning is ``DistillationModule(parts=[LoRA(...)], objective="next_token")`` (the batch's
  ``loss_mask`` makes it response-only for instruction data); ``save_lora_adapter`` writes the result.
- ``read_adapter`` / ``save_adapter``: PEFT adapter directories (``adapter_config.json`` +
  ``adapter_model.safetensors``) <-> per-module factors ``A [r, in]``, ``B [out, r]`` and scale, keyed by
  the base model's module names. What ``save_adapter`` writes, ``peft.PeftModel.from_pretrained``
  loads (tested), so other tools read the bank.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .core.errors import ZooError
from .core.models import model_location
from .core.registry import register as register_technique
from .core.surgery import replaced_modules
from .core.technique import NO_PLAN, Plan, Technique, TensorSize
from .export.spec import nested, register

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


# --------------------------------------------------------------------------------------------------
# adapters on disk


@dataclass
class LoraAdapter:
    """A LoRA adapter as per-module factors: dW[m] = scale[m] * B[m] @ A[m].

    ``A[m]`` is [r, in_features], ``B[m]`` is [out_features, r]; module names are the base model's
    (``model.layers.0.self_attn.q_proj``), without PEFT's ``base_model.model.`` prefix.
    """

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scale: dict[str, float]
    base_model: str | None = None
    path: str | None = None
    config: dict = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return list(self.A)

    def rank(self, module: str) -> int:
        return self.A[module].shape[0]

    def delta(self, module: str) -> torch.Tensor:
        """The dense dW of ``module`` (fp64)."""
        return self.scale[module] * self.B[module].double() @ self.A[module].double()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name ending in it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (safetensors weights only; pickled ``.bin`` files are refused)."""
    path = Path(path)
    config_path, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise ZooError(f"{str(path)!r} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ZooError(f"adapter {str(path)!r} is a {config.get('peft_type')} adapter; only LORA adapters are read")
    if config.get("use_dora"):
        raise ZooError(f"adapter {str(path)!r} is a DoRA adapter (use_dora); its delta is not B A alone")
    if not weights.is_file():
        hint = " (adapter_model.bin is pickle; re-save it with safe_serialization=True)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise ZooError(f"adapter {str(path)!r} has no {ADAPTER_WEIGHTS}{hint}")
    A, B = {}, {}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            match = _KEY.match(key)
            if match is None:
                continue  # e.g. modules_to_save; not part of the low-rank delta
            (A if match["factor"] == "A" else B)[match["module"]] = f.get_tensor(key)
    if not A or set(A) != set(B):
        raise ZooError(f"adapter {str(path)!r}: lora_A/lora_B weights missing or unpaired "
                       f"({len(A)} A, {len(B)} B)")
    order = sorted(A, key=_natural_key)
    rank, alpha, rslora = config.get("r", 8), config.get("lora_alpha", 8), bool(config.get("use_rslora"))
    scale = {}
    for m in order:
        r_m = _pattern_value(config.get("rank_pattern") or {}, m, rank)
        a_m = _pattern_value(config.get("alpha_pattern") or {}, m, alpha)
        if A[m].shape[0] != r_m or B[m].shape[1] != r_m:
            raise ZooError(f"adapter {str(path)!r}: {m} has A {tuple(A[m].shape)} and B {tuple(B[m].shape)}, "
                           f"not rank {r_m} as its config says")
        scale[m] = lora_scale(a_m, r_m, rslora)
    return LoraAdapter({m: A[m] for m in order}, {m: B[m] for m in order}, scale,
                       config.get("base_model_name_or_path"), str(path), config)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def save_adapter(path: str | Path, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], rank: int,
                 alpha: float, base_model: str | None = None, rslora: bool = False,
                 metadata: dict | None = None) -> Path:
    """Write a PEFT LoRA adapter directory atomically (temp directory, then rename).

    Every module must have rank ``rank``: its delta is ``lora_scale(alpha, rank, rslora) * B @ A``.
    ``metadata`` (JSON-serializable) goes into ``zoo_adapter.json`` beside the adapter.
    """
    from peft import LoraConfig

    path = Path(path)
    for m in A:
        if A[m].shape[0] != rank or B[m].shape[1] != rank:
            raise ZooError(f"save_adapter: {m} has A {tuple(A[m].shape)}, B {tuple(B[m].shape)}; expected rank {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(A), use_rslora=rslora, lora_dropout=0.0,
                        base_model_name_or_path=base_model, task_type="CAUSAL_LM")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(str(tmp))
    tensors = {}
    for m in A:
        tensors[f"base_model.model.{m}.lora_A.weight"] = A[m].detach().cpu().contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = B[m].detach().cpu().contiguous()
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if metadata is not None:
        (tmp / "zoo_adapter.json").write_text(json.dumps(metadata, indent=2, default=str))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file() and (Path(path) / ADAPTER_WEIGHTS).is_file()


# --------------------------------------------------------------------------------------------------
# the technique


def peft_lora_layer(module: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> nn.Module:
    """PEFT's ``lora.Linear`` around ``module`` (which stays frozen), made through PEFT's public API."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.base = module
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, target_modules=["base"])
    inject_adapter_in_model(config, holder)
    layer = holder.base
    module.requires_grad_(False)
    for name, p in layer.named_parameters():
        p.requires_grad_(name.startswith(("lora_A.", "lora_B.")))
    return layer


def peft_lora_spec(layer: nn.Module) -> dict:
    """PEFT's ``lora.Linear`` in ``zoo.export`` ops: base(x) + scaling * (x A^T) B^T (its forward without dropout)."""
    adapter = _single_adapter(layer)
    base = nested("base_", layer.base_layer)[0]
    delta = [{"op": "matmul", "t": "lora_A", "transpose": True}, {"op": "matmul", "t": "lora_B", "transpose": True},
             {"op": "mul", "value": float(layer.scaling[adapter])}]
    return {"program": [{"op": "sum", "branches": [base["program"], delta]}],
            "tensors": base["tensors"] | {"lora_A": "model", "lora_B": "model"}, "ranks": {"rank": layer.r[adapter]}}


def peft_lora_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    adapter = _single_adapter(layer)
    return nested("base_", layer.base_layer)[1] | {"lora_A": layer.lora_A[adapter].weight,
                                                   "lora_B": layer.lora_B[adapter].weight}


def _single_adapter(layer: nn.Module) -> str:
    names = list(layer.lora_A)
    if len(names) != 1 or getattr(layer, "use_dora", {}).get(names[0]):
        raise ZooError(f"only a single plain LoRA adapter per layer exports; this layer has {names}")
    return names[0]


register("peft.tuners.lora.layer.Linear", peft_lora_spec, peft_lora_tensors)


@register_technique("lora", version=1)
@dataclass(eq=False, repr=False)
class LoRA(Technique):
    """Spec: PEFT LoRA on each target (rank ``rank``, scaling ``alpha / rank``). Fine-tuning with it is
    ``DistillationModule(parts=[LoRA(...)], objective="next_token")``.

    Args:
        targets: module name patterns (see ``zoo.core.targets``); with ``adapter`` and no targets: the
            adapter's modules.
        rank: LoRA rank r (default: the adapter's, else 8).
        alpha: LoRA alpha; the delta is (alpha / r) B A (default: the adapter's, else 16).
        dropout: LoRA dropout on the adapter's input (training only).
        rslora: rank-stabilized scaling alpha / sqrt(r) (default: the adapter's, else off).
        adapter: a PEFT adapter directory whose A, B start the layers.
    """

    targets: str | list[str] | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool | None = None
    adapter: str | None = None

    def __post_init__(self):
        if self.targets is None and self.adapter is None:
            raise ZooError("LoRA needs targets (module name patterns) or an adapter to read them from")
        self._adapter: LoraAdapter | None = None
        defaults = {"r": 8, "lora_alpha": 16.0, "use_rslora": False}
        if self.adapter is not None:
            self._adapter = read_adapter(self.adapter)
            defaults = {k: self._adapter.config.get(k, v) for k, v in defaults.items()}
            if self.targets is None:
                self.targets = self._adapter.modules
        self.rank = defaults["r"] if self.rank is None else self.rank
        if self.rank < 1:
            raise ZooError(f"LoRA rank={self.rank} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ZooError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        super().__post_init__()
        self.alpha = float(defaults["lora_alpha"] if self.alpha is None else self.alpha)
        self.rslora = bool(defaults["use_rslora"] if self.rslora is None else self.rslora)

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        """PEFT's layer: the frozen base layer it wraps, lora_A [r, in] and lora_B [out, r] (trainable)."""
        sizes = {"base_layer.weight": TensorSize((module.out_features, module.in_features), "frozen")}
        if getattr(module, "bias", None) is not None:
            sizes["base_layer.bias"] = TensorSize((module.out_features,), "frozen")
        return sizes | {"lora_A.default.weight": TensorSize((self.rank, module.in_features)),
                        "lora_B.default.weight": TensorSize((module.out_features, self.rank))}

    def build(self, name: str, module: nn.Module, stats=None, plan: Plan = NO_PLAN) -> nn.Module:
        layer = peft_lora_layer(module, self.rank, self.alpha, self.dropout, self.rslora)
        if self._adapter is not None:
            if name not in self._adapter.A:
                raise ZooError(f"adapter {self.adapter!r} has no weights for target {name!r}")
            want = lora_scale(self.alpha, self.rank, self.rslora)
            A, B, scale = self._adapter.A[name], self._adapter.B[name], self._adapter.scale[name]
            if A.shape != layer.lora_A["default"].weight.shape or not math.isclose(scale, want, rel_tol=1e-6):
                raise ZooError(f"adapter {self.adapter!r}: {name} has rank {A.shape[0]} and scale {scale:g}; this "
                               f"LoRA has rank {self.rank} and scale {want:g} (set rank/alpha to the adapter's)")
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(A)
                layer.lora_B["default"].weight.copy_(B)
        return layer.to(module.weight.device)

    def factors(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(A, B) of every LoRA layer this spec built in ``model``, keyed by target name."""
        A, B = {}, {}
        for name, wrapper in replaced_modules(model).items():
            layer = wrapper.replacement
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                A[name] = layer.lora_A["default"].weight.detach().float().cpu()
                B[name] = layer.lora_B["default"].weight.detach().float().cpu()
        return A, B

    def write_adapter(self, module, path: str | Path, metadata: dict | None = None) -> Path:
        """The PEFT adapter directory of a student whose one part is this spec (``save_lora_adapter``)."""
        return save_lora_adapter(module, path, metadata)


def lora_part(module) -> LoRA | None:
    """The LoRA spec of a training module whose one part is LoRA, else None."""
    parts = getattr(module, "parts", [])
    return parts[0] if len(parts) == 1 and isinstance(parts[0], LoRA) else None


def save_lora_adapter(module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the trained LoRA of ``module`` (a ``DistillationModule`` whose one part is ``LoRA``) as a PEFT
    adapter directory. Its ``base_model_name_or_path`` is where the teacher's weights are (an embedded
    alias's converted directory), so ``AutoPeftModelForCausalLM`` resolves it offline; the teacher as the
    recipe names it goes into ``zoo_adapter.json`` and README.md."""
    spec = lora_part(module)
    if spec is None:
        raise ZooError("save_lora_adapter needs a module whose one part is zoo.LoRA")
    A, B = spec.factors(module.model)
    if not A:
        raise ZooError("the student has no LoRA layers yet (build it first: trainer.fit or build_student)")
    teacher = module.teacher
    try:
        base = model_location(teacher)
    except ZooError:  # a random: or meta: teacher has no weights on disk; name it as given
        base = teacher
    path = save_adapter(path, A, B, spec.rank, spec.alpha, base, spec.rslora, {"teacher": teacher, **(metadata or {})})
    (path / "README.md").write_text(
        f"# LoRA adapter of {teacher}\n\nTrained by zoo (LoRA, rank {spec.rank}, alpha {spec.alpha:g}) on "
        f"the teacher `{teacher}`, read from `{base}`.\n\n```python\nfrom peft import AutoPeftModelForCausalLM\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({str(path)!r})\n```\n")
    return path
