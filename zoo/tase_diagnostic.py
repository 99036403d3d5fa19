"""The TASE near-identity diagnostic (source 000, section 4.9, phase 51, and section 7.3, reproduction D):
train a ``zoo.tase.TASEInterface`` on the residual stream of one layer and measure how close it is to
the identity.

The near-identity diagnostic is d_id = ||x_hat - x|| / ||x|| per held-out token, reported as mean and
max; the gate (``callbacks.IdentityGate``) passes when d_id_mean <= threshold (0.05). A caveat the
source does not make, measured here: a few massive-activation dimensions of the raw residual stream
can hold almost all of ||x||^2 (on the embedded teacher, dimension 507 of the first token of every
block), so an interface that passes only those scores a small raw d_id. ``TASEDiagnostic`` therefore
also reports d_id with the outlier dimensions set apart (``d_id_bulk_*``: both norms over the other
coordinates) and after the next layer's RMSNorm (``d_id_norm_*``: ||N(x_hat) - N(x)|| / ||N(x)||, what
that layer actually consumes).

``TASEDiagnostic`` trains an interface on the residual stream after decoder layer ``layer`` (the input
of the next layer's ``input_layernorm``), recorded once (``zoo.core.record``) from the teacher — or,
with ``parts``, from a student whose replacements (e.g. a coupled PHD block) are built and frozen — over
the DataModule's train and heldout splits and cached on disk. Batches are looked up in that table by
their tokens, so the recipe DataModules serve the diagnostic unchanged.
"""
from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from .core.cache import Entry
from .core.errors import ZooError, check_choice
from .core.metrics import IdentityDeviation, token_deviation
from .core.module import RepairModule
from .core.record import record
from .core.spectrum import outlier_dims
from .core.state import load_state
from .core.technique import Technique
from .tase import INITS, LOSSES, TASEInterface, reconstruction_loss, resolve_k, resolve_width

log = logging.getLogger(__name__)


# ---- interface activations: recorded once, looked up by tokens --------------------------------------

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


def record_interface(model: nn.Module, site: str, batches, device=None, progress: bool = False,
                     total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [N, T], the input of module ``site`` [N, T, d] fp32 on the CPU) over ``batches``.

    The forward stops once ``site`` has seen its input: layers after the interface never run."""
    return record(model, site, batches, device, progress, total, stop=True, masked=False)


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
