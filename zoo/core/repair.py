"""The record of one repair (ZOMBORG, source 000, section 2.4 "repair" and section 3.2 "gates").

A repair is judged by a few numbers every part of the run reads: the heldout KL and perplexity of the
student as training starts, at each validation and at the end; which validated tensors the run ends with
(the best one by the module's ``monitor``, or the state a gate restored); why it stopped early (a gate, the
wall-clock budget); and how long it took. ``RepairRun`` holds them, typed, on the ``RepairModule`` that owns
the loop; the gates, the repair curve, the checkpoint and ``metrics.json`` read it, none of them keeps its own
copy, and ``summary()`` renders it under the keys ``metrics.json`` has always had. It is part of the
module's resume checkpoint, so a resumed run continues the same record.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_info

from .distributed import gathered_parameters
from .errors import ZooError


@dataclass
class Heldout:
    """The heldout numbers of the student's tensors at one step (None: not measured by this module)."""

    step: int
    kl: float | None = None
    ppl: float | None = None
    monitor: float | None = None  # the module's ``monitor`` metric at a validation
    wall_s: float | None = None  # seconds of repair when measured


@dataclass
class RepairRun:
    """What one repair measured and decided (see the module docstring)."""

    before: Heldout | None = None  # the student as training started
    validations: list[Heldout] = field(default_factory=list)
    best: Heldout | None = None  # the validation with the lowest finite monitor value
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # its tensors, on the CPU
    end: Heldout | None = None  # the tensors training ended with
    final: Heldout | None = None  # the tensors the run ends with (``end``, ``best`` or a gate's)
    restored_step: int | None = None  # where the final tensors come from, when not the last step
    restored_by: str | None = None  # ``best validated`` or the gate that put them back
    stopped_by: str | None = None  # the gate that ended training early and put earlier tensors back
    budget_stop_step: int | None = None
    wall_s: float = 0.0  # seconds of repair, summed over the sessions of a resumed run

    def validated(self, step: int) -> Heldout | None:
        return next((v for v in self.validations if v.step == step), None)

    def summary(self) -> dict:
        """The run's results under ``metrics.json``'s summary keys."""
        out: dict = {}
        if self.before is not None and self.before.kl is not None:
            out["heldout_kl_before"] = self.before.kl
        if self.final is not None and self.final.kl is not None:
            out["heldout_kl_after"] = self.final.kl
        if self.restored_step is not None:
            out["repair_state_step"] = self.restored_step
        if self.stopped_by is not None:
            out["stopped_by"], out["restored_step"] = self.stopped_by, self.restored_step
        if self.budget_stop_step is not None:
            out["repair_budget_stop_step"] = self.budget_stop_step
        if self.end is not None:
            out["repair_wall_s"] = round(self.wall_s, 3)
        return out

    def state_dict(self) -> dict:
        """Plain values for the resume checkpoint (the best tensors stay tensors)."""
        state = asdict(self)
        state["best_state"] = self.best_state
        return state

    def load_state_dict(self, state: dict) -> None:
        heldout = lambda h: None if h is None else Heldout(**h)  # noqa: E731
        for name, value in state.items():
            if name in ("before", "best", "end", "final"):
                value = heldout(value)
            elif name == "validations":
                value = [Heldout(**v) for v in value]
            setattr(self, name, value)


class RepairLoop:
    """The owner of the repair loop, mixed into ``zoo.core.module.RepairModule``: one heldout evaluator, the
    run's record (``self.run``), the wall-clock budget and the one place where tensors are put back.

    Every reader asks the module instead of keeping its own copy: ``repair_before()`` (the student as training
    starts, measured once), ``repair_validated()`` (this validation, recorded once), ``end_repair()`` (the end
    point and the final tensors, decided once). Each is idempotent, so the callbacks that call them may run in
    any order and find the same answers. The module's own hooks call them too, so a run without callbacks
    keeps the same record.
    """

    def init_repair(self, monitor: str, max_minutes: float | None) -> None:
        if max_minutes is not None and not max_minutes > 0:  # NaN fails too
            raise ZooError(f"max_minutes must be > 0 (minutes of repair), got {max_minutes}")
        self.monitor, self.max_minutes = monitor, max_minutes
        self.run = RepairRun()
        self._clock: float | None = None

    # ---- the one heldout evaluator ------------------------------------------------------------

    def evaluate_heldout(self, loader, forward_context=None, distributed: bool = False) -> Heldout | None:
        """Token-weighted heldout KL and perplexity of the student over ``loader``; None for a module that
        does not distill (``zoo.core.module.DistillationModule`` measures)."""
        return None

    def heldout_loader(self):
        """The heldout batches validation reads: the DataModule's val loader, cut at the trainer's
        ``limit_val_batches`` (an int: that many batches; a float: that fraction)."""
        trainer = self.trainer
        loader = trainer.datamodule.val_dataloader()
        limit = trainer.limit_val_batches
        if limit is None or (isinstance(limit, float) and limit >= 1.0):
            return loader
        n = int(limit) if isinstance(limit, int) else int(len(loader) * limit)
        return itertools.islice(loader, max(n, 1))

    def measure_heldout(self) -> Heldout:
        """The heldout numbers of the student's tensors now, on the trainer's heldout split."""
        trainer, was_training = self.trainer, self.training
        self.eval()
        found = self.evaluate_heldout(self.heldout_loader(), trainer.strategy.precision_plugin.forward_context,
                                      distributed=trainer.world_size > 1)
        self.train(was_training)
        found = found or Heldout(trainer.global_step)
        found.step, found.wall_s = trainer.global_step, round(self.wall_s(), 3)
        return found

    # ---- the record, each entry decided once ------------------------------------------------------

    def wall_s(self) -> float:
        return self.run.wall_s + (time.monotonic() - self._clock if self._clock is not None else 0.0)

    def repair_before(self) -> Heldout:
        """The student as training starts (measured once; a resumed run keeps the interrupted one's)."""
        if self.run.before is None:
            self.run.before = self.measure_heldout()
            self._publish()
        return self.run.before

    def repair_validated(self) -> Heldout | None:
        """This validation's numbers (read from the logged metrics once per step), the best tensors kept by
        ``monitor``; None outside a fit's validation or where a gate has just put other tensors back."""
        trainer = self.trainer
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return None
        step = trainer.global_step
        if self.run.stopped_by is not None:
            return None  # a gate put earlier tensors back: this validation's metrics do not describe them
        found = self.run.validated(step)
        if found is not None:
            return found
        metrics = trainer.callback_metrics
        value = lambda name: float(metrics[name]) if name in metrics else None  # noqa: E731
        found = Heldout(step, value("heldout_kl"), value("heldout_ppl"), value(self.monitor), round(self.wall_s(), 3))
        self.run.validations.append(found)
        best = self.run.best
        if found.monitor is not None and math.isfinite(found.monitor) and (best is None or found.monitor < best.monitor):
            self.run.best = found
            with gathered_parameters(trainer.model):
                self.run.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.trainable_parameters().items()}
        return found

    def restore(self, state: dict[str, torch.Tensor], step: int, by: str) -> None:
        """Put the tensors of ``step`` back (the only place a run's tensors are replaced)."""
        with torch.no_grad(), gathered_parameters(self.trainer.model):
            for name, p in self.trainable_parameters().items():
                p.copy_(state[name].to(p.device))
        self.run.restored_step, self.run.restored_by = step, by
        self._publish()

    def stop_repair(self, by: str, state: dict[str, torch.Tensor], step: int) -> None:
        """A gate ends training now and the run keeps ``state`` (of ``step``)."""
        self.run.stopped_by = by
        self.restore(state, step, by)
        self.trainer.should_stop = True

    def end_repair(self) -> Heldout:
        """The state training ended with (``run.end``, measured unless this step was validated) and the
        tensors the run keeps (``run.final``): a gate's, else the best validated by ``monitor`` where the last
        step was not the best, else the last."""
        step = self.trainer.global_step
        if self.run.final is not None and self.run.end is not None and self.run.end.step == step:
            return self.run.final
        self.run.wall_s, self._clock = self.wall_s(), time.monotonic()
        validated = None if self.run.stopped_by else self.run.validated(step)
        self.run.end = validated or self.measure_heldout()
        best = self.run.best
        if self.run.stopped_by is None and best is not None and best.step != step and self.run.best_state is not None:
            self.restore(self.run.best_state, best.step, "best validated")
            self.run.final = best
            rank_zero_info(f"the final repair state holds the best validated tensors: step {best.step}, "
                           f"{self.monitor} {best.monitor:.6f} (the last step, {step}, was not better)")
        else:
            self.run.final = self.run.end
        self._publish()
        return self.run.final

    def _publish(self) -> None:
        self.summary.update(self.run.summary())

    # ---- the hooks of the loop -------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self._clock = time.monotonic()

    def on_train_start(self) -> None:
        self.repair_before()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        trainer = self.trainer
        if self.max_minutes is None or trainer.should_stop:
            return
        # rank 0's clock decides, so every process stops after the same step
        if trainer.strategy.broadcast(self.wall_s() >= self.max_minutes * 60):
            trainer.should_stop = True
            self.run.budget_stop_step = trainer.global_step
            self._publish()
            rank_zero_info(f"{self.wall_s():.1f} s passed the repair budget of {self.max_minutes} min; stopping "
                           f"at step {trainer.global_step}")

    def on_validation_end(self) -> None:
        self.repair_validated()

    def on_train_end(self) -> None:
        self.end_repair()

    def save_repair_run(self, checkpoint: dict) -> None:
        checkpoint["zoo_run"] = {**self.run.state_dict(), "wall_s": self.wall_s()}

    def load_repair_run(self, checkpoint: dict) -> None:
        if "zoo_run" in checkpoint:
            self.run.load_state_dict(checkpoint["zoo_run"])
            if self._clock is not None:  # loaded after fit start: the clock restarts from the saved seconds
                self._clock = time.monotonic()
