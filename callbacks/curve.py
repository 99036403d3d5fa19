"""The repair curve: heldout KL and ppl against wall time (source 000, section 2.4 "repair": a short
distillation whose worth is what it recovers per second spent).

``RepairCurve`` draws the module's record of the repair (``pl_module.run``, see ``zoo.core.repair``): the
unrepaired student as training starts, every validation of the fit, and the state training ended with, each
``{step, wall_s, heldout_kl, heldout_ppl, at}``; ``wall_s`` counts the seconds of repair, summed over the
sessions of a resumed run (the record is part of the resume checkpoint, so ``zoo fit --resume`` continues the
curve). Each point is also logged to the trainer's loggers as ``repair/wall_s``, ``repair/heldout_kl`` and
``repair/heldout_ppl``. ``repair_curve.json`` is rewritten at every point and, with ``repair_curve.png`` (KL
and ppl vs wall seconds), at train end, in the run dir; ``state_step`` there, and a star on the plot, mark
the state the run keeps where it is an earlier one than the last (the best validated, or a gate's). The
wall-clock budget is the repair's own (``model.init_args.max_minutes``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from zoo.core.errors import ZooError

KL, PPL = "heldout_kl", "heldout_ppl"  # what DistillationModule.validation_step logs (ppl: exp of the mean NLL)
FILE = "repair_curve"


class RepairCurve(L.Callback):
    """Heldout KL and ppl against wall time through a repair (see the module docstring).

    Args:
        plot: also write ``repair_curve.png`` at train end.
        max_minutes: no longer the curve's: the budget is ``model.init_args.max_minutes`` (an error names it).
    """

    def __init__(self, plot: bool = True, max_minutes: float | None = None):
        if max_minutes is not None:
            raise ZooError("RepairCurve.max_minutes: the repair's wall-clock budget is the model's option now; set "
                           f"model.init_args.max_minutes: {max_minutes} (--model.init_args.max_minutes {max_minutes})")
        self.plot = plot

    @staticmethod
    def points(pl_module) -> list[dict]:
        """The curve's points from the module's record: start, validations, and the end if not validated."""
        run = pl_module.run
        marked = [(run.before, "train_start")] + [(v, "validation") for v in run.validations] + [(run.end, "end")]
        points: list[dict] = []
        for heldout, at in marked:
            if heldout is None or (points and points[-1]["step"] >= heldout.step):
                continue  # a validation at the step training ended on is that state's point already
            points.append({"step": heldout.step, "wall_s": heldout.wall_s, KL: heldout.kl, PPL: heldout.ppl, "at": at})
        return points

    def _point(self, trainer, pl_module, heldout) -> None:
        if heldout is None or not trainer.is_global_zero:
            return
        logged = {"repair/wall_s": heldout.wall_s}
        logged.update({f"repair/{k}": v for k, v in ((KL, heldout.kl), (PPL, heldout.ppl)) if v is not None})
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=heldout.step)
        self.write(trainer, pl_module, plot=False)

    def on_train_start(self, trainer, pl_module):
        self._point(trainer, pl_module, pl_module.repair_before())

    def on_validation_end(self, trainer, pl_module):
        self._point(trainer, pl_module, pl_module.repair_validated())

    def on_train_end(self, trainer, pl_module):
        pl_module.end_repair()
        run = pl_module.run
        if run.validated(run.end.step) is not run.end:
            self._point(trainer, pl_module, run.end)
        if trainer.is_global_zero:
            paths = self.write(trainer, pl_module, plot=self.plot)
            rank_zero_info(f"repair curve: {len(self.points(pl_module))} point(s), {run.wall_s:.1f} s; "
                           f"{', '.join(map(str, paths))}")

    def write(self, trainer, pl_module, plot: bool) -> list[Path]:
        from zoo.core.cache import atomic_write_text

        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        points, run = self.points(pl_module), pl_module.run
        record = {"metrics": [KL, PPL], "max_minutes": pl_module.max_minutes, "stopped_at_step": run.budget_stop_step,
                  "state_step": run.restored_step, "wall_s": round(pl_module.wall_s(), 3), "points": points}
        paths = [atomic_write_text(out / f"{FILE}.json", json.dumps(record, indent=2))]
        if plot and points:
            paths.append(plot_curve(points, out / f"{FILE}.png", kept=run.restored_step))
        return paths


def plot_curve(points: list[dict], path: Path, kept: int | None = None) -> Path:
    """Two panels, heldout KL and heldout ppl against wall seconds, one marker per point; a star on the
    point of step ``kept``, the state the run keeps where it is not the last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, (KL, PPL), ("heldout KL (teacher || student)", "heldout perplexity")):
        shown = [p for p in points if p[key] is not None and math.isfinite(p[key])]
        if shown:
            ax.plot([p["wall_s"] for p in shown], [p[key] for p in shown], "-o", ms=3)
        star = [(p["wall_s"], p[key]) for p in shown if p["step"] == kept]
        if star:
            ax.plot(*zip(*star), "*", ms=14, color="tab:red", label=f"the state kept: step {kept}")
            ax.legend()
        ax.set_xlabel("wall seconds of repair")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle("repair curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
