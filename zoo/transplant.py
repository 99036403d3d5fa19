"""Transplant: each target becomes a frozen dense linear holding the same-named weight of another checkpoint
of the same architecture (e.g. the dequantized output of an external quantizer).

This is how the zoo measures an established quantizer on its own terms: AutoRound (Cheng et al., 2023,
"Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs", the ``auto-round``
package) or GPTQ (Frantar et al., 2022) writes a checkpoint whose decoder linears hold their fake-quantized
(dequantized) weights; ``Transplant(targets, source=DIR)`` puts exactly those weights into the student, and
``zoo validate`` then measures it against the real teacher (heldout KL and perplexity) with the same data,
gates and reports as every zoo student. ``bits_per_weight`` says what the source's own format stores per
weight of these maps, so the run reports its bytes beside the zoo's low-bit students (``zoo.Quantize``).

Nothing trains: the repair has no tensor to move, so ``zoo fit`` refuses such a student, naming the spec.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .core.calibration import ActivationStats
from .core.errors import ZooError
from .core.registry import register
from .core.replacement import Replacement
from .core.technique import NO_PLAN, Plan, Technique, TensorSize
from .export.spec import dense

log = logging.getLogger(__name__)


class TransplantedLinear(Replacement):
    """y = W' x + b' with W' (and b') read from another checkpoint, frozen."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dense_weight(self) -> torch.Tensor:
        return self.weight.detach().double()

    def export_spec(self) -> dict:
        tensors = {"weight": "model", **({"bias": "model"} if self.bias is not None else {})}
        return {"program": dense("weight", "bias" if self.bias is not None else None), "tensors": tensors, "ranks": {}}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, **({"bias": self.bias} if self.bias is not None else {})}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def safetensors_index(directory: Path) -> dict[str, Path]:
    """{tensor name: the .safetensors file of ``directory`` that holds it} (one file or a sharded set)."""
    from safetensors import SafetensorError, safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ZooError(f"transplant source {str(directory)!r} holds no .safetensors file (a transformers checkpoint "
                       "saved with save_pretrained, e.g. zoo autoround's output)")
    found = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                found |= {name: file for name in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ZooError(f"transplant source {str(file)!r} is not a readable safetensors file: {exc}") from None
    return found


@register("transplant", version=1)
@dataclass(eq=False, repr=False)
class Transplant(Technique):
    """Spec: replace each target by a frozen ``TransplantedLinear`` holding the same-named weight (and bias) of
    the checkpoint in ``source`` (see the module docstring).

    Args:
        targets: module name patterns (see ``zoo.core.targets``).
        source: a directory of the same architecture holding ``<target>.weight`` in safetensors.
        bits_per_weight: what the source's format stores per weight of these maps (e.g. 4 + 16/128 for 4-bit
            codes with an fp16 scale per group of 128), for the run's byte count; None: not reported.
        label: a name for the source in the log (e.g. ``auto-round W4G128``).
    """

    trains = False

    targets: str | list[str]
    source: str
    bits_per_weight: float | None = None
    label: str = ""

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.source, str) or not self.source:
            raise ZooError(f"Transplant source must be a checkpoint directory, got {self.source!r}")
        if not Path(self.source).expanduser().is_dir():
            raise ZooError(f"Transplant source {self.source!r} is not a directory (a transformers checkpoint of the "
                           "teacher's architecture, e.g. zoo autoround's --output)")
        bits = self.bits_per_weight
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int | float)
                                 or not math.isfinite(bits) or not 0 < bits <= 32):
            raise ZooError(f"Transplant bits_per_weight must be a number in (0, 32] or null, got {bits!r}")
        self._index: dict[str, Path] | None = None

    def tensor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``key`` of the source, checked against ``shape``."""
        from safetensors import safe_open

        if self._index is None:
            self._index = safetensors_index(Path(self.source).expanduser())
        if key not in self._index:
            raise ZooError(f"transplant source {self.source!r} has no tensor {key!r} (it holds {len(self._index)} "
                           "tensors); is it a checkpoint of the teacher's architecture?")
        with safe_open(str(self._index[key]), "pt") as f:
            value = f.get_tensor(key)
        if tuple(value.shape) != tuple(shape):
            raise ZooError(f"transplant source {self.source!r}: tensor {key!r} has shape {tuple(value.shape)}, the "
                           f"teacher's has {tuple(shape)}")
        return value

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        """The weight [out, in] and the bias, frozen in the model dtype."""
        sizes = {"weight": TensorSize((module.out_features, module.in_features), "frozen")}
        if getattr(module, "bias", None) is not None:
            sizes["bias"] = TensorSize((module.out_features,), "frozen")
        return sizes

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None,
              plan: Plan = NO_PLAN) -> TransplantedLinear:
        weight = module.weight
        like = {"dtype": weight.dtype, "device": weight.device}
        W = self.tensor(f"{name}.weight", tuple(weight.shape)).to(**like)
        bias = getattr(module, "bias", None)
        b = self.tensor(f"{name}.bias", tuple(bias.shape)).to(**like) if bias is not None else None
        return TransplantedLinear(W, b)

    def stored_bytes(self, name: str, replacement: nn.Module) -> int | None:
        """What the source's own format stores for this map: ``bits_per_weight`` per weight, the bias at 16 bits
        (the student's ``bits_per_weight`` and ``student_bytes`` count it, ``zoo.export.writer.size_report``)."""
        if self.bits_per_weight is None:
            return None
        bias = 2 * replacement.out_features if getattr(replacement, "bias", None) is not None else 0
        return round(self.bits_per_weight * replacement.in_features * replacement.out_features / 8) + bias

    def report(self, model: nn.Module) -> dict[str, float]:
        """``quantized_maps`` (the transplanted maps) and, with ``bits_per_weight``, their ``quantized_bytes``."""
        from .core.surgery import replaced_modules

        layers = [w.replacement for w in replaced_modules(model).values() if isinstance(w.replacement, TransplantedLinear)]
        if not layers:
            return {}
        log.info("transplant: %d maps from %s%s", len(layers), self.source, f" ({self.label})" if self.label else "")
        if self.bits_per_weight is None:
            return {"quantized_maps": len(layers)}
        weights = sum(layer.in_features * layer.out_features for layer in layers)
        return {"quantized_maps": len(layers), "bits_per_weight": float(self.bits_per_weight),
                "quantized_bytes": self.bits_per_weight * weights / 8}
