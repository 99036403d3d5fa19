"""Trainable-only checkpoints and the plain metrics file (source 000, 2.4: repair states of ~1 MB).

``RepairStateCheckpoint`` writes the repair state (the trainable tensors only, safetensors, with the
header of ``zoo.core.state``) atomically — temp file then rename — at every validation, at the end of
training, and when the run is interrupted (Ctrl-C or SIGTERM) once training has started, so nothing is
lost and an earlier run's state is never replaced by an empty one. The state written at the end is the
best validated one (lowest finite ``monitor``); its header carries the step and the KL of the tensors it
holds, never an earlier validation's. ``MetricsJSON`` writes every logged metric and the run summary to
``metrics.json`` beside it, only once this run has something to record (it has started training): an
interrupted or failed fit writes what it measured, marked ``"interrupted"``.
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
        adapter_dirname: for a run of one technique with an adapter format (``Technique.write_adapter``: LoRA's
            PEFT adapter), the directory it is written to beside the state at the end of training.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "repair_state.safetensors",
                 save_best: bool = True, monitor: str = "heldout_kl", adapter_dirname: str = "adapter"):
        self.dirpath, self.filename, self.save_best, self.monitor = dirpath, filename, save_best, monitor
        self.adapter_dirname = adapter_dirname
        self.best = math.inf
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.validated: dict[int, float] = {}  # step -> monitor value of the tensors at that step
        self.started = False
        self.last_path: Path | None = None

    def _save(self, trainer, pl_module, name: str, gather: bool = True) -> Path | None:
        # under fsdp each process holds shards: gathering them is a collective every process enters;
        # then rank 0 alone writes (under ddp every process holds the same tensors)
        with gathered_parameters(trainer.model) if gather else contextlib.nullcontext():
            if not trainer.is_global_zero:
                return None
            step = pl_module.summary.get("repair_state_step", trainer.global_step)
            extra = {"global_step": step}
            if step in self.validated:
                extra[self.monitor] = self.validated[step]
            return pl_module.save_repair_state(_dir(trainer, self.dirpath) / name, extra)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, filename=self.filename)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "best_state": self.best_state,
                "validated": self.validated}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.best_state = state["best"], state["best_step"], state["best_state"]
        self.validated = state["validated"]

    def on_train_start(self, trainer, pl_module):
        self.started = True

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if "stopped_by" in pl_module.summary:
            # a gate restored an earlier state: this validation's metrics do not describe it
            self.last_path = self._save(trainer, pl_module, self.filename)
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.validated[trainer.global_step] = float(value)
        self.last_path = self._save(trainer, pl_module, self.filename)
        if value is not None and math.isfinite(float(value)) and float(value) < self.best:
            self.best, self.best_step = float(value), trainer.global_step
            with gathered_parameters(trainer.model):
                self.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in pl_module.trainable_parameters().items()}
            if self.save_best:
                self._save(trainer, pl_module, "best_" + self.filename)

    def _keep_best(self, trainer, pl_module) -> None:
        """Put the best validated tensors back when the run ended on worse (or unvalidated) ones."""
        if (self.best_state is None or "stopped_by" in pl_module.summary
                or self.best_step == trainer.global_step):
            return
        with torch.no_grad(), gathered_parameters(trainer.model):
            for name, p in pl_module.trainable_parameters().items():
                p.copy_(self.best_state[name].to(p.device))
        pl_module.summary["repair_state_step"] = self.best_step
        rank_zero_info(f"the final repair state holds the best validated tensors: step {self.best_step}, "
                       f"{self.monitor} {self.best:.6f} (the last step, {trainer.global_step}, was not better)")

    def on_train_end(self, trainer, pl_module):
        self._keep_best(trainer, pl_module)
        self.last_path = self._save(trainer, pl_module, self.filename)
        if self.last_path is not None:
            size = self.last_path.stat().st_size
            rank_zero_info(f"repair state: {self.last_path} ({size / 1024:.1f} KiB)")
            parts = getattr(pl_module, "parts", [])
            adapter = parts[0].write_adapter(pl_module, self.last_path.parent / self.adapter_dirname,
                                             {"repair_state": str(self.last_path), "global_step": trainer.global_step}
                                             ) if len(parts) == 1 else None
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

    def on_exception(self, trainer, pl_module, exception):
        # an earlier run's metrics.json is kept unless this run got as far as training
        if self.started or self.records:
            why = str(exception).strip().splitlines()[0] if str(exception).strip() else ""
            self._write(trainer, pl_module, f"{type(exception).__name__}: {why}".rstrip(": "))
