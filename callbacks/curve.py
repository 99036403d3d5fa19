"""The repair curve: heldout KL and ppl against wall time, and an optional wall-clock budget (source 000,
section 2.4 "repair": a short distillation whose worth is what it recovers per second spent).

``RepairCurve`` records a point at train start (the unrepaired student, evaluated once for it and
``HeldoutKLGate``: ``gates.heldout_at_train_start``) and at
every validation of the fit, each ``{step, wall_s, heldout_kl, heldout_ppl, at}``; ``wall_s`` counts the
seconds since fit start, summed over the sessions of a resumed run (the points and seconds are callback
state, so ``zoo fit --resume`` continues the curve). Each point is also logged to the trainer's loggers as
``repair/wall_s``, ``repair/heldout_kl`` and ``repair/heldout_ppl``. ``repair_curve.json`` is rewritten at
every point and, with ``repair_curve.png`` (KL and ppl vs wall seconds), at train end, in the run dir.

With ``max_minutes``, training stops after the first batch that ends past the budget. The curve's last
point is always the state training ended with: Lightning validates after a stop requested at a batch end
of a validation epoch (``check_val_every_n_epoch``); otherwise (or after ``--trainer.max_time`` or
``max_steps`` ended a run between validations) the callback evaluates that state itself, at the last
train epoch's end, before ``RepairStateCheckpoint`` puts a better validated state back at train end.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from zoo.core.errors import ZooError

from .gates import evaluate_heldout, heldout_at_train_start, run_dir  # noqa: F401 - evaluate_heldout re-exported

KL, PPL = "heldout_kl", "heldout_ppl"  # what DistillationModule.validation_step logs (ppl: exp of the mean NLL)
FILE = "repair_curve"


class RepairCurve(L.Callback):
    """Heldout KL and ppl against wall time through a repair, and an optional wall-clock budget.

    Args:
        max_minutes: stop training once this many minutes of fit have passed (summed over resumed
            sessions), checked after every training batch; None: no budget of its own.
        plot: also write ``repair_curve.png`` at train end.
    """

    def __init__(self, max_minutes: float | None = None, plot: bool = True):
        if max_minutes is not None and not max_minutes > 0:  # NaN fails too
            raise ZooError(f"RepairCurve: max_minutes must be > 0 (minutes of repair), got {max_minutes}")
        self.max_minutes, self.plot = max_minutes, plot
        self.points: list[dict] = []
        self.stopped_at: int | None = None
        self._before = 0.0  # seconds of earlier sessions of a resumed fit
        self._start: float | None = None

    def wall_s(self) -> float:
        return self._before + (time.monotonic() - self._start if self._start is not None else 0.0)

    # no settings in the key: a resumed run may be given another budget and must still find its curve
    def state_dict(self) -> dict:
        return {"points": self.points, "wall_s": self.wall_s(), "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.points = [dict(p) for p in state["points"]]
        self._before, self.stopped_at = float(state["wall_s"]), state.get("stopped_at")
        if self._start is not None:  # loaded after fit start (Lightning restores callbacks then)
            self._start = time.monotonic()

    def on_fit_start(self, trainer, pl_module):
        self._start = time.monotonic()

    def _add(self, trainer, pl_module, kl, ppl, at: str) -> None:
        step = trainer.global_step
        if self.points and self.points[-1]["step"] >= step:
            return  # this state has its point already (a validation at the step training ended on)
        point = {"step": step, "wall_s": round(self.wall_s(), 3), KL: kl, PPL: ppl, "at": at}
        self.points.append(point)
        if not trainer.is_global_zero:
            return
        logged = {"repair/wall_s": point["wall_s"]}
        logged.update({f"repair/{k}": point[k] for k in (KL, PPL) if point[k] is not None})
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        self.write(trainer, pl_module, plot=False)

    def on_train_start(self, trainer, pl_module):
        if self.points:  # resumed: the curve goes on from the interrupted session's points
            return
        self._add(trainer, pl_module, *heldout_at_train_start(trainer, pl_module), at="train_start")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        value = lambda name: float(metrics[name]) if name in metrics else None  # noqa: E731
        self._add(trainer, pl_module, value(KL), value(PPL), at="validation")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.max_minutes is None or trainer.should_stop:
            return
        # rank 0's clock decides, so every process stops after the same step
        over = trainer.strategy.broadcast(self.wall_s() >= self.max_minutes * 60)
        if over:
            trainer.should_stop = True
            self.stopped_at = trainer.global_step
            pl_module.summary["repair_budget_stop_step"] = self.stopped_at
            rank_zero_info(f"RepairCurve: {self.wall_s():.1f} s passed the budget of {self.max_minutes} min; "
                           f"stopping at step {self.stopped_at}")

    def _ending(self, trainer) -> bool:
        loop = trainer.fit_loop
        return (trainer.should_stop or (loop.max_steps not in (None, -1) and trainer.global_step >= loop.max_steps)
                or (loop.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= loop.max_epochs))

    def _end_point(self, trainer, pl_module) -> None:
        if not self.points or self.points[-1]["step"] < trainer.global_step:
            self._add(trainer, pl_module, *evaluate_heldout(trainer, pl_module), at="end")

    def on_train_epoch_end(self, trainer, pl_module):
        # here, not at train end: RepairStateCheckpoint may put an earlier state back in on_train_end
        if self._ending(trainer):
            self._end_point(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._end_point(trainer, pl_module)  # an end the epoch hook did not see as one
        pl_module.summary["repair_wall_s"] = round(self.wall_s(), 3)
        if trainer.is_global_zero:
            paths = self.write(trainer, pl_module, plot=self.plot)
            rank_zero_info(f"repair curve: {len(self.points)} point(s), {self.wall_s():.1f} s; "
                           f"{', '.join(map(str, paths))}")

    def write(self, trainer, pl_module, plot: bool) -> list[Path]:
        from zoo.core.cache import atomic_write_text

        out = Path(run_dir(trainer))
        out.mkdir(parents=True, exist_ok=True)
        record = {"metrics": [KL, PPL], "max_minutes": self.max_minutes, "stopped_at_step": self.stopped_at,
                  "wall_s": round(self.wall_s(), 3), "points": self.points}
        paths = [atomic_write_text(out / f"{FILE}.json", json.dumps(record, indent=2))]
        if plot and self.points:
            paths.append(plot_curve(self.points, out / f"{FILE}.png"))
        return paths


def plot_curve(points: list[dict], path: Path) -> Path:
    """Two panels, heldout KL and heldout ppl against wall seconds, one marker per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, (KL, PPL), ("heldout KL (teacher || student)", "heldout perplexity")):
        xy = [(p["wall_s"], p[key]) for p in points if p[key] is not None and math.isfinite(p[key])]
        if xy:
            ax.plot(*zip(*xy), "-o", ms=3)
        ax.set_xlabel("wall seconds of repair")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle("repair curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
