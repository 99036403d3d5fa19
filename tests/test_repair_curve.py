"""``callbacks.RepairCurve`` on the tiny teacher: the curve's points (train start, every validation, the end
state), its JSON, PNG and logged ``repair/wall_s``, the repair's ``max_minutes`` budget, a resumed fit's curve,
bad budgets, the documented command-line override of a recipe's budget, and one record whatever the order of
the callbacks that read it."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from test_cli import run
from test_reliability import config_with
from zoo.core.errors import ZooError
from zoo.core.repair import RepairLoop
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
    from zoo.core.module import DistillationModule

    calls = []  # the heldout passes outside validation (the one evaluator, counted)
    real = DistillationModule.evaluate_heldout
    monkeypatch.setattr(DistillationModule, "evaluate_heldout", lambda *a, **k: calls.append(1) or real(*a, **k))
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
    config = config_with(tmp_path, tiny_teacher_dir, CURVE, max_steps=8)
    code, err = run(["fit", "--config", config, "--model.init_args.max_minutes", "1e-4"], capsys)  # 6 ms: one step
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
    saved = load_checkpoint(run_dir / "resume.safetensors")["zoo_run"]  # the module's record of the repair
    assert [saved["before"]["step"]] + [v["step"] for v in saved["validations"]] == [0, 4]
    assert saved["wall_s"] >= first[-1]["wall_s"]
    code, err = run(["fit", "--config", config, "--resume", str(run_dir)], capsys)
    assert code == 0, err
    points = curve_of(run_dir)["points"]
    assert points[:2] == first and [p["step"] for p in points] == [0, 4, 8, 12]
    assert points[2]["wall_s"] > saved["wall_s"]  # the interrupted session's seconds are counted
    assert_ordered(points)


class Loop(RepairLoop):
    summary: dict = {}


def test_loaded_wall_time_is_carried_on():
    loop = Loop()
    loop.init_repair("heldout_kl", None)
    loop.on_fit_start()
    loop.load_repair_run({"zoo_run": {"validations": [{"step": 3, "wall_s": 5000.0}], "wall_s": 5000.0}})
    assert 5000.0 <= loop.wall_s() < 5060.0 and loop.run.validated(3).wall_s == 5000.0
    checkpoint = {}
    loop.save_repair_run(checkpoint)
    assert checkpoint["zoo_run"]["wall_s"] >= 5000.0


@pytest.mark.parametrize("value", [0, -1.5, float("nan")])
def test_bad_max_minutes_is_refused_with_its_value(value):
    with pytest.raises(ZooError, match=rf"max_minutes must be > 0.*got {value}"):
        Loop().init_repair("heldout_kl", value)


def test_the_curve_names_where_its_old_budget_went():
    from callbacks import RepairCurve

    with pytest.raises(ZooError, match="model.init_args.max_minutes"):
        RepairCurve(max_minutes=30)


def test_a_recipes_budget_is_set_on_the_command_line(capsys):
    # the command docs/guides/recipes.md gives: the budget is the repair's own option
    code, out, err = zoo_cli(["fit", "--config", str(ROOT / "configs/recipes/compress_svdllm.yaml"),
                              "--model.init_args.max_minutes", "30", "--print_config"], capsys)
    assert code in (0, None), err
    assert yaml.safe_load(out)["model"]["init_args"]["max_minutes"] == 30.0


@pytest.mark.parametrize("limit,expected", [(1.0, 5), (2, 2), (0.5, 2), (0.01, 1), (None, 5)])
def test_gates_and_curves_read_the_batches_validation_reads(limit, expected):
    """A recipe that validates on ``limit_val_batches`` gets its gate and curve numbers on the same batches."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_dataloader=lambda: list(range(5))),
                              limit_val_batches=limit)
    assert list(RepairLoop.heldout_loader(SimpleNamespace(trainer=trainer))) == list(range(expected))


def test_the_record_is_the_same_whatever_the_order_of_the_callbacks(tmp_path, tiny_teacher_dir, capsys):
    """Gate, checkpoint, curve and metrics each ask the module's repair loop; reversed, they find the same
    numbers and the run keeps the same tensors (6 steps: validated at 4, ended unvalidated at 6)."""
    from safetensors.torch import load_file

    results = []
    for order in ("forward", "reversed"):
        (tmp_path / order).mkdir()
        config = config_with(tmp_path / order, tiny_teacher_dir, CURVE, {"class_path": "callbacks.MetricsJSON"},
                             max_steps=6, default_root_dir=str(tmp_path / order / "run"))
        recipe = yaml.safe_load(open(config))
        if order == "reversed":
            recipe["trainer"]["callbacks"].reverse()
            open(config, "w").write(yaml.safe_dump(recipe))
        assert run(["fit", "--config", config], capsys)[0] == 0
        run_dir = tmp_path / order / "run"
        summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
        points = [(p["step"], p["heldout_kl"]) for p in curve_of(run_dir)["points"]]
        results.append(({k: v for k, v in summary.items() if "wall" not in k}, points,
                        load_file(run_dir / "repair_state.safetensors")))
    (first, points, state), (second, points_b, state_b) = results
    assert {"heldout_kl_before", "heldout_kl_after"} <= set(first) and first == second
    assert [s for s, _ in points] == [0, 4, 6] and points == points_b
    assert state.keys() == state_b.keys() and all(torch.equal(state[k], state_b[k]) for k in state)
