"""The repair's learning-rate schedule (``lr_decay``): the warm-up, then constant or a cosine to 0 over the run,
whose progress is the larger of its steps and its wall time over the budget."""
import math
from types import SimpleNamespace

import pytest

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
