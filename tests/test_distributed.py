"""The demo recipe under Lightning's DDP (2 CPU processes, gloo) equals the single-process run on the same
global batches: calibration statistics, the packed data (hologram generation split across the two
processes) and the final repair state (issue 9, "Distributed"; source 000, section 2.4 "Repair
training (distillation)").

The single process trains with batch 4; each DDP process with batch 2. The train sampler gives both the
same order (epoch e is one permutation seeded with seed + e, split round-robin over processes), and the
loss is token-weighted over the processes' union, so each DDP step is the single-process step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from zoo_cli import repair_model, write_config, zoo_cli

ROOT = Path(__file__).resolve().parents[1]


def demo_config(run_dir: Path, teacher: str, batch_size: int) -> str:
    """The demo recipe's shape (FisherSVDRepair, covariance weighting, code + hologram mix, heldout gate,
    repair-state checkpoint) on the tiny teacher: 2 epochs of 2 steps, hologram in 2 generation shards."""
    run_dir.mkdir(parents=True)
    model = repair_model("zoo.FisherSVD", **{"targets": "model.layers.{0..1}.mlp.down_proj", "rank": 8, "weighting": "covariance",
                           "lr": 0.01})
    path = write_config(run_dir, teacher, model=model, max_steps=4)
    config = yaml.safe_load(Path(path).read_text())
    config["data"]["init_args"].update(batch_size=batch_size, n_train=8, n_heldout=4, n_calibration=4)
    config["data"]["init_args"]["hologram"]["gen_batch_size"] = 3
    Path(path).write_text(yaml.safe_dump(config))
    return path


def calibration_file(cache: Path) -> Path:
    files = list((cache / "calibration").glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_ddp_two_processes_match_one_process(tmp_path, tiny_teacher_dir, capsys, monkeypatch):
    single_cache, ddp_cache = tmp_path / "cache_single", tmp_path / "cache_ddp"
    monkeypatch.setenv("ZOO_CACHE", str(single_cache))
    config = demo_config(tmp_path / "single", tiny_teacher_dir, batch_size=4)
    code, _, err = zoo_cli(["fit", "--config", config], capsys)
    assert code == 0, err

    config = demo_config(tmp_path / "ddp", tiny_teacher_dir, batch_size=2)
    env = {**os.environ, "ZOO_CACHE": str(ddp_cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.cli", "fit", "--config", config, "--trainer.strategy", "ddp",
         "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MEMBER: 2/2" in proc.stderr, proc.stderr[-4000:]  # both processes joined the gloo group

    # calibration: one file written (by rank 0), the same data fingerprint, the same fp64 statistics
    one, two = calibration_file(single_cache), calibration_file(ddp_cache)
    assert one.name == two.name  # same key: same teacher, targets, options and packed calibration data
    with safe_open(str(one), "pt") as a, safe_open(str(two), "pt") as b:
        assert json.loads(a.metadata()["inputs"])["data"] == json.loads(b.metadata()["inputs"])["data"]
    stats_one, stats_two = load_file(str(one)), load_file(str(two))
    assert sorted(stats_one) == sorted(stats_two)
    assert any(k.endswith("second_moment") for k in stats_one)
    for name, value in stats_one.items():
        if name.endswith(".count"):
            assert torch.equal(value, stats_two[name]), name
        else:
            torch.testing.assert_close(stats_two[name], value, rtol=1e-6, atol=1e-9, msg=name)

    # the hologram was generated in two shards, one per process, and merged into the same packed data
    assert len(list((ddp_cache / "data" / "hologram").glob("*/shard-*"))) == 2

    # training: the same repair state after 4 steps over 2 epochs, written once
    state_one = load_file(str(tmp_path / "single" / "run" / "repair_state.safetensors"))
    state_two = load_file(str(tmp_path / "ddp" / "run" / "repair_state.safetensors"))
    assert sorted(state_one) == sorted(state_two) and state_one
    for name, value in state_one.items():
        torch.testing.assert_close(state_two[name], value, rtol=1e-4, atol=1e-6, msg=name)
    metrics = [json.loads((tmp_path / run / "run" / "metrics.json").read_text()) for run in ("single", "ddp")]
    assert metrics[1]["global_step"] == metrics[0]["global_step"] == 4
    # the gate decided on the all-reduced heldout KL, and validation logged the token-weighted mean over
    # both processes: the same numbers as one process (a KL this small is a difference of nearly equal
    # log-probabilities, so float noise is ~1e-4 of it)
    for key in ("heldout_kl_before", "heldout_kl_after"):
        assert metrics[1]["summary"][key] == pytest.approx(metrics[0]["summary"][key], rel=1e-3)
    for key in ("heldout_kl", "heldout_ppl", "heldout_ppl_teacher"):
        assert metrics[1]["final"][key] == pytest.approx(metrics[0]["final"][key], rel=1e-3), key
