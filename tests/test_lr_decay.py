"""The repair's optimizer step: the learning-rate schedule (``lr_decay``: the warm-up, then constant or a cosine to 0
over the run, whose progress is the larger of its steps and its wall time over the budget) and the gradient norm it
logs."""
import csv
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from recipes import CodeDataModule
from recipes.data import CodeConfig

from zoo import DistillationModule, FisherSVD
from zoo.core.errors import ZooError


def module(teacher, **kw):
    return DistillationModule(parts=[FisherSVD(targets="model.layers.0.mlp.down_proj", rank=2)], teacher=teacher,
                              lr=0.01, **kw)


def test_constant_after_the_warm_up(tiny_teacher_dir):
    m = module(tiny_teacher_dir, warmup_steps=4)
    assert [m.lr_factor(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_over_the_steps_or_the_budget_whichever_is_further(tiny_teacher_dir, monkeypatch):
    m = module(tiny_teacher_dir, lr_decay="cosine", max_minutes=1.0)
    m._trainer = SimpleNamespace(estimated_stepping_batches=10)
    monkeypatch.setattr(m, "wall_s", lambda: 0.0)
    assert m.lr_factor(0) == 1.0 and m.lr_factor(5) == pytest.approx(0.5) and m.lr_factor(10) == pytest.approx(0.0)
    monkeypatch.setattr(m, "wall_s", lambda: 45.0)  # three quarters of the budget: ahead of step 5 of 10
    assert m.lr_factor(5) == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))
    monkeypatch.setattr(m, "wall_s", lambda: 90.0)  # past the budget: no step is taken at lr > 0
    assert m.lr_factor(1) == pytest.approx(0.0)
    warm = module(tiny_teacher_dir, lr_decay="cosine", warmup_steps=2)
    warm._trainer = SimpleNamespace(estimated_stepping_batches=4)
    assert [warm.lr_factor(k) for k in range(3)] == pytest.approx([0.5, 0.5 * (1 + math.cos(math.pi / 4)), 0.5])


def test_an_unknown_decay_is_refused_by_name(tiny_teacher_dir):
    with pytest.raises(ZooError, match="lr_decay.*linear.*constant.*cosine"):
        module(tiny_teacher_dir, lr_decay="linear")


def norm(module) -> float:
    return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.trainable_parameters().values()])))


class GradNorms(L.Callback):
    """Each step's gradient norm before the clip and after it (what the optimizer stepped on)."""

    def __init__(self):
        self.before, self.after = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.before.append(norm(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(norm(module))


def test_the_logged_gradient_norm_is_the_trainable_gradients_before_clipping(tiny_teacher_dir, tmp_path):
    m = DistillationModule(parts=[FisherSVD(targets="model.layers.{0..1}.mlp.down_proj", rank=2, train_factors=True)],
                           teacher=tiny_teacher_dir, lr=0.01)
    data = CodeDataModule(teacher=tiny_teacher_dir, code=CodeConfig(max_files=20), seq_len=32, batch_size=2,
                          n_calibration=2, n_train=8, n_heldout=2, max_repeat=4.0)
    norms, clip = GradNorms(), 1e-5
    L.Trainer(max_steps=4, logger=CSVLogger(tmp_path, name="log"), enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[norms],
              log_every_n_steps=2, gradient_clip_val=clip, limit_val_batches=0).fit(m, datamodule=data)
    rows = [r for r in csv.DictReader(open(next(tmp_path.glob("log/*/metrics.csv")))) if r.get("grad_norm")]
    # written on the logging steps (the 2nd and 4th), each that step's norm before the clip
    assert [int(r["step"]) for r in rows] == [1, 3]
    assert [float(r["grad_norm"]) for r in rows] == pytest.approx([norms.before[1], norms.before[3]], rel=1e-5)
    assert norms.after == pytest.approx([clip] * 4, rel=1e-2) and min(norms.before) > 10 * clip
