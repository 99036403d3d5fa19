"""Gates: fail a run whose result breaks a rule (source 000, section 3.2).

``HeldoutKLGate``: heldout KL must not get worse through repair by more than ``tolerance`` and must
not end above ``max_kl``.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from zoo.core.errors import ZooError


class GateFailed(ZooError):
    """A gate rejected the run; the CLI exits non-zero with the message."""


def run_dir(trainer: L.Trainer) -> str:
    return trainer.default_root_dir


class HeldoutKLGate(L.Callback):
    """Heldout KL (teacher vs student) before repair and at each validation; checked at fit end.

    Args:
        tolerance: the final KL may exceed the initial KL by at most this much.
        max_kl: the final KL must not exceed this (None: no bound).
    """

    def __init__(self, tolerance: float = 0.0, max_kl: float | None = None):
        self.tolerance, self.max_kl = tolerance, max_kl
        self.initial: float | None = None
        self.history: list[tuple[int, float]] = []

    def _evaluate(self, trainer, pl_module) -> float:
        loader = trainer.datamodule.val_dataloader()
        was_training = pl_module.training
        pl_module.eval()
        value = pl_module.evaluate_kl(loader, pl_module.device, trainer.strategy.precision_plugin.forward_context)
        pl_module.train(was_training)
        return trainer.strategy.reduce(value, reduce_op="mean") if trainer.world_size > 1 else value

    def _log(self, trainer, metrics: dict[str, float]):
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module):
        self.initial = float(self._evaluate(trainer, pl_module))
        pl_module.summary["heldout_kl_before"] = self.initial
        self._log(trainer, {"heldout_kl_before": self.initial})
        rank_zero_info(f"heldout KL before repair: {self.initial:.6f}")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or "heldout_kl" not in trainer.callback_metrics:
            return
        self.history.append((trainer.global_step, float(trainer.callback_metrics["heldout_kl"])))

    def on_fit_end(self, trainer, pl_module):
        if self.initial is None:
            return  # no training happened
        if self.history and self.history[-1][0] == trainer.global_step:
            final = self.history[-1][1]
        else:
            final = float(self._evaluate(trainer, pl_module))
        pl_module.summary["heldout_kl_after"] = final
        self._log(trainer, {"heldout_kl_after": final})
        rank_zero_info(f"heldout KL after repair:  {final:.6f} (before {self.initial:.6f}, "
                       f"change {final - self.initial:+.6f})")
        if final > self.initial + self.tolerance:
            raise GateFailed(
                f"HeldoutKLGate: heldout KL got worse through repair: {self.initial:.6f} -> {final:.6f} "
                f"(tolerance {self.tolerance})"
            )
        if self.max_kl is not None and final > self.max_kl:
            raise GateFailed(f"HeldoutKLGate: final heldout KL {final:.6f} is above max_kl={self.max_kl}")
