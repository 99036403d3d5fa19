"""The inputs of one module, recorded over a model's forward passes (the basis duel's layer inputs, the
TASE interface activations).

``Recorder(model, site)`` hooks the module ``site`` and keeps what it sees, fp32 on the CPU, one
[batch, seq, width] block per forward pass; wrapped around passes that something else drives (e.g.
``calibration.collect``), ``track(batches)`` notes each batch's attention mask on the way through, and
``rows()`` returns the real tokens as [tokens, width]. ``record`` runs the passes itself. With
``stop=True`` a pass ends as soon as ``site`` has its input: the layers after it never run.

Calibration's hooks (``zoo.core.calibration``) accumulate fp64 sums rather than keep rows, so they are
not recorders.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ZooError


class _Recorded(Exception):
    """Raised by a stopping hook: nothing after the recorded module needs to run."""


class Recorder:
    """Keeps the input of module ``site`` of ``model`` for every forward pass while entered."""

    def __init__(self, model: nn.Module, site: str, stop: bool = False):
        self.model, self.site, self.stop = model, site, stop
        self.seen: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        self._handle = None

    def _hook(self, _module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        self.seen.append(x.detach().float().cpu())
        if self.stop:
            raise _Recorded

    def __enter__(self) -> Recorder:
        self._handle = self.model.get_submodule(self.site).register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def track(self, batches):
        """``batches``, noting each one's attention mask (None: every token is real)."""
        for batch in batches:
            self.masks.append(batch.get("attention_mask"))
            yield batch

    def forward(self, batch, device) -> None:
        """One forward pass of ``batch`` (input_ids, attention_mask) on ``device``."""
        attn = batch.get("attention_mask")
        try:
            self.model(input_ids=batch["input_ids"].to(device),
                       attention_mask=None if attn is None else attn.to(device))
        except _Recorded:
            pass

    def blocks(self) -> torch.Tensor:
        """Everything recorded so far, [passes x batch, seq, width], and forget it."""
        out = torch.cat(self.seen)
        self.seen.clear()
        self.masks.clear()
        return out

    def rows(self) -> torch.Tensor:
        """The real tokens (by the tracked masks) recorded so far, [tokens, width], and forget them."""
        rows = [x[m.bool()] if m is not None else x.reshape(-1, x.shape[-1]) for x, m in zip(self.seen, self.masks)]
        self.seen.clear()
        self.masks.clear()
        return torch.cat(rows)


def model_device(model: nn.Module, device=None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


@torch.no_grad()
def record(model: nn.Module, site: str, batches, device=None, progress: bool = False, total: int | None = None,
           stop: bool = False, masked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [N, T], the input of module ``site``) over ``batches``: with ``masked`` the real tokens
    [tokens, width], else the whole blocks [N, T, width]; fp32 on the CPU."""
    device = model_device(model, device)
    ids = []
    with Recorder(model, site, stop) as recorder:
        for batch in tqdm(recorder.track(batches), desc=f"recording {site}", unit="batch", total=total,
                          disable=not progress):
            recorder.forward(batch, device)
            ids.append(batch["input_ids"].cpu().long())
    if not ids:
        raise ZooError(f"recording {site}: the loader produced no batches")
    return torch.cat(ids), recorder.rows() if masked else recorder.blocks()
