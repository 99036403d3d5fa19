"""A run never lies and never loses work: interrupts (SIGINT and SIGTERM), divergence, unwritable outputs,
foreign or damaged checkpoints and caches, each end to end through the ``zoo`` CLI on a tiny teacher."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from test_cli import assert_clean_error, run
from zoo_cli import write_config

SIGNAL = "signals.SignalAt"


def header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in f.metadata().items() if k != "zoo_format"}


def config_with(tmp_path, teacher, *callbacks, **trainer):
    """The tiny recipe with extra callbacks (validations at steps 4 and 8)."""
    import yaml

    path = write_config(tmp_path, teacher, **trainer)
    config = yaml.safe_load(open(path))
    config["trainer"]["callbacks"] += list(callbacks)
    open(path, "w").write(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("signal", ["SIGINT", "SIGTERM"])
def test_an_interrupt_saves_the_state_it_reached_with_an_honest_header(signal, tmp_path, tiny_teacher_dir, capsys,
                                                                      caplog):
    stop = {"class_path": SIGNAL, "init_args": {"signal": signal, "step": 6}}
    code, err = run(["fit", "--config", config_with(tmp_path, tiny_teacher_dir, stop)], capsys)
    assert code not in (0, None), err  # an interrupted run is not a success
    state = tmp_path / "run" / "repair_state.safetensors"
    meta = header(state)
    assert meta["global_step"] == 6
    assert "heldout_kl" not in meta, "step 6 was never validated: the header must not carry step 4's KL"
    assert "interrupted at step 6" in caplog.text  # Lightning's logger: its handler is not our stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["interrupted"].startswith("KeyboardInterrupt") and metrics["global_step"] == 6
    assert [v["step"] for v in metrics["validations"]] == [4] and "heldout_kl_before" in metrics["summary"]


@pytest.mark.parametrize("signal", ["SIGINT", "SIGTERM"])
def test_an_interrupt_before_training_keeps_the_earlier_run_files(signal, tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir, max_steps=4)
    assert run(["fit", "--config", config], capsys)[0] == 0
    run_dir = tmp_path / "run"
    before = {name: (run_dir / name).read_bytes()
              for name in ("repair_state.safetensors", "metrics.json", "config.yaml")}
    stop = {"class_path": SIGNAL, "init_args": {"signal": signal, "when": "setup"}}
    code, err = run(["fit", "--config", config_with(tmp_path, tiny_teacher_dir, stop, max_steps=4)], capsys)
    assert code not in (0, None), err
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_a_diverged_run_keeps_its_best_finite_state_with_that_states_kl(tmp_path, tiny_teacher_dir, capsys):
    poison = {"class_path": "signals.PoisonAt", "init_args": {"step": 6}}  # validations at 4 (fine) and 8 (NaN)
    code, err = run(["fit", "--config", config_with(tmp_path, tiny_teacher_dir, poison)], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    by_step = {v["step"]: v["heldout_kl"] for v in metrics["validations"]}
    assert by_step[8] != by_step[8] and by_step[4] == by_step[4]  # NaN at 8, finite at 4
    meta = header(tmp_path / "run" / "repair_state.safetensors")
    assert meta["global_step"] == 4 and meta["heldout_kl"] == pytest.approx(by_step[4])
    assert metrics["summary"]["heldout_kl_after"] == pytest.approx(by_step[4])
    with safe_open(str(tmp_path / "run" / "repair_state.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).isfinite().all() for k in f.keys())


def test_a_nan_final_kl_fails_the_gate(tmp_path, tiny_teacher_dir, capsys):
    # diverged before the first validation (step 4): no finite state to fall back on
    callbacks = [{"class_path": "callbacks.HeldoutKLGate", "init_args": {"tolerance": 1e9}},
                 {"class_path": "signals.PoisonAt", "init_args": {"step": 2}}]
    config = write_config(tmp_path, tiny_teacher_dir, callbacks=callbacks)
    assert_clean_error(*run(["fit", "--config", config], capsys), "HeldoutKLGate", "nan", "diverged")


def test_a_run_that_diverges_after_a_finite_validation_ends_on_it(tmp_path, tiny_teacher_dir, capsys):
    # validated at 4, poisoned at 6: the repair keeps step 4's tensors, with or without a checkpoint callback
    callbacks = [{"class_path": "callbacks.HeldoutKLGate", "init_args": {"tolerance": 1e9}},
                 {"class_path": "signals.PoisonAt", "init_args": {"step": 6}}, {"class_path": "callbacks.RepairCurve"}]
    config = write_config(tmp_path, tiny_teacher_dir, callbacks=callbacks)
    code, err = run(["fit", "--config", config], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    at_4 = next(v["heldout_kl"] for v in metrics["validations"] if v["step"] == 4)
    assert metrics["summary"]["repair_state_step"] == 4 and metrics["summary"]["heldout_kl_after"] == at_4
    # the curve's record names the state kept too (its plot stars it)
    assert json.loads((tmp_path / "run" / "repair_curve.json").read_text())["state_step"] == 4


@pytest.mark.parametrize("lr", ["inf", "nan", "-0.001"])
def test_a_learning_rate_that_is_not_a_finite_non_negative_number_is_refused(lr, tmp_path, capsys):
    config = write_config(tmp_path, str(tmp_path / "no_such_teacher"))
    assert_clean_error(*run(["fit", "--config", config, f"--model.init_args.lr={lr}"], capsys), "lr", lr)


def test_unwritable_run_directory_fails_before_the_teacher_loads(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # the teacher does not exist either: the run directory must be the first thing reported
    config = write_config(tmp_path, str(tmp_path / "no_such_teacher"))
    code, err = run(["fit", "--config", config, "--trainer.default_root_dir", str(blocker / "run")], capsys)
    assert_clean_error(code, err, "trainer.default_root_dir", "a_file", "not writable")


@pytest.mark.parametrize("ckpt, needles", [
    ("https://example.com/state.safetensors", ["is a URL"]),
    ("model.ckpt", ["not a repair state", ".ckpt"]),
    ("missing.safetensors", ["does not exist"]),
    ("garbage.safetensors", ["not a safetensors file", "garbage.safetensors"]),
    ("foreign.safetensors", ["not a zoo repair state"]),
    ("empty_run_dir", ["repair_state.safetensors", "does not exist"]),
])
def test_bad_ckpt_paths_are_refused_before_the_teacher_loads(ckpt, needles, tmp_path, capsys):
    from safetensors.torch import save_file
    import torch

    (tmp_path / "garbage.safetensors").write_bytes(b"\x07" * 64)
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "empty_run_dir").mkdir()
    path = ckpt if "://" in ckpt else str(tmp_path / ckpt)
    config = write_config(tmp_path, str(tmp_path / "no_such_teacher"))
    code, err = run(["validate", "--config", config, "--ckpt_path", path], capsys)
    assert_clean_error(code, err, *needles)
    assert "no_such_teacher" not in err


def test_damaged_calibration_cache_is_rebuilt_and_the_result_unchanged(tmp_path, tiny_teacher_dir, capsys,
                                                                       monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path, tiny_teacher_dir, max_steps=4)
    assert run(["fit", "--config", config], capsys)[0] == 0
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]["heldout_kl_after"]
    entries = list((tmp_path / "cache" / "calibration").glob("*.safetensors"))
    assert len(entries) == 1
    raw = bytearray(entries[0].read_bytes())
    raw[-8:] = b"\x00" * 8  # valid framing, wrong numbers
    entries[0].write_bytes(bytes(raw))
    code, err = run(["fit", "--config", config], capsys)
    assert code == 0, err
    assert "unusable" in err and "rebuilding" in err
    assert entries[0].with_name(entries[0].name + ".corrupt").is_file()
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]["heldout_kl_after"]
    assert again == first
