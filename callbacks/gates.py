"""Gates: fail a run whose result breaks a rule (source 000, section 3.2).

``HeldoutKLGate``: heldout KL must not get worse through repair by more than ``tolerance`` and must
not end above ``max_kl``. ``ShimDominanceGate``: no shim may outgrow its core. ``IdentityGate``: an
expanded interface must end near identity.
"""
from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from zoo.core.errors import ZooError


class GateFailed(ZooError):
    """A gate rejected the run; the CLI exits non-zero with the message."""


def left_state(trainer: L.Trainer, pl_module) -> str:
    """Where a failed run's repair state is, and which step it holds (for the gate's message)."""
    from .checkpoint import RepairStateCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, RepairStateCheckpoint) and callback.last_path is not None:
            step = pl_module.run.restored_step if pl_module.run.restored_step is not None else trainer.global_step
            return f"; the run left its repair state (step {step}) in {callback.last_path}"
    return "; no repair state was written (add callbacks.RepairStateCheckpoint to keep one)"


class HeldoutKLGate(L.Callback):
    """Heldout KL (teacher vs student) of the tensors the repair ends with, against the student as training
    started; checked at fit end. Both numbers are the module's record (``pl_module.run``), measured once for
    every reader.

    Args:
        tolerance: the final KL may exceed the initial KL by at most this much.
        max_kl: the final KL must not exceed this (None: no bound).
    """

    def __init__(self, tolerance: float = 0.0, max_kl: float | None = None):
        self.tolerance, self.max_kl = tolerance, max_kl

    def _log(self, trainer, metrics: dict[str, float]):
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_start(self, trainer, pl_module):
        if not hasattr(pl_module, "distillation_outputs"):
            raise ZooError(f"HeldoutKLGate: {type(pl_module).__name__} measures no heldout KL (it does not distill); "
                           "remove the gate")

    def on_train_start(self, trainer, pl_module):
        before = pl_module.repair_before()
        self._log(trainer, {"heldout_kl_before": before.kl})
        rank_zero_info(f"heldout KL before repair: {before.kl:.6f}")

    def on_fit_end(self, trainer, pl_module):
        before = pl_module.run.before
        if before is None:
            return  # no training happened
        final = pl_module.end_repair().kl
        self._log(trainer, {"heldout_kl_after": final})
        rank_zero_info(f"heldout KL after repair:  {final:.6f} (before {before.kl:.6f}, "
                       f"change {final - before.kl:+.6f})")
        if not math.isfinite(final):
            raise GateFailed(f"HeldoutKLGate: final heldout KL is {final} (the run diverged; before repair "
                             f"{before.kl:.6f}){left_state(trainer, pl_module)}")
        if final > before.kl + self.tolerance:
            raise GateFailed(
                f"HeldoutKLGate: heldout KL got worse through repair: {before.kl:.6f} -> {final:.6f} "
                f"(tolerance {self.tolerance}){left_state(trainer, pl_module)}"
            )
        if self.max_kl is not None and final > self.max_kl:
            raise GateFailed(f"HeldoutKLGate: final heldout KL {final:.6f} is above max_kl={self.max_kl}"
                             f"{left_state(trainer, pl_module)}")


class ShimDominanceGate(L.Callback):
    """Keep every shim below its core: shim dominance ||shim(x)|| / ||core(x)|| per layer, measured over
    each validation epoch, must stay at or below ``max_ratio`` (source 000, sections 3.2, 4.9 and 8:
    connectors are scaffolding; a shim that takes over is a hidden LoRA).

    Args:
        max_ratio: the largest dominance allowed for any layer.
        action: ``fail`` ends the run with an error naming the layers; ``stop`` stops training early and
            restores the last state at which every layer passed (that state is what the final repair
            state holds).
    """

    ACTIONS = ("fail", "stop")
    METRIC = "shim_dominance"

    def __init__(self, max_ratio: float = 1.0, action: str = "fail"):
        from zoo.core.errors import check_choice

        if not max_ratio > 0:
            raise ZooError(f"max_ratio must be > 0, got {max_ratio}")
        self.max_ratio = max_ratio
        self.action = check_choice("action", action, self.ACTIONS)
        self.passing_state: dict | None = None
        self.passing_step: int | None = None
        self.history: list[tuple[int, float]] = []

    def _metrics(self, pl_module) -> dict:
        return pl_module.replacement_metrics().get(self.METRIC, {})

    def on_fit_start(self, trainer, pl_module):
        if not self._metrics(pl_module):
            raise ZooError("ShimDominanceGate: the student has no shims (no replacement tracks "
                           f"{self.METRIC!r}); give the technique shims (e.g. zoo.CoupledCore shim_rank > 0) "
                           "or remove the gate")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(max_ratio=self.max_ratio, action=self.action)

    def state_dict(self) -> dict:
        return {"passing_state": self.passing_state, "passing_step": self.passing_step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.passing_state, self.passing_step = state["passing_state"], state["passing_step"]
        self.history = [tuple(h) for h in state["history"]]

    def on_train_start(self, trainer, pl_module):
        # shims start at zero, so the initial student passes by construction (a resumed run keeps its own)
        if self.passing_state is None:
            self._keep(trainer, pl_module)

    def _keep(self, trainer, pl_module):
        self.passing_state = {k: v.detach().clone() for k, v in pl_module.trainable_parameters().items()}
        self.passing_step = trainer.global_step

    def on_validation_epoch_end(self, trainer, pl_module):
        # runs before any on_validation_end (checkpoints), so a stopped run never saves a failing state
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = {t: float(m.compute()) for t, m in self._metrics(pl_module).items() if m.update_called}
        if not values:
            return
        worst = max(values.values())
        self.history.append((trainer.global_step, worst))
        pl_module.summary["shim_dominance_max"] = max(worst, pl_module.summary.get("shim_dominance_max", 0.0))
        over = {t: v for t, v in values.items() if not v <= self.max_ratio}  # NaN fails too
        if not over:
            self._keep(trainer, pl_module)
            return
        listing = ", ".join(f"{t}: {v:.3f}" for t, v in sorted(over.items(), key=lambda kv: -kv[1]))
        message = (f"ShimDominanceGate: shim dominance above max_ratio={self.max_ratio} at step "
                   f"{trainer.global_step} in {len(over)} layer(s): {listing}")
        if self.action == "fail":
            raise GateFailed(message)
        pl_module.stop_repair("ShimDominanceGate", self.passing_state, self.passing_step)
        rank_zero_info(f"{message}; stopping and restoring the state of step {self.passing_step}")


class IdentityGate(L.Callback):
    """The near-identity gate of an expanded interface (source 000, 4.9, phase 51, and
    the note after the abstract): the identity deviation ``metric`` (d_id_mean of ``zoo.TASEDiagnostic`` by default; for
    TASE interfaces inside a student, ``tase_d_id_max``) must end at or below ``threshold``.

    Every validation is recorded; the first step at which the metric was at or below the threshold goes
    to the run summary (``identity_gate_passed_at_step``), and the verdict on the final validation
    (``identity_gate``: pass / fail) too. A failing run ends with ``GateFailed``; its metrics.json is
    still written.

    Args:
        threshold: the largest d_id allowed (the source's 0.05).
        metric: which logged metric is gated.
        stop_on_pass: end training at the first validation that passes (the gate then passes).
    """

    def __init__(self, threshold: float = 0.05, metric: str = "d_id_mean", stop_on_pass: bool = False):
        if not threshold > 0:
            raise ZooError(f"threshold must be > 0, got {threshold}")
        self.threshold, self.metric, self.stop_on_pass = threshold, metric, stop_on_pass
        self.history: list[tuple[int, float]] = []
        self.passed_at: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, metric=self.metric)

    def state_dict(self) -> dict:
        return {"history": self.history, "passed_at": self.passed_at}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.passed_at = [tuple(h) for h in state["history"]], state["passed_at"]

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        if self.metric not in metrics:
            raise ZooError(f"IdentityGate: the run logs no {self.metric!r}; logged: "
                           f"{', '.join(sorted(metrics)) or 'nothing'}")
        value = float(metrics[self.metric])
        self.history.append((trainer.global_step, value))
        summary = pl_module.summary
        summary["identity_gate_threshold"] = self.threshold
        summary["identity_gate_metric"] = self.metric
        if not math.isfinite(value):
            raise GateFailed(f"IdentityGate: {self.metric} is {value} at step {trainer.global_step} (the run diverged)")
        if value <= self.threshold and self.passed_at is None:
            self.passed_at = trainer.global_step
            summary["identity_gate_passed_at_step"] = self.passed_at
            rank_zero_info(f"IdentityGate: {self.metric} = {value:.4f} <= {self.threshold} at step {self.passed_at}")
            if self.stop_on_pass:
                trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module):
        if not self.history:
            return
        step, final = self.history[-1]
        best_step, best = min(self.history, key=lambda sv: sv[1])
        summary = pl_module.summary
        summary.update(identity_gate="pass" if final <= self.threshold else "fail",
                       identity_gate_final=final, identity_gate_best=best, identity_gate_best_step=best_step)
        if not final <= self.threshold:
            raise GateFailed(f"IdentityGate: {self.metric} = {final:.4f} at step {step} is above the threshold "
                             f"{self.threshold} (best {best:.4f} at step {best_step}){left_state(trainer, pl_module)}")
