"""TASE: a top-k sparse expanded interface, and its near-identity diagnostic (source 000, section 4.9,
phase 51, and the note after the abstract).

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

The near-identity diagnostic is d_id = ||x_hat - x|| / ||x|| per held-out token, reported as mean and
max; the gate (``callbacks.IdentityGate``) passes when d_id_mean <= threshold (0.05). DESIGN.md's caveat:
a few massive-activation dimensions of the raw residual stream can hold almost all of ||x||^2 (on the
embedded teacher, dimension 507 of the first token of every block), so an interface that passes only
those scores a small raw d_id. ``TASEDiagnostic`` therefore also reports d_id with the outlier dimensions
set apart (``d_id_bulk_*``: both norms over the other coordinates) and after the next layer's RMSNorm
(``d_id_norm_*``: ||N(x_hat) - N(x)|| / ||N(x)||, what that layer actually consumes).

``TASEDiagnostic`` trains an interface on the residual stream after decoder layer ``layer`` (the input
of the next layer's ``input_layernorm``), recorded once from the teacher — or, with ``parts``, from a
student whose replacements (e.g. a coupled PHD block) are built and frozen — over the DataModule's train
and heldout splits and cached on disk. Batches are looked up in that table by their tokens, so the
recipe DataModules serve the diagnostic unchanged.

Composed use (``TASECoupledCore``): a coupled PHD core whose residual-side coordinates (the r shared
frame coordinates each core writes into) pass through an identity-initialized ``TASEInterface`` of width
``expansion * r`` instead of a shim beside the core: expand, sparsify, and decode back into the
structured substrate's coordinates. Its d_id per layer is tracked over each validation epoch
(``tase_d_id/<target>``, ``tase_d_id_max``) like shim dominance.
"""
from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .core.cache import Entry
from .core.calibration import ActivationStats
from .core.errors import ZooError, check_choice
from .core.linalg import rms
from .core.metrics import IdentityDeviation, token_deviation
from .core.module import RepairModule
from .core.replacement import Replacement
from .core.spectrum import outlier_dims
from .core.state import load_state
from .core.technique import Technique, TensorSize
from .coupled import CoupledCore
from .export.spec import nested
from .phd import BlockwisePHDLinear, frame_seed

log = logging.getLogger(__name__)

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
        g = torch.Generator().manual_seed(seed)
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


# ---- interface activations: recorded once, looked up by tokens --------------------------------------

class _Recorded(Exception):
    """Raised by the recording hook: nothing after the interface needs to run."""


def interface_site(model: nn.Module, layer: int) -> str:
    """The module whose input is the residual stream after decoder layer ``layer``: the next layer's
    ``input_layernorm`` (its output is what that layer consumes), or the final norm after the last."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if isinstance(layer, bool) or not isinstance(layer, int) or n_layers is None or not 0 <= layer < n_layers:
        raise ZooError(f"layer must be a decoder layer index between 0 and {(n_layers or 1) - 1}, got {layer!r}")
    name = "model.norm" if layer == n_layers - 1 else f"model.layers.{layer + 1}.input_layernorm"
    try:
        model.get_submodule(name)
    except AttributeError:
        norms = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()][:6]
        raise ZooError(f"no module {name!r} in this model (a Llama-style layout is expected); "
                       f"norm modules it has: {', '.join(norms)}") from None
    return name


@torch.no_grad()
def record_interface(model: nn.Module, site: str, batches, device=None, progress: bool = False,
                     total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [N, T], the input of module ``site`` [N, T, d] fp32 on the CPU) over ``batches``.

    The forward stops once ``site`` has seen its input: layers after the interface never run."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seen: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x.detach().float().cpu())
        raise _Recorded

    handle = model.get_submodule(site).register_forward_pre_hook(hook, with_kwargs=True)
    ids = []
    try:
        for batch in tqdm(batches, desc=f"recording {site}", unit="batch", total=total, disable=not progress):
            input_ids = batch["input_ids"]
            attn = batch.get("attention_mask")
            try:
                model(input_ids=input_ids.to(device), attention_mask=None if attn is None else attn.to(device))
            except _Recorded:
                pass
            ids.append(input_ids.cpu().long())
    finally:
        handle.remove()
    if not ids:
        raise ZooError("recording the interface: the loader produced no batches")
    return torch.cat(ids), torch.cat(seen)


class ActivationTable:
    """Interface activations of token blocks, looked up by the blocks' tokens (a block's activations are
    a function of its tokens alone), so any loader over the recorded splits can be served."""

    def __init__(self, input_ids: torch.Tensor, activations: torch.Tensor):
        self.input_ids, self.activations = input_ids.long(), activations.float()
        self.rows = {self._key(row): i for i, row in enumerate(self.input_ids)}

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        return row.cpu().long().numpy().tobytes()

    def __len__(self) -> int:
        return len(self.input_ids)

    def missing(self, input_ids: torch.Tensor) -> list[int]:
        return [i for i, row in enumerate(input_ids) if self._key(row) not in self.rows]

    def add(self, input_ids: torch.Tensor, activations: torch.Tensor) -> None:
        for row, act in zip(input_ids, activations):
            self.rows.setdefault(self._key(row), len(self.input_ids))
            self.input_ids = torch.cat([self.input_ids, row[None].long()])
            self.activations = torch.cat([self.activations, act[None].float()])

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.activations[[self.rows[self._key(row)] for row in input_ids]]

    def tokens(self) -> torch.Tensor:
        """Every recorded token's activation, [N * T, d]."""
        return self.activations.reshape(-1, self.activations.shape[-1])


# ---- the diagnostic ---------------------------------------------------------------------------------

#: (metric name, which view of the activations, statistic) logged every validation
VIEWS = ("raw", "bulk", "norm")
METRICS = {f"d_id{'' if view == 'raw' else '_' + view}_{stat}": (view, stat) for view in VIEWS for stat in ("mean", "max")}


class TASEDiagnostic(RepairModule):
    """Train a ``TASEInterface`` to reconstruct the residual stream after decoder layer ``layer`` and
    log its identity deviation every validation (source 000, 4.9, phase 51).

    Logged each validation, over the heldout split's tokens: ``d_id_mean``/``d_id_max`` (raw),
    ``d_id_bulk_mean``/``d_id_bulk_max`` (outlier dimensions set apart), ``d_id_norm_mean``/
    ``d_id_norm_max`` (after the next layer's RMSNorm), and ``active_features`` (mean non-zeros of z per
    token). ``callbacks.IdentityGate`` turns d_id_mean into a pass/fail.

    Args:
        layer: the interface is the residual stream after this decoder layer (15: between layers 15
            and 16).
        width: m, an int or ``"<N>d"`` (N times the residual width; the source's m = 16384 is 4d on
            Llama-3.1-8B).
        k: active features per token: an int, ``"m"`` (no sparsity) or ``"m/<N>"``.
        init: ``random`` (tied SAE start, b = the data mean) or ``identity`` (exact identity for k >= m/2).
        loss: ``relative`` (mean d_id^2 over tokens) or ``mse``.
        outlier_ratio: a dimension is a massive-activation outlier when its mean square on the train
            split exceeds this multiple of the median dimension's.
        parts: composed mode: technique specs whose replacements are built (calibrated on the
            DataModule's calibration split) and frozen, so the interface sees the student's residual
            stream (e.g. ``zoo.CoupledCore`` over layers 14-21 with the interface after layer 17).
        parts_state: a repair state of those parts (e.g. a ``zoo fit`` of ``configs/recipes/coupled_core.yaml``)
            to load into them before recording.
        seed: seeds the interface's random directions.
        **kwargs: ``RepairModule``'s options (teacher, dtype, lr, warmup_steps, repair_state, ...);
            ``repair_state`` holds the interface's tensors.
    """

    def __init__(self, layer: int = 15, width: int | str = "4d", k: int | str = "m", init: str = "random",
                 loss: str = "relative", outlier_ratio: float = 100.0, parts: list[Technique] | None = None,
                 parts_state: str | None = None, seed: int = 0, **kwargs):
        super().__init__(parts=list(parts or []), **kwargs)
        self.layer = layer
        self.site = interface_site(self.model, layer)
        d = self.model.config.hidden_size
        self.width_spec, self.k_spec = width, k
        m = resolve_width(width, d)
        self.init = check_choice("init", init, INITS)
        self.loss_kind = check_choice("loss", loss, LOSSES)
        if not outlier_ratio > 1:
            raise ZooError(f"outlier_ratio must be > 1, got {outlier_ratio}")
        self.outlier_ratio = outlier_ratio
        self.parts_state = parts_state
        self.interface = TASEInterface(d, m, resolve_k(k, m), init, seed)
        self.tables: dict[str, ActivationTable] = {}
        self.register_buffer("bulk", torch.arange(d), persistent=False)
        self.d_id = nn.ModuleDict({name: IdentityDeviation(stat) for name, (_, stat) in METRICS.items()})
        self.summary.update(d=d, m=m, k=self.interface.k, layer=layer, init=init)

    def header(self) -> dict:
        return {**super().header(), "interface": {"site": self.site, "d": self.interface.d, "m": self.interface.m,
                                                  "k": self.interface.k, "init": self.init}}

    # -- the trainable tensors are the interface's, not the model's

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"interface.{n}": p for n, p in self.interface.named_parameters() if p.requires_grad}

    def lr_scales(self) -> dict[str, float]:
        return {f"interface.{n}": float(s) for n, s in self.interface.lr_scales.items()}

    # -- building: the (optional) student, then the activation tables

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        self.prepare(datamodule, device)

    def prepare(self, datamodule, device=None) -> None:
        """Build the student (parts, frozen), record (or read) the interface activations of the train
        and heldout splits, set the outlier dimensions and, for a fresh interface, b = the data mean."""
        if self.tables:
            return
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise ZooError("TASEDiagnostic needs a DataModule with train and heldout splits "
                           "(e.g. recipes.DistillationDataModule)")
        self.build_student_from(datamodule, device)
        if self.parts_state:
            self._load_parts_state(self.parts_state)
        self.model.requires_grad_(False)
        was = next(self.model.parameters()).device
        if device is not None:
            self.model.to(device)
        for split, loader in (("train", datamodule.train_dataloader()), ("heldout", datamodule.val_dataloader())):
            fingerprint = datamodule.fingerprint(split) if hasattr(datamodule, "fingerprint") else None
            self.tables[split] = self._table(loader, fingerprint, device)
        self.model.to(was)
        ms = self.tables["train"].tokens().double().pow(2).mean(0)
        outliers = outlier_dims(ms, self.outlier_ratio)
        keep = torch.ones(len(ms), dtype=torch.bool)
        keep[outliers] = False
        self.bulk = torch.nonzero(keep).flatten().to(self.bulk.device)
        x = self.tables["train"].tokens()
        share = float(ms[outliers].sum() / ms.sum())
        self.summary.update(outlier_dims=outliers.tolist(), outlier_energy_share=share,
                            train_tokens=len(x), heldout_tokens=len(self.tables["heldout"].tokens()))
        log.info("interface %s: %d train / %d heldout tokens; outlier dims %s hold %.1f%% of E||x||^2",
                 self.site, len(x), self.summary["heldout_tokens"], outliers.tolist(), 100 * share)
        mean = x.double().mean(0)
        if not self.repair_state:  # a loaded interface keeps its own b
            with torch.no_grad():
                self.interface.b.copy_(mean.float())
        # the typical coordinate, not the outliers' (dimension 507 alone would set the steps of b and c 10x too big)
        self.interface.rescale(float((x.double() - mean)[:, self.bulk.cpu()].pow(2).mean().sqrt()))

    def _load_parts_state(self, path: str) -> None:
        tensors, _ = load_state(path, expect={"parts": [p.describe() for p in self.parts], "teacher": self.teacher})
        params = dict(self.model.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ZooError(f"parts_state {path!r} has tensors this student lacks: {unknown[:5]}")
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)

    def _table(self, loader, fingerprint: str | None, device) -> ActivationTable:
        entry = Entry("tase", teacher=self.teacher, dtype=self.dtype_name, site=self.site,
                      parts=[p.describe() for p in self.parts], parts_state=self.parts_state,
                      data=fingerprint, calibration_tokens=self.calibration_tokens)

        def record():
            ids, acts = record_interface(self.model, self.site, loader, device, progress=sys.stderr.isatty(),
                                         total=len(loader) if hasattr(loader, "__len__") else None)
            return {"input_ids": ids, "activations": acts}, {}

        # only data with a fingerprint can be reused safely
        tensors, _ = entry.get(record, store=bool(fingerprint)) if fingerprint else record()
        return ActivationTable(tensors["input_ids"], tensors["activations"])

    # -- training and validation

    def activations(self, batch, split: str) -> torch.Tensor:
        """The interface activations of ``batch``'s real tokens, [tokens, d], on this module's device."""
        table = self.tables[split]
        ids = batch["input_ids"]
        missing = table.missing(ids)
        if missing:  # a block outside the recorded splits: record it now
            ids_m, acts_m = record_interface(self.model, self.site, [{"input_ids": ids[missing]}], ids.device)
            table.add(ids_m, acts_m)
        x = table.lookup(ids).to(self.device)
        mask = batch.get("attention_mask")
        return x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1])

    def training_step(self, batch, batch_idx):
        x = self.activations(batch, "train")
        x_hat = self.interface(x)
        loss = reconstruction_loss(x_hat, x, self.loss_kind)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(x))
        self.log("train_d_id", token_deviation(x_hat, x).nanmean().float(), batch_size=len(x))
        return loss

    def forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.model.get_submodule(self.site)
        return norm(x.to(next(norm.parameters()).dtype)).float()

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        x = self.activations(batch, "heldout")
        z = self.interface.encode(x)
        x_hat = self.interface.decode(z)
        views = {"raw": (x_hat, x, None), "bulk": (x_hat, x, self.bulk),
                 "norm": (self.forward_norm(x_hat), self.forward_norm(x), None)}
        for name, (view, _) in METRICS.items():
            self.d_id[name].update(*views[view])
        self.log("active_features", (z != 0).sum(-1).float().mean(), batch_size=len(x))
        self.log("heldout_loss", reconstruction_loss(x_hat, x, self.loss_kind), batch_size=len(x))

    test_step = validation_step

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        for metric in self.d_id.values():
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        # computed here, not left to Lightning, so the summary is current when callbacks read it
        super().on_validation_epoch_end()
        for name, metric in self.d_id.items():
            if metric.update_called:
                value = metric.compute().float()
                self.log(name, value, prog_bar=name == "d_id_mean")
                if not self.trainer.sanity_checking:
                    self.summary[name] = float(value)

    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end


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

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None) -> nn.Module:
        layer = super().build(name, module, stats)
        r = self.rank_out or self.rank
        m = self.expansion * r
        interface = TASEInterface(r, m, resolve_k(self.k, m), self.tase_init, frame_seed(self.seed, name, "tase"),
                                  scale=rms(layer.core))
        return TASEConnectedLinear(layer, interface, self.residual_side).to(module.weight.device)
