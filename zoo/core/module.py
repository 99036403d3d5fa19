"""The LightningModule every technique shares (DESIGN.md, "The one path every technique shares";
source 000, section 2.4 for the repair objective).

``DistillationModule(parts=[spec, ...])`` loads the teacher once, calibrates the targets of all
parts on the DataModule's calibration split (cached), replaces them in place, and trains only the
tensors the specs mark trainable to minimize KL(teacher || student) on next-token predictions.
The teacher's logits come from the same model object under ``teacher_view``.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from torch import nn

from . import calibration as calib
from .distributed import all_reduce_sum_, all_true, rank_world
from .cache import Entry, check_free_space
from .errors import ZooError, check_choice
from .losses import cached_token_kl, hidden_token_kl, prediction_mask, token_kl
from .models import DEFAULT_TEACHER, META_PREFIX, RANDOM_PREFIX, claim, load_causal_lm
from .prefix import SUPPORTED_MODEL_TYPES, SharedPrefix, decoder_layers
from .state import _short, check_header, load_state, save_state
from .surgery import replace, replaced_modules, teacher_view
from .technique import Technique

log = logging.getLogger(__name__)

#: training losses a DistillationModule offers
OBJECTIVES = ("distillation", "next_token")


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed -log p(token t+1) over the counted predictions, their number), fp32 per sequence chunk.

    The predictions counted are those ``token_kl`` counts (``prediction_mask``); exp(sum / count) is the
    token-weighted perplexity.
    """
    mask = prediction_mask(attention_mask, loss_mask, input_ids.shape).to(logits.device)
    targets = input_ids[:, 1:].to(logits.device)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, targets.shape[1], chunk):
        sl = slice(start, start + chunk)
        log_p = torch.log_softmax(logits[:, sl].float(), dim=-1)  # logits[:, t] predicts token t + 1
        nll = -log_p.gather(-1, targets[:, sl, None]).squeeze(-1)
        total += (nll * mask[:, sl]).sum()
    return total, mask.sum()


class TokenPerplexity(torchmetrics.Metric):
    """exp(summed NLL / counted tokens) over an epoch: token-weighted, summed across processes."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("nll", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, count: torch.Tensor) -> None:
        self.nll += nll.detach().float()
        self.count += count.float()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.count.clamp_min(1.0))


class TokenMean(torchmetrics.Metric):
    """Token-weighted mean of per-batch means over an epoch, summed across processes.

    (``self.log(..., batch_size=n, sync_dist=True)`` would average the summed batch sizes over processes
    in integer arithmetic under ddp, biasing the mean; this sums exact fp64 totals instead.)
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean: torch.Tensor, count: torch.Tensor) -> None:
        self.total += mean.detach().double() * count.double()
        self.count += count.double()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1.0)).float()


class DistillationModule(L.LightningModule):
    """Teacher-distillation repair of a student made by one or more technique specs.

    Args:
        parts: technique specs applied to disjoint targets of one student.
        teacher: embedded alias, ``.gguf`` file, local directory or hub id.
        dtype: dtype the teacher's weights are loaded in (``float32``, ``bfloat16``, ``float16``).
        lr: AdamW learning rate of the trainable tensors, times the per-tensor scale a replacement
            declares in its ``lr_scales`` dict (e.g. ``FisherSVDLinear`` makes it relative to each
            tensor's initial RMS, so one lr suits every layer and model).
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps.
        temperature: distillation temperature (KL of softened distributions, times T^2).
        kl_chunk: sequence positions per chunk of the fp32 KL.
        calibration_tokens: cap on real tokens used for calibration (None: the whole split).
        full_cov_max: widest input for which the full input covariance is collected.
        repair_state: a repair state (safetensors) to load after building the student.
        objective: the training loss: ``distillation`` (KL(teacher || student), the repair loss) or
            ``next_token`` (the student's plain next-token NLL on the counted tokens: fine-tuning, e.g.
            LoRA; response-only through the batch's ``loss_mask``). Validation logs both either way.
        shared_prefix: run the decoder layers below the first replaced one once per step, for
            teacher and student (``zoo.core.prefix``): the student pass starts at the first replaced
            layer. Exact; off runs both passes through every layer.
        fused_head: compute the training KL from the final hidden states through the LM head one
            sequence chunk at a time (``losses.hidden_token_kl``), so no full [batch, seq, vocab]
            logits exist. Exact to float rounding; validation keeps the logits path (it needs them
            for perplexity). Off (or a model whose head is not a plain frozen linear map): ``token_kl``.
    """

    #: False for modules whose trainable tensors live outside the parts (e.g. ``zoo.TASEDiagnostic``)
    requires_parts = True

    def __init__(
        self,
        parts: list[Technique],
        teacher: str = DEFAULT_TEACHER,
        dtype: str = "float32",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        temperature: float = 1.0,
        kl_chunk: int = 256,
        calibration_tokens: int | None = None,
        full_cov_max: int = 8192,
        repair_state: str | None = None,
        objective: str = "distillation",
        shared_prefix: bool = True,
        fused_head: bool = True,
    ):
        super().__init__()
        if not parts and self.requires_parts:
            raise ZooError("a DistillationModule needs at least one technique part")
        # NaN fails these too; lr 0 is allowed (a run that measures without changing anything)
        if not 0 <= lr < math.inf:
            raise ZooError(f"lr must be a finite number >= 0, got {lr}")
        if not 0 < temperature < math.inf:
            raise ZooError(f"temperature must be a positive finite number, got {temperature}")
        self.parts = list(parts)
        self.teacher = teacher
        self.dtype_name = dtype
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.temperature, self.kl_chunk = temperature, kl_chunk
        self.calibration_tokens, self.full_cov_max = calibration_tokens, full_cov_max
        self.repair_state = repair_state
        self.objective = check_choice("objective", objective, OBJECTIVES)
        self.shared_prefix, self.fused_head = shared_prefix, fused_head
        self._prefix: SharedPrefix | None = None
        self._prefix_key: tuple | None = None  # the decoder layers ``_prefix`` was planned on
        self._head_reason: str | None = None  # why fused_head is off for this model (logged once)
        if repair_state:  # a missing or foreign state is reported before the weights load (in full at load)
            check_header(repair_state, DistillationModule.header(self))
        if self.parts and not teacher.startswith(META_PREFIX):
            # bad targets too: resolved on the architecture alone (meta device, no weights) first
            self.resolve_targets(load_causal_lm(META_PREFIX + teacher.removeprefix(RANDOM_PREFIX), dtype)[0])
        self.model, self.tokenizer = load_causal_lm(teacher, dtype)
        self.targets: dict[str, list[str]] = {}  # part -> replaced names, after build
        self.summary: dict[str, float] = {}  # run-level results (gates fill it; written to metrics.json)
        self.heldout_perplexity = nn.ModuleDict({"student": TokenPerplexity(), "teacher": TokenPerplexity()})
        self.epoch_kl = nn.ModuleDict({"heldout_kl": TokenMean(), "test_kl": TokenMean()})
        self.save_hyperparameters(ignore=["parts"])

    # ---- building the student -------------------------------------------------------------------

    def technique_name(self) -> str:
        return type(self).__name__

    def header(self) -> dict:
        """What a repair state records about the run that wrote it (checked again on load)."""
        return {"technique": self.technique_name(), "parts": [p.describe() for p in self.parts],
                "teacher": self.teacher}

    def resolve_targets(self, model: nn.Module | None = None) -> list[list[str]]:
        """Targets of each part in ``model`` (default: the student's); overlapping parts are an error
        naming the shared modules."""
        owner: dict[str, int] = {}
        resolved = []
        for i, part in enumerate(self.parts):
            names = part.resolve(self.model if model is None else model)
            for n in names:
                if n in owner:
                    raise ZooError(
                        f"parts {owner[n]} ({type(self.parts[owner[n]]).__name__}) and {i} "
                        f"({type(part).__name__}) both target {n!r}; targets of parts must be disjoint"
                    )
                owner[n] = i
            resolved.append(names)
        # a target inside another part's target (an attention block and its o_proj) overlaps too
        for inner, i in owner.items():
            for outer, j in owner.items():
                if i != j and inner.startswith(outer + "."):
                    raise ZooError(f"part {i} ({type(self.parts[i]).__name__}) targets {inner!r}, inside "
                                   f"{outer!r} that part {j} ({type(self.parts[j]).__name__}) replaces; "
                                   "targets of parts must be disjoint")
        return resolved

    def build_student(self, calibration_loader=None, data_fingerprint: str = "", device=None) -> None:
        """Calibrate (or read the cache), replace every target, and load ``repair_state`` if given."""
        if replaced_modules(self.model):
            return  # already built (setup runs once per stage)
        resolved = self.resolve_targets()
        stats = self._calibrate(resolved, calibration_loader, data_fingerprint, device)
        claim(self.model)
        for part, names in zip(self.parts, resolved):
            part.plan({n: self.model.get_submodule(n) for n in names}, stats)
        for i, (part, names) in enumerate(zip(self.parts, resolved)):
            replace(self.model, names, lambda name, module, part=part: part.build(name, module, stats.get(name)),
                    part.target_kind)
            self.targets[f"{i}:{type(part).__name__}"] = names
        if not self.trainable_parameters():
            raise ZooError("the student has no trainable tensors; check the technique's options")
        if self.repair_state:
            self.load_repair_state(self.repair_state)
        for part in self.parts:
            self.summary.update(part.report(self.model))
        n_train = sum(p.numel() for p in self.trainable_parameters().values())
        self.summary["trainable_parameters"] = n_train
        self.summary["targets"] = sum(map(len, resolved))
        log.info("student built: %d targets, %d trainable parameters", sum(map(len, resolved)), n_train)

    def _calibrate(self, resolved, loader, fingerprint, device) -> dict[str, calib.ActivationStats]:
        wanted = {"input": [], "fisher": [], "taps": []}
        taps = {}
        for part, names in zip(self.parts, resolved):
            for need in part.needs():
                wanted[need].extend(names)
            if "taps" in part.needs():
                taps.update({n: part.tap for n in names})
        names = sorted(set(wanted["input"]) | set(wanted["fisher"]))
        if not names and not taps:
            return {}
        if loader is None:
            raise ZooError(
                f"{self.technique_name()} needs calibration statistics; give it a DataModule with a "
                "calibration_dataloader() (e.g. recipes.DistillationDataModule)"
            )
        entry = Entry("calibration", teacher=self.teacher, dtype=self.dtype_name, targets=names,
                      fisher=sorted(wanted["fisher"]), data=fingerprint,
                      tokens=self.calibration_tokens, full_cov_max=self.full_cov_max,
                      **({"taps": sorted(taps), "tap_versions": sorted({p.tap_version for p in self.parts
                                                                        if "taps" in p.needs()})}
                         if taps else {}))
        # under ddp/fsdp every process runs setup: all read the cache, or all collect their share
        hit = entry.load() if fingerprint else None
        if all_true(hit is not None):
            return calib.stats_from_tensors(*hit)
        if fingerprint:  # the statistics will be stored: is there room for them? (known before collecting)
            need = sum(calib.stats_bytes(w, w <= self.full_cov_max)
                       for w in (self.model.get_submodule(n).in_features for n in names))
            check_free_space(entry.path.parent, need, "the calibration statistics")
        was = next(self.model.parameters()).device
        if device is not None:
            self.model.to(device)
        stats = calib.collect(self.model, loader, names, full_cov_max=self.full_cov_max,
                              max_tokens=self.calibration_tokens, fisher=bool(wanted["fisher"]),
                              device=device, distributed=True, taps=taps)
        self.model.to(was)
        if fingerprint and rank_world()[0] == 0:  # only data with a fingerprint can be reused safely
            entry.store(*calib.stats_to_tensors(stats))
        return stats

    def build_student_from(self, datamodule=None, device=None) -> None:
        """``build_student`` with the calibration split and fingerprint of ``datamodule``."""
        loader = fingerprint = None
        if datamodule is not None and hasattr(datamodule, "calibration_dataloader"):
            datamodule.setup("fit")
            loader, fingerprint = datamodule.calibration_dataloader(), datamodule.fingerprint("calibration")
        self.build_student(loader, fingerprint or "", device)

    def setup(self, stage: str) -> None:
        if self._trainer is None:
            return self.build_student_from(None)
        self.build_student_from(getattr(self.trainer, "datamodule", None), self.trainer.strategy.root_device)

    # ---- repair state ---------------------------------------------------------------------------

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save_repair_state(self, path: str | Path, extra: dict | None = None) -> Path:
        return save_state(path, self.trainable_parameters(), {**self.header(), **(extra or {})})

    def load_repair_state(self, path: str | Path) -> dict:
        tensors, header = load_state(path, expect=self.header())
        params = self.trainable_parameters()
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ZooError(f"repair state {str(path)!r} does not fit this student: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                if tensors[name].shape != p.shape:
                    raise ZooError(f"repair state {str(path)!r}: {name} has shape {tuple(tensors[name].shape)}, "
                                   f"the student's is {tuple(p.shape)}")
                p.copy_(tensors[name])
        return header

    # ---- training -------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def distillation_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL(teacher || student) averaged over counted predictions, number counted).

        With ``fused_head`` (and a teacher forward to run) the KL comes from the final hidden states
        through the LM head chunk by chunk; otherwise it is ``distillation_outputs``' KL of the logits.
        """
        head = self.fused_lm_head()
        if head is None or "teacher_top_logp" in batch:
            kl, count, _, _ = self.distillation_outputs(batch)
            return kl, count
        ids, attn, loss_mask = batch["input_ids"], batch.get("attention_mask"), batch.get("loss_mask")
        base = self.model.base_model
        teacher_hidden, student_hidden = self._teacher_student(
            lambda: base(input_ids=ids, attention_mask=attn).last_hidden_state)
        kl = hidden_token_kl(teacher_hidden, student_hidden, head, loss_mask, attn, self.temperature, self.kl_chunk)
        return kl, prediction_mask(attn, loss_mask, ids.shape).sum()

    def distillation_outputs(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``distillation_loss`` plus the logits it compared: (kl, count, teacher logits, student logits).

        A batch that carries a cached teacher distribution (``teacher_top_logp``, ``teacher_top_ids``,
        ``teacher_rest_logp``: a DataModule's ``teacher_logits`` option) skips the teacher forward; its
        KL is then ``cached_token_kl``'s top-k + rest approximation and the teacher logits are None.
        """
        ids, attn, loss_mask = batch["input_ids"], batch.get("attention_mask"), batch.get("loss_mask")
        if "teacher_top_logp" in batch:
            student_logits = self(ids, attn)
            kl = cached_token_kl(batch["teacher_top_logp"], batch["teacher_top_ids"], batch["teacher_rest_logp"],
                                 student_logits, loss_mask, attn, self.temperature, self.kl_chunk)
            return kl, prediction_mask(attn, loss_mask, ids.shape).sum(), None, student_logits
        teacher_logits, student_logits = self._teacher_student(lambda: self(ids, attn))
        kl = token_kl(teacher_logits, student_logits, loss_mask, attn, self.temperature, self.kl_chunk)
        count = prediction_mask(attn, loss_mask, ids.shape).sum()
        return kl, count, teacher_logits, student_logits

    def _teacher_student(self, run) -> tuple[torch.Tensor, torch.Tensor]:
        """(``run()`` in the teacher view without grad, ``run()`` in the student view), the student's
        starting at the first replaced layer from the teacher's hidden state there with ``shared_prefix``."""
        prefix = self._shared_prefix()
        if prefix is None:
            with torch.no_grad(), teacher_view(self.model):
                teacher = run()
            return teacher, run()
        with torch.no_grad(), teacher_view(self.model), prefix.capture():
            teacher = run()
        with prefix.resume():
            return teacher, run()

    def _shared_prefix(self) -> SharedPrefix | None:
        if not self.shared_prefix:
            return None
        layers = decoder_layers(self.model)
        key = (None if layers is None else tuple(map(id, layers)), tuple(map(id, replaced_modules(self.model).values())))
        if self._prefix is None or self._prefix_key != key:  # replanned when the student or its wrapping changes
            self._prefix, self._prefix_key = SharedPrefix(self.model), key
        return self._prefix

    def fused_lm_head(self) -> nn.Linear | None:
        """The LM head ``hidden_token_kl`` may fold in, or None (with one log line saying why not)."""
        if not self.fused_head:
            return None
        head = self.model.get_output_embeddings()
        model_type = getattr(self.model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:  # others may scale or cap logits after the head
            reason = f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
        elif type(head) is not nn.Linear or head.weight.requires_grad:
            reason = f"the LM head is a {type(head).__name__}{' with a trainable weight' if type(head) is nn.Linear else ''}, not a frozen nn.Linear"
        else:
            return head
        if self._head_reason != reason:
            log.info("fused head off, the KL uses full logits: %s", reason)
            self._head_reason = reason
        return None

    @torch.no_grad()
    def evaluate_kl(self, loader, device=None, forward_context=None, distributed: bool = False) -> float:
        """Token-weighted mean KL(teacher || student) over ``loader`` (the same number validation logs).

        With ``distributed`` (every process calls it with the same loader) each process evaluates
        batches ``i % world == rank`` and the sums are all-reduced: every process returns the mean
        over the whole loader.
        """
        device = device or next(self.model.parameters()).device
        rank, world = rank_world() if distributed else (0, 1)
        sums = torch.zeros(2, dtype=torch.float64)  # (sum of kl * count, count)
        for i, batch in enumerate(loader):
            if i % world != rank:
                continue
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with forward_context() if forward_context else contextlib.nullcontext():
                kl, n = self.distillation_loss(batch)
            sums += torch.tensor([float(kl) * int(n), int(n)], dtype=torch.float64)
        if world > 1:
            all_reduce_sum_(sums)
        return float(sums[0] / sums[1].clamp_min(1))

    def _global_token_mean(self, kl: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, KL to log) so that a data-parallel step equals the single-process
        step on the union of the processes' batches.

        Each process's ``kl`` is a mean over its own counted predictions, and DDP/FSDP average the
        gradients over processes; with unequal counts (response-only masks) that average is not the
        token-weighted mean. Scaling each process's loss by world * count / global count makes it so.
        """
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return kl, kl.detach()
        sums = torch.stack([kl.detach().float() * count, count.float()])
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        total = sums[1].clamp_min(1.0)
        return kl * (count.float() * world / total), sums[0] / total

    def training_step(self, batch, batch_idx):
        if self.objective == "next_token":
            ids, attn = batch["input_ids"], batch.get("attention_mask")
            nll, count = next_token_nll(self(ids, attn), ids, batch.get("loss_mask"), attn, self.kl_chunk)
            loss = nll / count.clamp_min(1)
            self.log("train_nll", loss, prog_bar=True, batch_size=max(int(count), 1))
            return loss
        kl, count = self.distillation_loss(batch)
        loss, kl_all = self._global_token_mean(kl, count)
        self.log("train_kl", kl_all, prog_bar=True, batch_size=int(count))
        return loss

    def validation_step(self, batch, batch_idx):
        kl, count, teacher_logits, student_logits = self.distillation_outputs(batch)
        # token-weighted mean over the heldout split (all processes): each batch weighs by its counted predictions
        self.epoch_kl["heldout_kl"].update(kl, count)
        self.log("heldout_kl", self.epoch_kl["heldout_kl"], prog_bar=True, metric_attribute="epoch_kl.heldout_kl")
        self.log_heldout_perplexity(batch, teacher_logits, student_logits)
        return kl

    def log_heldout_perplexity(self, batch, teacher_logits, student_logits) -> None:
        """``heldout_ppl`` (the student's) and ``heldout_ppl_teacher`` (for reference): next-token
        perplexity over the counted predictions of the heldout split, token-weighted over the epoch."""
        ids, attn, loss_mask = batch["input_ids"], batch.get("attention_mask"), batch.get("loss_mask")
        for role, logits, name in (("student", student_logits, "heldout_ppl"),
                                   ("teacher", teacher_logits, "heldout_ppl_teacher")):
            metric = self.heldout_perplexity[role]
            metric.update(*next_token_nll(logits, ids, loss_mask, attn, self.kl_chunk))
            self.log(name, metric, metric_attribute=f"heldout_perplexity.{role}")

    # ---- metrics that replacements declare (e.g. shim dominance) --------------------------------

    def replacement_metrics(self) -> dict[str, dict[str, torchmetrics.Metric]]:
        """{metric name: {target: metric}} over replacements with a ``metrics()`` method; they update
        them in their forward while ``tracking`` is on (during validation epochs)."""
        found: dict[str, dict[str, torchmetrics.Metric]] = {}
        for target, wrapper in replaced_modules(self.model).items():
            metrics = getattr(wrapper.replacement, "metrics", None)
            for name, metric in (metrics() if metrics else {}).items():
                found.setdefault(name, {})[target] = metric
        return found

    def _track_replacement_metrics(self, on: bool) -> None:
        for wrapper in replaced_modules(self.model).values():
            if hasattr(wrapper.replacement, "metrics"):
                wrapper.replacement.tracking = on

    def on_validation_epoch_start(self) -> None:
        for per_target in self.replacement_metrics().values():
            for metric in per_target.values():
                metric.reset()
        self._track_replacement_metrics(True)

    def on_validation_epoch_end(self) -> None:
        """Log each replacement metric as ``NAME/TARGET`` and its maximum over targets as ``NAME_max``."""
        self._track_replacement_metrics(False)
        for name, per_target in self.replacement_metrics().items():
            values = {t: m.compute() for t, m in per_target.items() if m.update_called}
            for target, value in values.items():
                self.log(f"{name}/{target}", value.float())
            if values:
                self.log(f"{name}_max", torch.stack(list(values.values())).max().float(), prog_bar=True)

    def test_step(self, batch, batch_idx):
        kl, count = self.distillation_loss(batch)
        self.epoch_kl["test_kl"].update(kl, count)
        self.log("test_kl", self.epoch_kl["test_kl"], metric_attribute="epoch_kl.test_kl")
        return kl

    def lr_scales(self) -> dict[str, float]:
        """Per-tensor learning-rate multipliers declared by replacements (``module.lr_scales``)."""
        scales = {}
        for prefix, module in self.model.named_modules():
            for name, scale in getattr(module, "lr_scales", {}).items():
                scales[f"{prefix}.{name}" if prefix else name] = float(scale)
        return scales

    def configure_optimizers(self):
        scales = self.lr_scales()
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in self.trainable_parameters().items():
            groups.setdefault(scales.get(name, 1.0), []).append(p)
        optimizer = torch.optim.AdamW([{"params": ps, "lr": self.lr * s} for s, ps in groups.items()],
                                      lr=self.lr, weight_decay=self.weight_decay)
        if self.warmup_steps <= 0:
            return optimizer
        warm = self.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["zoo_header"] = self.header()
        checkpoint["zoo_summary"] = dict(self.summary)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        have, want = checkpoint.get("zoo_header"), self.header()
        if have != want:
            raise ZooError(f"the resume checkpoint was written by another recipe: {_short(have)}; this run is "
                           f"{_short(want)}")
        self.summary.update(checkpoint.get("zoo_summary", {}))

    def state_dict(self, *args, **kwargs):
        """Only the trainable tensors: a Lightning checkpoint must not copy the whole teacher."""
        return {k: v.detach() for k, v in self.trainable_parameters().items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        params = self.trainable_parameters()
        with torch.no_grad():
            for k, v in state_dict.items():
                params[k].copy_(v)
        return nn.modules.module._IncompatibleKeys([], [])


class Composite(DistillationModule):
    """Several techniques on disjoint targets of one student, trained, saved and rebuilt as one.

    This is how recipes mix techniques from YAML alone::

        model:
          class_path: zoo.Composite
          init_args:
            parts:
              - class_path: zoo.FisherSVD
                init_args: {targets: "model.layers.{14..21}.mlp.down_proj", rank: 64}
              - class_path: zoo.FisherSVD
                init_args: {targets: "model.layers.*.self_attn.o_proj", rank: 32, weighting: diagonal}
    """
