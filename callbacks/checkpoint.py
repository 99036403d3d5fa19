"""Trainable-only checkpoints and the plain metrics file (source 000, 2.4: repair states of ~1 MB).

``RepairStateCheckpoint`` writes the repair state (the trainable tensors only, safetensors, with the
header of ``zoo.core.state``) atomically — temp file then rename — at every validation, at the end of
training, and when the run is interrupted (Ctrl-C or SIGTERM) once training has started, so nothing is
lost and an earlier run's state is never replaced by an empty one. The state written at the end holds the
tensors the module's repair loop kept (``zoo.core.repair``: the best validated by its ``monitor``, or a
gate's); its header carries their step and monitored value, never an earlier validation's. ``MetricsJSON`` writes every logged metric and the run summary to
``metrics.json`` beside it, only once this run has something to record (it has started training): an
interrupted or failed fit writes what it measured, marked ``"interrupted"``.
"""
from __future__ import annotations

import contextlib
import json
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
        save_best: also keep ``best_<filename>``, the best validated tensors by the module's ``monitor``.
        adapter_dirname: for a student whose part writes an adapter format (``Technique.write_adapter``: LoRA's
            PEFT adapter), the directory written beside the state at the end of training.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "repair_state.safetensors",
                 save_best: bool = True, adapter_dirname: str = "adapter"):
        self.dirpath, self.filename, self.save_best = dirpath, filename, save_best
        self.adapter_dirname = adapter_dirname
        self.started = False
        self.last_path: Path | None = None

    def _save(self, trainer, pl_module, name: str, gather: bool = True) -> Path | None:
        # under fsdp each process holds shards: gathering them is a collective every process enters;
        # then rank 0 alone writes (under ddp every process holds the same tensors)
        with gathered_parameters(trainer.model) if gather else contextlib.nullcontext():
            if not trainer.is_global_zero:
                return None
            run = pl_module.run
            step = run.restored_step if run.restored_step is not None else trainer.global_step
            extra = {"global_step": step}
            validated = run.validated(step)
            if validated is not None and validated.monitor is not None and not run.stopped_by:
                extra[pl_module.monitor] = validated.monitor
            return pl_module.save_repair_state(_dir(trainer, self.dirpath) / name, extra)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, filename=self.filename)

    def on_train_start(self, trainer, pl_module):
        self.started = True

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        validated = pl_module.repair_validated()
        self.last_path = self._save(trainer, pl_module, self.filename)
        best = pl_module.run.best
        if self.save_best and validated is not None and best is validated:
            self._save(trainer, pl_module, "best_" + self.filename)

    def on_train_end(self, trainer, pl_module):
        pl_module.end_repair()
        self.last_path = self._save(trainer, pl_module, self.filename)
        if self.last_path is not None:
            size = self.last_path.stat().st_size
            rank_zero_info(f"repair state: {self.last_path} ({size / 1024:.1f} KiB)")
            adapter = pl_module.write_adapter(self.last_path.parent / self.adapter_dirname,
                                              {"repair_state": str(self.last_path), "global_step": trainer.global_step})
            if adapter is not None:  # also the adapter other tools load
                rank_zero_info(f"adapter: {adapter}")

    def on_exception(self, trainer, pl_module, exception):
        if not (isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit"):
            return
        if not self.started:  # nothing trained yet: an earlier run's state stays as it is
            rank_zero_info("interrupted before training started: no repair state written")
            return
        if trainer.world_size > 1 and is_sharded(trainer.model):
            rank_zero_info("interrupted: the sharded (fsdp) repair state cannot be gathered now; "
                           f"the last saved one is {self.last_path}")
            return
        path = self._save(trainer, pl_module, self.filename, gather=False)
        rank_zero_info(f"interrupted at step {trainer.global_step}: repair state saved to {path}")


def cuda_peak_gib(pl_module) -> float | None:
    """The process's peak allocated CUDA memory so far (``torch.cuda.max_memory_allocated``), GiB; None off
    CUDA. A ``zoo`` command is one process, so it is that command's peak (what ``zoo frontier`` records per
    stage)."""
    device = getattr(pl_module, "device", None)
    if device is None or device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


class MetricsJSON(L.Callback):
    """Every validation's metrics, the run summary, the last training metrics and the CUDA peak memory
    (``cuda_peak_gib``, None off CUDA) in ``metrics.json``; ``interrupted`` says why a run ended early (the
    exception), None for a run that finished."""

    def __init__(self, dirpath: str | None = None, filename: str = "metrics.json"):
        self.dirpath, self.filename = dirpath, filename
        self.records: list[dict] = []
        self.started = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, filename=self.filename)

    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state: dict) -> None:
        self.records = state["records"]

    @staticmethod
    def _plain(metrics) -> dict:
        return {k: float(v) for k, v in metrics.items() if torch.is_tensor(v) or isinstance(v, (int, float))}

    def _write(self, trainer, pl_module, interrupted: str | None = None):
        if not trainer.is_global_zero:
            return
        stage = getattr(trainer.state.fn, "value", str(trainer.state.fn))
        name = self.filename if stage == "fit" else f"{Path(self.filename).stem}_{stage}.json"
        path = _dir(trainer, self.dirpath) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"stage": stage, "global_step": trainer.global_step,
                   "summary": getattr(pl_module, "summary", {}), "validations": self.records,
                   "final": self._plain(trainer.callback_metrics), "cuda_peak_gib": cuda_peak_gib(pl_module),
                   "interrupted": interrupted}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.records.append({"step": trainer.global_step, **self._plain(trainer.callback_metrics)})
        self._write(trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        self.started = True

    def on_fit_end(self, trainer, pl_module):
        self._write(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage):
        # after every callback's on_fit_end: the gates' verdicts are in the summary whatever their order
        if stage == "fit" and self.started:
            self._write(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        # an earlier run's metrics.json is kept unless this run got as far as training
        if self.started or self.records:
            why = str(exception).strip().splitlines()[0] if str(exception).strip() else ""
            self._write(trainer, pl_module, f"{type(exception).__name__}: {why}".rstrip(": "))
