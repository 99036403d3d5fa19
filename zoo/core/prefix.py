"""The shared prefix of a repair step (issue 9, "Speed"; source 000, section 2.4: one model, two views).

Teacher and student are one model object that differ only inside the ``Replaced`` modules, so every
decoder layer below the first replaced one computes the same thing in both views. ``SharedPrefix``
runs those layers once per step: during the teacher pass it records the hidden state entering the
first replaced layer, and during the student pass it turns the lower layers into pass-throughs and
feeds the recorded state to that layer instead. Embeddings, masks and position embeddings are still
computed by the model's own forward (they are cheap), so the student's output is the un-shared
path's to float rounding (bit-exact on a deterministic backend) and no model code is copied here.

It needs a causal LM whose decoder layers are one ``nn.ModuleList`` called in order with the hidden
state as first argument and returning it as a tensor (the transformers v5 Llama family: Llama,
Mistral, Qwen2/3, ...), with every ``Replaced`` module inside a decoder layer. Anything else runs the
full forward twice, with one log line saying why.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from .surgery import replaced_modules

log = logging.getLogger(__name__)

#: model types whose decoder layers follow the contract above (checked against transformers v5)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _PassThrough(nn.Module):
    """Stands in for a decoder layer below the shared prefix's end: returns its hidden state."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder-layer list of a transformers causal LM (``model.model.layers`` for Llama), or None."""
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class SharedPrefix:
    """Runs the decoder layers below the first replaced one once per teacher/student step pair.

    Usage (the teacher pass first, the student pass second, on the same inputs)::

        prefix = SharedPrefix(model)
        with torch.no_grad(), teacher_view(model), prefix.capture():
            teacher_out = model(ids, attn)
        with prefix.resume():
            student_out = model(ids, attn)

    ``prefix.start`` is the first replaced layer's index (None: unsupported, both passes run in
    full; 0: nothing to share). The recorded state is dropped when ``resume`` ends.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = decoder_layers(model)
        self.start: int | None = None
        self.reason = self._plan()
        self._hidden: torch.Tensor | None = None
        if self.reason:
            log.info("shared prefix off, both passes run every layer: %s", self.reason)
        else:
            log.info("shared prefix: decoder layers 0..%d run once per step for teacher and student", self.start - 1)

    def _plan(self) -> str | None:
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            return f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
        if self.layers is None:
            return "no decoder-layer ModuleList at model.base_model.layers"
        owner = {}
        for i, layer in enumerate(self.layers):
            for module in layer.modules():
                owner[id(module)] = i
        found = [owner.get(id(m)) for m in replaced_modules(self.model).values()]
        if not found:
            return "no replaced modules"
        if None in found:
            return "a replaced module lies outside the decoder layers"
        self.start = min(found)
        return None

    @property
    def active(self) -> bool:
        """Whether the student pass skips any layer."""
        return self.reason is None and self.start > 0

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record the hidden state entering the first replaced layer (wrap the teacher pass)."""
        self._hidden = None  # never let a student pass start from an earlier batch's state
        if not self.active:
            yield
            return

        def record(_module, args, kwargs):
            self._hidden = _hidden_arg(args, kwargs).detach()

        handle = self.layers[self.start].register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def resume(self) -> Iterator[None]:
        """Skip the layers below the first replaced one and start there from the recorded state
        (wrap the student pass). Without a recorded state (no ``capture`` ran) every layer runs."""
        hidden, self._hidden = self._hidden, None
        if not self.active or hidden is None:
            yield
            return

        def feed(_module, args, kwargs):
            given = _hidden_arg(args, kwargs)
            if given.shape != hidden.shape:
                raise RuntimeError(f"shared prefix: the student pass has hidden state {tuple(given.shape)}, "
                                   f"the teacher pass recorded {tuple(hidden.shape)}; run both on the same batch")
            return _with_hidden(args, kwargs, hidden)

        lower = [self.layers[i] for i in range(self.start)]
        handle = self.layers[self.start].register_forward_pre_hook(feed, with_kwargs=True)
        skip = _PassThrough()
        try:
            for i in range(self.start):
                self.layers[i] = skip
            yield
        finally:
            for i, layer in enumerate(lower):
                self.layers[i] = layer
            handle.remove()
