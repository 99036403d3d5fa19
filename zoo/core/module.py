"""The LightningModules of the zoo (ZOMBORG, source 000, section 2.4: the repair objective).

``RepairModule`` is what every zoo LightningModule shares: a ``zoo.core.student.Student`` (the teacher with
its targets replaced), the trainable tensors, AdamW with the per-tensor learning-rate scales the
replacements declare, checkpoints and repair states that hold only the trainable tensors, and the repair
loop's record and budget (``zoo.core.repair.RepairLoop``: what gates, curve and checkpoint read).

``DistillationModule(parts=[spec, ...])`` is the training side of every technique: it trains the tensors the
specs mark trainable to minimize KL(teacher || student) on next-token predictions, the teacher's logits
coming from the same model object under ``teacher_view``. A technique is a spec, not a LightningModule
(``zoo.FisherSVD``, ``zoo.BlockwisePHD``, ...); mixing techniques is a longer list of parts.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import lightning as L
import torch
from torch import nn

from .distributed import all_reduce_sum_, rank_world
from .errors import ZooError, check_choice
from .losses import cached_token_kl, hidden_token_kl, next_token_nll, prediction_mask, token_kl
from .metrics import TokenMean, TokenPerplexity
from .models import DEFAULT_TEACHER
from .prefix import SUPPORTED_MODEL_TYPES, SharedPrefix, decoder_layers
from .repair import Heldout, RepairLoop
from .state import _short, check_header, load_into, load_state, mismatch, save_state
from .student import CALIBRATIONS, Student, parts_header
from .surgery import replaced_modules, teacher_view
from .technique import Technique

log = logging.getLogger(__name__)

#: training losses a DistillationModule offers
OBJECTIVES = ("distillation", "next_token")

LR_DECAYS = ("constant", "cosine")

__all__ = ["LR_DECAYS", "OBJECTIVES", "Composite", "DistillationModule", "RepairModule", "next_token_nll"]


class RepairModule(RepairLoop, L.LightningModule):
    """A LightningModule over a ``Student`` whose trainable tensors are the run's (see the module docstring).

    Subclasses whose trainable tensors live outside the student's replacements (``zoo.TASEDiagnostic``'s
    interface) override ``trainable_parameters``, ``lr_scales`` and ``header``.

    Args:
        parts: technique specs applied to disjoint targets of the student (may be empty for a diagnostic).
        teacher: embedded alias, ``.gguf`` file, local directory or hub id.
        dtype: dtype the teacher's weights are loaded in (``float32``, ``bfloat16``, ``float16``).
        lr: AdamW learning rate, times each tensor's ``lr_scales`` multiplier.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps.
        calibration_tokens: cap on real tokens used for calibration (None: the whole split).
        full_cov_max: widest input for which the full input covariance is collected.
        repair_state: a repair state (safetensors) to load after building the student.
        calibration: ``once`` or ``sequential`` (error-aware: each decoder layer's targets calibrated on
            what the compressed layers below produce; see ``zoo.core.student.Student``).
        max_minutes: the repair's wall-clock budget: training stops after the first step that ends past it
            (summed over the sessions of a resumed run); None: none.
        monitor: the validated metric whose lowest finite value picks the tensors the run ends with (and the
            ``best_`` repair state).
        lr_decay: ``constant`` after the warm-up, or ``cosine``: down to 0 over the run, the run's progress
            being the larger of its steps over the trainer's and its wall time over ``max_minutes``.
    """

    def __init__(self, parts: list[Technique], teacher: str = DEFAULT_TEACHER, dtype: str = "float32",
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0,
                 calibration_tokens: int | None = None, full_cov_max: int = 8192, repair_state: str | None = None,
                 calibration: str = "once", max_minutes: float | None = None, monitor: str = "heldout_kl",
                 lr_decay: str = "constant"):
        super().__init__()
        self.lr_decay = check_choice("lr_decay", lr_decay, LR_DECAYS)
        self.init_repair(monitor, max_minutes)
        # NaN fails this too; lr 0 is allowed (a run that measures without changing anything)
        if not 0 <= lr < math.inf:
            raise ZooError(f"lr must be a finite number >= 0, got {lr}")
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.repair_state = repair_state
        calibration = check_choice("calibration", calibration, CALIBRATIONS)
        if repair_state:  # a missing or foreign state is reported before the weights load (in full at load)
            check_header(repair_state, parts_header(list(parts), teacher, calibration))
        self.student = Student(parts, teacher, dtype, calibration_tokens, full_cov_max, calibration)
        self.model, self.tokenizer = self.student.model, self.student.tokenizer
        self.save_hyperparameters(ignore=["parts"])

    # the student's fields, as the callbacks, commands and exports read them
    parts = property(lambda self: self.student.parts)
    teacher = property(lambda self: self.student.teacher)
    dtype_name = property(lambda self: self.student.dtype_name)
    calibration_tokens = property(lambda self: self.student.calibration_tokens)
    targets = property(lambda self: self.student.targets)
    summary = property(lambda self: self.student.summary)  # run-level results (gates fill it; metrics.json)

    def technique_name(self) -> str:
        return type(self).__name__

    def header(self) -> dict:
        """What a repair state records about the run that wrote it (checked again on load)."""
        return self.student.header()

    def resolve_targets(self, model: nn.Module | None = None) -> list[list[str]]:
        return self.student.resolve_targets(model)

    def build_student(self, calibration_loader=None, data_fingerprint: str = "", device=None) -> None:
        """Calibrate (or read the cache), replace every target, and load ``repair_state`` if given."""
        if not self.student.built:
            self.student.build(calibration_loader, data_fingerprint, device)
            self._after_build()

    def build_student_from(self, source=None, device=None, from_state: bool = False) -> None:
        """``Student.build_from``: how ``zoo fit``/``validate`` (``setup``) and every command
        (``recipes.recipe.load_recipe``) build the student, calibrating on ``source`` (a ``CalibrationSource``).

        With ``from_state`` (commands that evaluate or export, never a fit: a layer rebuilt from repaired tensors
        has their learning-rate scales) and a ``repair_state`` that holds every tensor of the student, the
        student is rebuilt from it alone (``Student.build_from_state``); otherwise one log line says why the
        state cannot, and the student is calibrated and factorized as usual."""
        if self.student.built:
            return
        if from_state and self.repair_state:
            why = self.student.build_from_state(load_state(self.repair_state, expect=self.header())[0])
            if why is None:
                log.info("student rebuilt from its repair state alone (no calibration, no factorization)")
                return self._after_build(load=False)  # its tensors are the state's already
            log.info("the repair state cannot rebuild the student alone, so it is calibrated again: %s", why)
        self.student.build_from(source, device)
        self._after_build()

    def _after_build(self, load: bool = True) -> None:
        if self.repair_state and load:
            self.load_repair_state(self.repair_state)
        # this module's trainable tensors (a diagnostic's are not the student's)
        self.summary["trainable_parameters"] = sum(p.numel() for p in self.trainable_parameters().values())

    def setup(self, stage: str) -> None:
        if self._trainer is None:
            return self.build_student_from(None)
        self.build_student_from(getattr(self.trainer, "datamodule", None), self.trainer.strategy.root_device)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return self.student.trainable_parameters()

    def lr_scales(self) -> dict[str, float]:
        """Per-tensor learning-rate multipliers (the replacements' ``lr_scales``), by parameter name."""
        return self.student.lr_scales()

    def write_adapter(self, path: str | Path, metadata: dict | None = None) -> Path | None:
        """The adapter directory of a student whose one part has its own adapter format
        (``Technique.write_adapter``), else None."""
        return self.parts[0].write_adapter(self, path, metadata) if len(self.parts) == 1 else None

    def save_repair_state(self, path: str | Path, extra: dict | None = None) -> Path:
        return save_state(path, self.trainable_parameters(), {**self.header(), **(extra or {})})

    def load_repair_state(self, path: str | Path) -> dict:
        return load_into(path, self.trainable_parameters(), self.header())

    def configure_optimizers(self):
        if not self.trainable_parameters():
            frozen = ", ".join(f"zoo.{type(p).__name__}" for p in self.parts if not p.trains)
            raise ZooError(f"nothing to train: the student's parts ({frozen or 'its parts'}) hold no trainable tensor, "
                           "so a repair has nothing to move; measure it with zoo validate --config ... instead")
        scales = self.lr_scales()
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in self.trainable_parameters().items():
            groups.setdefault(scales.get(name, 1.0), []).append(p)
        optimizer = torch.optim.AdamW([{"params": ps, "lr": self.lr * s} for s, ps in groups.items()],
                                      lr=self.lr, weight_decay=self.weight_decay)
        if self.warmup_steps <= 0 and self.lr_decay == "constant":
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log ``grad_norm``, the L2 norm of this process's trainable gradients before any clipping
        (``trainer.gradient_clip_val``), on the steps Lightning writes its logs (``log_every_n_steps``): a
        signal between validations. Only there: it reads every gradient, about 1% of a step on the CPU."""
        n = self.trainer.log_every_n_steps
        if not n or (self.trainer.global_step + 1) % n:  # Lightning's own test for a step that logs
            return
        grads = [p.grad for p in self.trainable_parameters().values() if p.grad is not None]
        if grads:
            self.log("grad_norm", torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])))

    def progress(self, step: int) -> float:
        """How far the run is, 0 to 1: the larger of its steps over the trainer's and its wall time over the
        budget (a run that stops on whichever ends first decays over it)."""
        steps = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        done = step / steps if 0 < steps < math.inf else 0.0
        if self.max_minutes is not None:
            done = max(done, self.wall_s() / (self.max_minutes * 60))
        return min(1.0, done)

    def lr_factor(self, step: int) -> float:
        """The lr multiplier after ``step`` optimizer steps: the linear warm-up, times the decay."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return warm * (0.5 * (1 + math.cos(math.pi * self.progress(step))) if self.lr_decay == "cosine" else 1.0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["zoo_header"] = self.header()
        checkpoint["zoo_summary"] = dict(self.summary)
        self.save_repair_run(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        have, want = checkpoint.get("zoo_header"), self.header()
        if mismatch(have, want) is not None:
            raise ZooError(f"the resume checkpoint was written by another recipe: {_short(have)}; this run is "
                           f"{_short(want)}")
        self.summary.update(checkpoint.get("zoo_summary", {}))
        self.load_repair_run(checkpoint)

    def state_dict(self, *args, **kwargs):
        """Only the trainable tensors: a Lightning checkpoint must not copy the whole teacher."""
        return {k: v.detach() for k, v in self.trainable_parameters().items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        params = self.trainable_parameters()
        with torch.no_grad():
            for k, v in state_dict.items():
                params[k].copy_(v)
        return nn.modules.module._IncompatibleKeys([], [])

    # ---- metrics that replacements declare (e.g. shim dominance) --------------------------------

    def replacement_metrics(self) -> dict:
        """{metric name: {target: metric}} the replacements update in their forward while tracking
        (during validation epochs)."""
        return self.student.replacement_metrics()

    def on_validation_epoch_start(self) -> None:
        for per_target in self.replacement_metrics().values():
            for metric in per_target.values():
                metric.reset()
        self.student.track(True)

    def on_validation_epoch_end(self) -> None:
        """Log each replacement metric as ``NAME/TARGET`` and its maximum over targets as ``NAME_max``."""
        self.student.track(False)
        for name, per_target in self.replacement_metrics().items():
            values = {t: m.compute() for t, m in per_target.items() if m.update_called}
            for target, value in values.items():
                self.log(f"{name}/{target}", value.float())
            if values:
                self.log(f"{name}_max", torch.stack(list(values.values())).max().float(), prog_bar=True)


class DistillationModule(RepairModule):
    """Teacher-distillation repair of a student made by one or more technique specs.

    Args:
        parts: technique specs applied to disjoint targets of one student.
        teacher, dtype, lr, weight_decay, warmup_steps, calibration_tokens, full_cov_max, repair_state,
            calibration, max_minutes, monitor, lr_decay: see
            ``RepairModule`` (``lr`` is relative where a replacement declares ``lr_scales``: e.g.
            ``FisherSVDLinear`` scales it by each tensor's initial RMS, so one lr suits every layer and model).
        temperature: distillation temperature (KL of softened distributions, times T^2).
        kl_chunk: sequence positions per chunk of the fp32 KL.
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
        calibration: str = "once",
        max_minutes: float | None = None,
        monitor: str = "heldout_kl",
        lr_decay: str = "constant",
    ):
        if not parts:
            raise ZooError("a DistillationModule needs at least one technique part")
        if not 0 < temperature < math.inf:
            raise ZooError(f"temperature must be a positive finite number, got {temperature}")
        objective = check_choice("objective", objective, OBJECTIVES)
        super().__init__(parts, teacher, dtype, lr, weight_decay, warmup_steps, calibration_tokens, full_cov_max,
                         repair_state, calibration, max_minutes, monitor, lr_decay)
        self.temperature, self.kl_chunk = temperature, kl_chunk
        self.objective = objective
        self.shared_prefix, self.fused_head = shared_prefix, fused_head
        self._prefix: SharedPrefix | None = None
        self._prefix_key: tuple | None = None  # the decoder layers ``_prefix`` was planned on
        self._head_reason: str | None = None  # why fused_head is off for this model (logged once)
        self.heldout_perplexity = nn.ModuleDict({"student": TokenPerplexity(), "teacher": TokenPerplexity()})
        self.epoch_kl = nn.ModuleDict({"heldout_kl": TokenMean(), "test_kl": TokenMean()})

    def technique_name(self) -> str:
        """The parts' spec classes, e.g. ``FisherSVD`` or ``EigenAttention+FisherSVD``."""
        return "+".join(dict.fromkeys(type(p).__name__ for p in self.parts))

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
    def evaluate_heldout(self, loader, forward_context=None, distributed: bool = False) -> Heldout:
        """Token-weighted KL(teacher || student) and the student's perplexity over ``loader``: what validation
        logs (``heldout_kl``, ``heldout_ppl``) from the same per-batch ``distillation_outputs``, measured
        outside the validation loop (the repair's start and end, the gates, the curve). The one evaluator.

        With ``distributed`` (every process calls it with the same loader) each process evaluates
        batches ``i % world == rank`` and the sums are all-reduced: every process returns the means
        over the whole loader.
        """
        device = next(self.model.parameters()).device
        rank, world = rank_world() if distributed else (0, 1)
        sums = torch.zeros(4, dtype=torch.float64)  # kl * count, count, nll, nll tokens
        for i, batch in enumerate(loader):
            if i % world != rank:
                continue
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with forward_context() if forward_context else contextlib.nullcontext():
                kl, count, _, student_logits = self.distillation_outputs(batch)
                nll, tokens = next_token_nll(student_logits, batch["input_ids"], batch.get("loss_mask"),
                                             batch.get("attention_mask"), self.kl_chunk)
            sums += torch.stack([kl.double() * count, count.double(), nll.double(), tokens.double()]).cpu()
        if world > 1:
            all_reduce_sum_(sums)
        return Heldout(step=0, kl=float(sums[0] / sums[1].clamp_min(1)),
                       ppl=float(torch.exp(sums[2] / sums[3].clamp_min(1))))

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

    def test_step(self, batch, batch_idx):
        kl, count = self.distillation_loss(batch)
        self.epoch_kl["test_kl"].update(kl, count)
        self.log("test_kl", self.epoch_kl["test_kl"], metric_attribute="epoch_kl.test_kl")
        return kl


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
