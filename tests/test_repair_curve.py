"""``callbacks.RepairCurve`` on the tiny teacher: the curve's points (train start, every validation, the end
state), its JSON, PNG and logged ``repair/wall_s``, the ``max_minutes`` budget, a resumed fit's curve, bad
budgets, and the documented command-line override of a recipe's budget."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from test_cli import run
from test_reliability import config_with
from zoo_cli import zoo_cli

CURVE = {"class_path": "callbacks.RepairCurve"}
ROOT = Path(__file__).resolve().parents[1]


def curve_of(run_dir):
    return json.loads((run_dir / "repair_curve.json").read_text())


def assert_ordered(points):
    steps, walls = [p["step"] for p in points], [p["wall_s"] for p in points]
    assert steps == sorted(set(steps)), steps  # strictly increasing
    assert walls == sorted(walls), walls


def test_curve_points_files_and_logged_wall_time(tmp_path, tiny_teacher_dir, capsys, monkeypatch):
    import callbacks.gates as gates

    calls = []  # the heldout passes of the callbacks (the real function, counted)
    real = gates.evaluate_heldout
    monkeypatch.setattr(gates, "evaluate_heldout", lambda *a: calls.append(1) or real(*a))
    from zoo.core.module import DistillationModule

    real_kl = DistillationModule.evaluate_kl
    monkeypatch.setattr(DistillationModule, "evaluate_kl", lambda *a, **k: calls.append(1) or real_kl(*a, **k))
    # 8 steps of 4 per epoch: validations at steps 4 and 8
    config = config_with(tmp_path, tiny_teacher_dir, CURVE, max_steps=8)
    logs = tmp_path / "csv"
    code, err = run(["fit", "--config", config, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                     "--trainer.logger.save_dir", str(logs)], capsys)
    assert code == 0, err
    run_dir = tmp_path / "run"
    curve, metrics = curve_of(run_dir), json.loads((run_dir / "metrics.json").read_text())
    points = curve["points"]
    assert curve["metrics"] == ["heldout_kl", "heldout_ppl"] and curve["stopped_at_step"] is None
    assert [(p["step"], p["at"]) for p in points] == [(0, "train_start"), (4, "validation"), (8, "validation")]
    assert_ordered(points)
    assert points[0]["wall_s"] < points[-1]["wall_s"] <= curve["wall_s"]
    # the train-start point is the unrepaired student, as the gate measures it; the others are the validations
    assert points[0]["heldout_kl"] == pytest.approx(metrics["summary"]["heldout_kl_before"], rel=1e-5)
    assert len(calls) == 1  # the gate and the curve share one evaluation at train start; validation does the rest
    assert [p["heldout_kl"] for p in points[1:]] == pytest.approx([v["heldout_kl"] for v in metrics["validations"]])
    assert [p["heldout_ppl"] for p in points[1:]] == pytest.approx([v["heldout_ppl"] for v in metrics["validations"]])
    assert all(math.isfinite(p["heldout_ppl"]) and p["heldout_ppl"] > 1 for p in points)
    assert metrics["summary"]["repair_wall_s"] >= points[-1]["wall_s"]
    png = (run_dir / "repair_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    rows = list(csv.DictReader(open(next(logs.rglob("metrics.csv")))))
    logged = {int(r["step"]): float(r["repair/wall_s"]) for r in rows if r.get("repair/wall_s")}
    assert logged == {p["step"]: pytest.approx(p["wall_s"]) for p in points}


def test_max_minutes_stops_early_and_the_last_point_is_the_end_state(tmp_path, tiny_teacher_dir, capsys):
    budget = {"class_path": "callbacks.RepairCurve", "init_args": {"max_minutes": 1e-4}}  # 6 ms: after one step
    config = config_with(tmp_path, tiny_teacher_dir, budget, max_steps=8)
    code, err = run(["fit", "--config", config], capsys)
    assert code == 0, err
    run_dir = tmp_path / "run"
    curve, metrics = curve_of(run_dir), json.loads((run_dir / "metrics.json").read_text())
    step = metrics["global_step"]
    assert 0 < step < 8
    assert curve["stopped_at_step"] == step == metrics["summary"]["repair_budget_stop_step"]
    assert curve["points"][-1]["step"] == step and math.isfinite(curve["points"][-1]["heldout_kl"])
    assert curve["points"][-1]["wall_s"] >= 1e-4 * 60
    assert_ordered(curve["points"])


def test_the_end_state_gets_a_point_without_a_validation(tmp_path, tiny_teacher_dir, capsys):
    # 2 steps of a 4-batch epoch: no validation ran; the callback evaluates the state training ended with
    config = config_with(tmp_path, tiny_teacher_dir, CURVE, max_steps=2)
    assert run(["fit", "--config", config], capsys)[0] == 0
    points = curve_of(tmp_path / "run")["points"]
    assert [(p["step"], p["at"]) for p in points] == [(0, "train_start"), (2, "end")]
    assert points[1]["heldout_kl"] != points[0]["heldout_kl"]


def test_a_resumed_fit_continues_the_curve_and_its_wall_time(tmp_path, tiny_teacher_dir, capsys):
    from zoo.core.state import load_checkpoint

    stop = {"class_path": "signals.SignalAt", "init_args": {"signal": "SIGINT", "step": 5}}
    config = config_with(tmp_path, tiny_teacher_dir, CURVE, stop, max_steps=12)
    code, err = run(["fit", "--config", config], capsys)
    assert code not in (0, None), err
    run_dir = tmp_path / "run"
    first = curve_of(run_dir)["points"]
    assert [p["step"] for p in first] == [0, 4]
    saved = load_checkpoint(run_dir / "resume.safetensors")["callbacks"]["RepairCurve"]
    assert saved["points"] == first and saved["wall_s"] >= first[-1]["wall_s"]
    code, err = run(["fit", "--config", config, "--resume", str(run_dir)], capsys)
    assert code == 0, err
    points = curve_of(run_dir)["points"]
    assert points[:2] == first and [p["step"] for p in points] == [0, 4, 8, 12]
    assert points[2]["wall_s"] > saved["wall_s"]  # the interrupted session's seconds are counted
    assert_ordered(points)


def test_loaded_wall_time_is_carried_on():
    from callbacks import RepairCurve

    curve = RepairCurve()
    curve.load_state_dict({"points": [{"step": 3, "wall_s": 5000.0}], "wall_s": 5000.0, "stopped_at": None})
    curve.on_fit_start(None, None)
    assert 5000.0 <= curve.wall_s() < 5060.0 and curve.points == [{"step": 3, "wall_s": 5000.0}]
    assert curve.state_dict()["wall_s"] >= 5000.0


@pytest.mark.parametrize("value", [0, -1.5, float("nan")])
def test_bad_max_minutes_is_refused_with_its_value(value):
    from callbacks import RepairCurve
    from zoo.core.errors import ZooError

    with pytest.raises(ZooError, match=rf"max_minutes must be > 0.*got {value}"):
        RepairCurve(max_minutes=value)


def test_a_recipes_budget_is_set_on_the_command_line(capsys):
    # the command docs/guides/recipes.md gives; RepairCurve is the recipe's last callback, so it gets the option
    code, out, err = zoo_cli(["fit", "--config", str(ROOT / "configs/recipes/compress_svdllm.yaml"),
                              "--trainer.callbacks.max_minutes", "30", "--print_config"], capsys)
    assert code in (0, None), err
    callbacks = yaml.safe_load(out)["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks][-1] == "callbacks.RepairCurve"
    assert callbacks[-1]["init_args"]["max_minutes"] == 30.0
    assert "max_minutes" not in callbacks[0]["init_args"]  # the gate's options are untouched


@pytest.mark.parametrize("limit,expected", [(1.0, 5), (2, 2), (0.5, 2), (0.01, 1), (None, 5)])
def test_gates_and_curves_read_the_batches_validation_reads(limit, expected):
    """A recipe that validates on ``limit_val_batches`` gets its gate and curve numbers on the same batches."""
    from types import SimpleNamespace

    from callbacks.gates import heldout_loader

    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_dataloader=lambda: list(range(5))),
                              limit_val_batches=limit)
    assert list(heldout_loader(trainer)) == list(range(expected))
