"""The decoder layers' inputs for error-aware (sequential) calibration, one layer at a time (ZOMBORG,
source 000, section 2.2: the projection's statistics; propagated through the compressed prefix the way
GPTQ/SliceGPT-style pipelines do, source 000 section 4.1's whole-model baselines).

Sequential calibration collects decoder layer l's statistics on the hidden states the already-compressed
layers 0..l-1 produce, paired with the teacher's hidden states at the same positions. Running the whole
model for each layer costs two full forwards per layer (60 for a 30-layer model); ``LayerInputs`` keeps the
two streams entering the current layer instead, for every calibration batch, and runs one layer at a time:

1. one capture pass records what each decoder layer receives besides its hidden states (attention masks,
   rotary embeddings, positions: whatever the architecture passes), and the hidden states entering layer 0;
2. calibrating layer l runs layer l alone on the teacher's stream (the teacher view: its cross moments and
   the teacher's next hidden states) and on the student's (its statistics);
3. moving to layer l+1 runs the now-compressed layer l on the student's stream.

About three forwards of the model in all, and never more than one depth's activations held: the two
streams and the teacher's next one, ``3 * tokens * hidden`` elements (on the CPU when the device has no
room for them). The statistics equal the whole-model passes' (``tests/test_compression.py`` checks the
student against that build).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import device_room
from .errors import ZooError
from .plan import LAYER
from .surgery import teacher_view


class _Captured(Exception):
    """Raised by the last decoder layer's pre-hook: the capture pass needs nothing above it."""


class Unreplayable(ZooError):
    """A decoder layer receives something that cannot be replayed per batch (a cache, a block mask, shared
    state): the caller runs the whole model instead."""


#: what a captured layer input may be besides tensors (and tuples/lists of these): values, not state
_PLAIN = (type(None), bool, int, float, str)


def decoder_layers(model: nn.Module, names: list[str]) -> nn.ModuleList:
    """The decoder layers that hold ``names`` (``model.layers`` of a Llama-style model)."""
    for name in names:
        match = LAYER.search(name + ".")
        if match:
            container = (name + ".")[: match.start(1) - 1].rstrip(".")
            layers = model.get_submodule(container)
            if isinstance(layers, nn.ModuleList):
                return layers
    raise ZooError(f"none of {names[:3]}... is inside a decoder layer (a module list named 'layers')")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerInputs:
    """The teacher's and the student's hidden states entering decoder layer ``position``, per batch.

    ``batches`` is what ``zoo.core.calibration.collect`` iterates in place of the loader (the same masks,
    in the same order, with the batch's ``index``); ``forward(batch, teacher)`` runs the current layer on
    one stream, as ``collect``'s ``forward`` argument. Batches another process handles (``i % world !=
    rank``) keep their masks, for the token count, and no hidden states.
    """

    def __init__(self, model: nn.Module, loader, layers: nn.ModuleList, max_tokens: int | None = None,
                 device: torch.device | None = None, rank: int = 0, world: int = 1, progress: bool = True):
        self.layers, self.position = layers, 0
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batches: list[dict] = []
        self.calls: dict[int, list[tuple[tuple, dict]]] = {}  # batch -> per layer (other args, kwargs)
        self.teacher: dict[int, torch.Tensor] = {}
        self.next_teacher: dict[int, torch.Tensor] = {}
        self.home = torch.device("cpu")
        seen = 0
        for i, batch in enumerate(tqdm(loader, desc="calibration inputs", unit="batch", disable=not progress)):
            mask = batch.get("attention_mask")
            n = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            kept = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            self.batches.append({**kept, "index": i})
            if i % world == rank:
                self._capture(model, i, batch)
            seen += n
            if max_tokens is not None and seen >= max_tokens:
                break
        held = sum(t.numel() * t.element_size() for t in self.teacher.values())
        if 3 * held < device_room(self.device):  # the two streams and the next teacher one, on the device if room
            self.home = self.device
            self.teacher = {i: t.to(self.device) for i, t in self.teacher.items()}
        self.student = dict(self.teacher)  # the same tensors until layer 0 is compressed (never written in place)

    @torch.no_grad()
    def _capture(self, model: nn.Module, index: int, batch: dict) -> None:
        calls: list[tuple[tuple, dict]] = []
        # one copy of a tensor every layer receives (masks, rotary); the original is held with it, so its id
        # is not reused by a tensor a later layer receives
        moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def offload(value):
            if torch.is_tensor(value):
                if id(value) not in moved:
                    moved[id(value)] = (value, value.detach().to("cpu", copy=True))
                return moved[id(value)][1]
            if isinstance(value, (tuple, list)):
                return type(value)(offload(v) for v in value)
            if isinstance(value, _PLAIN):
                return value
            raise Unreplayable(f"decoder layers receive a {type(value).__name__}, which is not replayed per batch")

        def hook(layer_index):
            def pre_hook(_module, args, kwargs):
                kwargs = dict(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if layer_index == 0:
                    self.teacher[index] = hidden.detach().to("cpu")
                calls.append((offload(tuple(args[1:])), {k: offload(v) for k, v in kwargs.items()}))
                if layer_index == len(self.layers) - 1:
                    raise _Captured
            return pre_hook

        handles = [layer.register_forward_pre_hook(hook(j), with_kwargs=True) for j, layer in enumerate(self.layers)]
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        try:
            model(**batch, use_cache=False)
        except _Captured:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(calls) != len(self.layers):
            raise ZooError(f"the capture pass saw {len(calls)} of {len(self.layers)} decoder layers run")
        self.calls[index] = calls

    def _run(self, layer_index: int, hidden: torch.Tensor, index: int) -> torch.Tensor:
        args, kwargs = self.calls[index][layer_index]
        to = lambda v: v.to(self.device) if torch.is_tensor(v) else (  # noqa: E731
            type(v)(x.to(self.device) if torch.is_tensor(x) else x for x in v) if isinstance(v, (tuple, list)) else v)
        # a copy: the cached stream is not the layer's to write (the two streams are one tensor at depth 0)
        hidden = hidden.to(self.device, copy=True)
        out = self.layers[layer_index](hidden, *map(to, args), **{k: to(v) for k, v in kwargs.items()})
        return _first(out).detach().to(self.home)

    @torch.no_grad()
    def forward(self, batch: dict, teacher: bool) -> None:
        """Run the current layer on batch ``batch["index"]``'s teacher stream (the teacher's layer, kept
        as the next teacher stream) or on its student stream (for the hooks only)."""
        i, layer = batch["index"], self.layers[self.position]
        if teacher:
            with teacher_view(layer):
                self.next_teacher[i] = self._run(self.position, self.teacher[i], i)
        else:
            self._run(self.position, self.student[i], i)

    @torch.no_grad()
    def advance_to(self, position: int) -> None:
        """Run layers ``self.position..position-1`` as they are now (compressed where replaced) on the
        student's stream and as the teacher's on the teacher's."""
        if position < self.position:
            raise ZooError(f"layer inputs are at layer {self.position}; they cannot go back to {position}")
        while self.position < position:
            j, layer = self.position, self.layers[self.position]
            for i in list(self.student):
                if i not in self.next_teacher:
                    with teacher_view(layer):
                        self.next_teacher[i] = self._run(j, self.teacher[i], i)
                self.student[i] = self._run(j, self.student[i], i)
            self.teacher, self.next_teacher = self.next_teacher, {}
            self.position += 1

    def held_bytes(self) -> int:
        """Bytes of hidden states held (the two streams and the next teacher one; shared tensors once)."""
        tensors = {id(t): t for d in (self.teacher, self.student, self.next_teacher) for t in d.values()}
        return sum(t.numel() * t.element_size() for t in tensors.values())
