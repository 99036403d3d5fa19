"""Exact resume: a fit interrupted by SIGINT or SIGTERM and continued with ``zoo fit --resume RUN_DIR`` ends
with the uninterrupted run's tensors, bit for bit (one thread), and with the same metrics."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_cli import assert_clean_error, run
from test_reliability import config_with
from zoo_cli import write_config


pytestmark = pytest.mark.usefixtures("one_thread")


def finished(run_dir):
    state = load_file(str(run_dir / "repair_state.safetensors"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return state, metrics


# 12 steps of 4 per epoch; validation at each epoch end: the stops fall mid-epoch (5, 10) and at one's end (8)
TRAINER = {"max_steps": 12}


@pytest.mark.parametrize("signal, step", [("SIGINT", 5), ("SIGTERM", 10), ("SIGINT", 8)])
def test_interrupt_and_resume_equals_the_uninterrupted_run(signal, step, tmp_path, tiny_teacher_dir, capsys):
    whole = tmp_path / "whole"
    whole.mkdir()
    assert run(["fit", "--config", write_config(whole, tiny_teacher_dir, **TRAINER)], capsys)[0] == 0
    want_state, want_metrics = finished(whole / "run")

    parts = tmp_path / "parts"
    parts.mkdir()
    stop = {"class_path": "signals.SignalAt", "init_args": {"signal": signal, "step": step}}
    config = config_with(parts, tiny_teacher_dir, stop, **TRAINER)
    code, err = run(["fit", "--config", config], capsys)
    assert code not in (0, None), err
    assert (parts / "run" / "resume.safetensors").is_file()
    code, err = run(["fit", "--config", config, "--resume", str(parts / "run")], capsys)
    assert code == 0, err
    got_state, got_metrics = finished(parts / "run")

    assert sorted(got_state) == sorted(want_state)
    for name in want_state:
        assert torch.equal(got_state[name], want_state[name]), name
    assert got_metrics["summary"]["heldout_kl_before"] == want_metrics["summary"]["heldout_kl_before"]
    assert got_metrics["summary"]["heldout_kl_after"] == want_metrics["summary"]["heldout_kl_after"]
    assert [v["step"] for v in got_metrics["validations"]] == [v["step"] for v in want_metrics["validations"]]
    assert [v["heldout_kl"] for v in got_metrics["validations"]] == [v["heldout_kl"] for v in want_metrics["validations"]]


def test_resume_refuses_what_it_cannot_continue(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, str(tmp_path / "no_such_teacher"))
    assert_clean_error(*run(["fit", "--config", config, "--resume", str(tmp_path / "nowhere")], capsys),
                       "nowhere", "no such run directory")
    (tmp_path / "fresh").mkdir()
    assert_clean_error(*run(["fit", "--config", config, "--resume", str(tmp_path / "fresh")], capsys),
                       "fresh", "resume.safetensors")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "resume.safetensors").write_bytes(b"\x01" * 40)
    assert_clean_error(*run(["fit", "--config", config, "--resume", str(tmp_path / "torn")], capsys),
                       "resume.safetensors", "not a safetensors file")
    assert_clean_error(*run(["validate", "--config", config, "--resume", str(tmp_path / "torn")], capsys),
                       "--resume continues a fit")
