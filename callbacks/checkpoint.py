"""Trainable-only checkpoints and the plain metrics file (DESIGN.md, decision 4; source 000, 2.4).

``RepairStateCheckpoint`` writes the repair state (the trainable tensors only, safetensors, with the
header of ``zoo.core.state``) atomically — temp file then rename — at every validation, at the end of
training, and when the run is interrupted, so nothing is lost. ``MetricsJSON`` writes every logged
metric and the run summary to ``metrics.json`` beside it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from zoo.core.distributed import gathered_parameters, is_sharded


def _dir(trainer: L.Trainer, dirpath: str | None) -> Path:
    return Path(dirpath or trainer.default_root_dir)


class RepairStateCheckpoint(L.Callback):
    """Save the repair state atomically.

    Args:
        dirpath: directory (default: the trainer's ``default_root_dir``).
        filename: file name of the latest state.
        save_best: also keep ``best_<filename>`` at the lowest ``monitor`` seen.
        monitor: metric for ``save_best``.
        adapter_dirname: for a technique with ``save_adapter`` (LoRA), the PEFT adapter directory written
            beside the state at the end of training.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "repair_state.safetensors",
                 save_best: bool = True, monitor: str = "heldout_kl", adapter_dirname: str = "adapter"):
        self.dirpath, self.filename, self.save_best, self.monitor = dirpath, filename, save_best, monitor
        self.adapter_dirname = adapter_dirname
        self.best = math.inf
        self.last_path: Path | None = None

    def _save(self, trainer, pl_module, name: str, gather: bool = True) -> Path | None:
        # under fsdp each process holds shards: gathering them is a collective every process enters;
        # then rank 0 alone writes (under ddp every process holds the same tensors)
        with gathered_parameters(trainer.model) if gather else contextlib.nullcontext():
            if not trainer.is_global_zero:
                return None
            extra = {"global_step": trainer.global_step}
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                extra[self.monitor] = float(value)
            return pl_module.save_repair_state(_dir(trainer, self.dirpath) / name, extra)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.last_path = self._save(trainer, pl_module, self.filename)
        value = trainer.callback_metrics.get(self.monitor)
        if "stopped_by" in getattr(pl_module, "summary", {}):
            return  # a gate restored an earlier state: this validation's metrics do not describe it
        if self.save_best and value is not None and float(value) < self.best:
            self.best = float(value)
            self._save(trainer, pl_module, "best_" + self.filename)

    def on_train_end(self, trainer, pl_module):
        self.last_path = self._save(trainer, pl_module, self.filename)
        if self.last_path is not None:
            size = self.last_path.stat().st_size
            rank_zero_info(f"repair state: {self.last_path} ({size / 1024:.1f} KiB)")
            if hasattr(pl_module, "save_adapter"):  # a LoRA run: also the PEFT adapter other tools load
                adapter = pl_module.save_adapter(self.last_path.parent / self.adapter_dirname,
                                                 {"repair_state": str(self.last_path), "global_step": trainer.global_step})
                rank_zero_info(f"PEFT adapter: {adapter}")

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            if trainer.world_size > 1 and is_sharded(trainer.model):
                rank_zero_info("interrupted: the sharded (fsdp) repair state cannot be gathered now; "
                               f"the last saved one is {self.last_path}")
                return
            path = self._save(trainer, pl_module, self.filename, gather=False)
            rank_zero_info(f"interrupted: repair state saved to {path}")


class MetricsJSON(L.Callback):
    """Every validation's metrics, the run summary and the last training metrics in ``metrics.json``."""

    def __init__(self, dirpath: str | None = None, filename: str = "metrics.json"):
        self.dirpath, self.filename = dirpath, filename
        self.records: list[dict] = []

    @staticmethod
    def _plain(metrics) -> dict:
        return {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) or isinstance(v, (int, float))}

    def _write(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        stage = getattr(trainer.state.fn, "value", str(trainer.state.fn))
        name = self.filename if stage == "fit" else f"{Path(self.filename).stem}_{stage}.json"
        path = _dir(trainer, self.dirpath) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"stage": stage, "global_step": trainer.global_step,
                   "summary": getattr(pl_module, "summary", {}), "validations": self.records,
                   "final": self._plain(trainer.callback_metrics)}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.records.append({"step": trainer.global_step, **self._plain(trainer.callback_metrics)})
        self._write(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        self._write(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self._write(trainer, pl_module)
