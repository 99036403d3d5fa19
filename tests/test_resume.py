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


def uninterrupted(tmp_path, teacher, capsys):
    """(final state, metrics) of the whole run, and an empty directory for the interrupted one."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir()
    parts.mkdir()
    assert run(["fit", "--config", write_config(whole, teacher, **TRAINER)], capsys)[0] == 0
    return (*finished(whole / "run"), parts)


# 12 steps of 4 per epoch; validation at each epoch end: the stops fall mid-epoch (5, 10), on the last step of
# an epoch with its validation due (8), inside that validation, and while the repair state is being written
TRAINER = {"max_steps": 12}


@pytest.mark.parametrize("signal, when, step", [
    ("SIGINT", "step", 5), ("SIGTERM", "step", 10), ("SIGINT", "step", 8), ("SIGTERM", "step", 8),
    ("SIGTERM", "validation", 8), ("SIGTERM", "save", 4),
])
def test_interrupt_and_resume_equals_the_uninterrupted_run(signal, when, step, tmp_path, tiny_teacher_dir, capsys):
    want_state, want_metrics, parts = uninterrupted(tmp_path, tiny_teacher_dir, capsys)
    stop = {"class_path": "signals.SignalAt", "init_args": {"signal": signal, "when": when, "step": step}}
    config = config_with(parts, tiny_teacher_dir, stop, **TRAINER)
    code, err = run(["fit", "--config", config], capsys)
    assert code not in (0, None), err
    left = {p.name for p in (parts / "run").iterdir()}
    assert {"resume.safetensors", "repair_state.safetensors", "metrics.json"} <= left, left
    interrupted = json.loads((parts / "run" / "metrics.json").read_text())
    assert interrupted["interrupted"] and interrupted["summary"]["heldout_kl_before"] == \
        want_metrics["summary"]["heldout_kl_before"]
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


def test_sigkill_between_steps_leaves_the_last_resume_file_usable(tmp_path, tiny_teacher_dir, capsys, caplog):
    """SIGKILL cannot be caught: what survives is the resume file of the last validation (written atomically),
    and resuming from it still ends on the uninterrupted run's tensors."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    want_state, _, parts = uninterrupted(tmp_path, tiny_teacher_dir, capsys)
    kill = {"class_path": "signals.SignalAt", "init_args": {"signal": "SIGKILL", "step": 6}}
    config = config_with(parts, tiny_teacher_dir, kill, **TRAINER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "tests"), str(root)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1); from recipes.cli import main;"
                           f" main(['fit', '--config', {config!r}])"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not list((parts / "run").glob(".*tmp*")), "no torn temp file is left behind"
    config = write_config(parts, tiny_teacher_dir, **TRAINER)  # the same recipe without the kill
    code, err = run(["fit", "--config", config, "--resume", str(parts / "run")], capsys)
    assert code == 0, err
    assert "resumed at step 4" in caplog.text  # Lightning's logger: its handler is not our stderr
    got_state, _ = finished(parts / "run")
    for name in want_state:
        assert torch.equal(got_state[name], want_state[name]), name


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
