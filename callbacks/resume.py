"""Exact resume: an interrupted ``zoo fit`` continues as if it had never stopped.

A repair run trains only its replacements, so everything a resume needs is small: the trainable tensors,
the optimizer's and scheduler's state, Lightning's loop counters, every callback's state (gate histories,
the best state so far), the torch RNG, and how far into the epoch's data order the run was. ``Resume``
writes that to ``<run dir>/resume.safetensors`` (``zoo.core.state.save_checkpoint``: tensors in
safetensors, the rest as JSON — no pickle) at every validation and when the run is stopped.

Stopping is graceful: the first Ctrl-C or SIGTERM during training asks the run to stop after the step in
progress (``STOP``), where the state is whole — after the validation, if one is due then or running — ; the
checkpoint is written there and the run exits non-zero. A second signal stops at once. Lightning's own
SIGTERM handler is taken out of the way while training: it ends a running validation with ``SystemExit(0)``,
before any state is written. ``zoo fit --resume RUN_DIR`` hands the file to Lightning as its
``ckpt_path`` (through ``SafetensorsCheckpointIO``), and the data loader skips the batches of the epoch
that were already trained on, so interrupt + resume gives the uninterrupted run's tensors bit for bit.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from zoo.core.state import RESUME_FILE, load_checkpoint, save_checkpoint


class StopRequest:
    """Signals received while training is running become a request to stop at the next step boundary."""

    def __init__(self):
        self.armed = False
        self.requested: int | None = None

    def signal(self, signum, frame=None):
        if not self.armed or self.requested is not None:  # outside training, or a second signal: at once
            raise KeyboardInterrupt(f"signal {signum}")
        self.requested = signum
        rank_zero_info(f"signal {signum}: stopping after this step (send it again to stop at once)")


STOP = StopRequest()


def own_signals() -> None:
    """Route SIGINT and SIGTERM to ``STOP`` alone. Lightning installs its SIGTERM handler just before training
    (and restores ours at teardown); its loops then raise ``SIGTERMException``, a ``SystemExit`` with status
    0, partway through a validation, which would leave no resume file and tell a scheduler the job succeeded."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, STOP.signal)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning's checkpoint dict as safetensors + JSON (``zoo.core.state``), never a pickle."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        # hyper-parameters serve load_from_checkpoint, which the zoo never uses: it rebuilds from the recipe
        save_checkpoint({k: v for k, v in checkpoint.items() if not k.endswith("hyper_parameters")}, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint(path)

    def remove_checkpoint(self, path):
        Path(path).unlink(missing_ok=True)


class Resume(L.Callback):
    """Write the resume checkpoint at every validation and on a requested stop; restore the RNG and the
    data position on resume (see the module docstring)."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.path: Path | None = None

    @property
    def state_key(self) -> str:
        return "Resume"

    def _save(self, trainer) -> None:
        self.path = Path(self.dirpath or trainer.default_root_dir) / RESUME_FILE
        trainer.save_checkpoint(self.path)

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer

    def state_dict(self) -> dict:
        # the batches of this epoch trained on so far: Lightning continues its count from here on resume
        done = self._trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"rng": torch.get_rng_state(), "epoch_batches": int(done)}

    def load_state_dict(self, state: dict) -> None:
        # Lightning restores callbacks after setup and before it builds the train loader, which then leaves
        # those batches out (``resume_skip``; a finished epoch starts afresh)
        self._restored = state
        if self._trainer.datamodule is not None:
            self._trainer.datamodule.resume_skip = state["epoch_batches"]

    def on_train_start(self, trainer, pl_module):
        restored = getattr(self, "_restored", None)
        if restored is not None:
            torch.set_rng_state(restored["rng"])
            skip = getattr(trainer.train_dataloader, "skip", 0)
            rank_zero_info(f"resumed at step {trainer.global_step} ({skip} batches into epoch {trainer.current_epoch})")
        STOP.armed, STOP.requested = True, None
        own_signals()

    def _stop(self, trainer) -> None:
        self._save(trainer)
        rank_zero_info(f"stopped at step {trainer.global_step}; resume checkpoint {self.path} "
                       f"(continue with: zoo fit --config ... --resume {self.path.parent})")
        raise KeyboardInterrupt(f"signal {STOP.requested}")

    @staticmethod
    def _validation_follows(trainer) -> bool:
        """Whether Lightning validates right after this batch (the same test its epoch loop makes next)."""
        loop = trainer.fit_loop
        fetcher = getattr(loop, "_data_fetcher", None)
        check = getattr(loop.epoch_loop, "_should_check_val_fx", None)
        return bool(fetcher is not None and check is not None and check(fetcher))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # a validation due after this batch runs first: a resumed run would not run it again
        if STOP.requested is not None and not self._validation_follows(trainer):
            self._stop(trainer)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "fit" and STOP.armed:
            if STOP.requested is not None:
                self._stop(trainer)
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        STOP.armed = False

    def on_exception(self, trainer, pl_module, exception):
        STOP.armed = False
