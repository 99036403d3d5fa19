"""A callback that sends the process a signal at a chosen point of a fit: how the tests interrupt a real run."""
from __future__ import annotations

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Send ``signal`` (SIGINT or SIGTERM) to this process at ``when``: ``setup`` (before training, while
    the data and the student are built), ``step`` (after the training batch that ends at global step
    ``step``), ``validation`` (after the first batch of the validation at global step ``step``) or ``save``
    (as the repair state of global step ``step`` is being written). Once: a second signal means "at once"."""

    def __init__(self, signal: str = "SIGINT", when: str = "step", step: int = 1):
        self.signum, self.when, self.step = getattr(signal_module, signal), when, step
        self.sent = False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def setup(self, trainer, pl_module, stage):
        if self.when == "setup":
            self._send()
        if self.when == "save":
            write = pl_module.save_repair_state

            def save_repair_state(*args, **kwargs):
                if trainer.global_step == self.step and not trainer.sanity_checking:
                    self._send()
                return write(*args, **kwargs)

            pl_module.save_repair_state = save_repair_state

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.when == "step" and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if (self.when == "validation" and trainer.global_step == self.step and batch_idx == 0
                and not trainer.sanity_checking):
            self._send()


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
