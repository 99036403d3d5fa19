"""A callback that sends the process a signal at a chosen point of a fit: how the tests interrupt a real run."""
from __future__ import annotations

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Send ``signal`` (SIGINT or SIGTERM) to this process at ``when``: ``setup`` (before training, while
    the data and the student are built) or after the training batch that ends at global step ``step``."""

    def __init__(self, signal: str = "SIGINT", when: str = "step", step: int = 1):
        self.signum, self.when, self.step = getattr(signal_module, signal), when, step

    def setup(self, trainer, pl_module, stage):
        if self.when == "setup":
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.when == "step" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


signal_module = signal


class PoisonAt(L.Callback):
    """Set every trainable tensor to NaN after the training batch that ends at global step ``step``: a run
    that diverges there, for real, from then on."""

    def __init__(self, step: int = 1):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import torch

            with torch.no_grad():
                for p in pl_module.trainable_parameters().values():
                    p.fill_(float("nan"))
