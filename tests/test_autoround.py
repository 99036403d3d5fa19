"""``zoo autoround``: auto-round's own API on a recipe's teacher and calibration tokens (tiny teacher, 1 tuning
step, 2 sequences), its dequantized checkpoint on the grid and measured through ``zoo.Transplant``; reuse,
atomic output and bad inputs. Skipped where auto-round is not installed (``pip install auto-round``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zoo_cli import repair_model, zoo_cli

pytest.importorskip("auto_round", reason="auto-round is not installed (pip install auto-round)")

TARGETS = ["model.layers.*.self_attn.{q,k,v,o}_proj", "model.layers.*.mlp.{gate,up}_proj"]  # not down_proj


def recipe(tmp_path, teacher) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": repair_model("zoo.Quantize", teacher=teacher, targets=TARGETS, bits=4, group=32),
        "data": {"class_path": "recipes.CodeDataModule",
                 "init_args": {"seq_len": 32, "batch_size": 2, "n_calibration": 2, "n_train": 2, "n_heldout": 2,
                               "max_repeat": 4.0, "code": {"max_files": 10}}},
        "trainer": {"logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "callbacks.HeldoutKLGate", "init_args": {"tolerance": 100.0}}]}}))
    return str(path)


def test_quantizes_the_targets_on_the_grid_and_validates(tiny_teacher_dir, tmp_path, capsys):
    config, out = recipe(tmp_path, tiny_teacher_dir), tmp_path / "ar"
    args = ["autoround", "--recipe", config, "--bits", "3", "--group", "32", "--iters", "1", "--nsamples", "2",
            "--output", str(out)]
    code, stdout, err = zoo_cli(args, capsys)
    assert code == 0, err[-3000:]
    meta = json.loads((out / "zoo_quantizer.json").read_text())
    assert meta["quantizer"] == "auto-round" and meta["bits"] == 3 and meta["nsamples"] == 2 and meta["targets"] == 12
    assert meta["bits_per_weight"] == 3 + 16 / 32
    assert not list(tmp_path.glob("ar.tmp*"))
    weights, teacher = load_file(str(out / "model.safetensors")), load_file(str(Path(tiny_teacher_dir) / "model.safetensors"))
    for i in range(2):
        q = weights[f"model.layers.{i}.mlp.up_proj.weight"]
        assert q.dtype == torch.float32 and not torch.equal(q, teacher[f"model.layers.{i}.mlp.up_proj.weight"])
        assert max(len(torch.unique(g)) for g in q.reshape(-1, 32)) <= 8
        down = f"model.layers.{i}.mlp.down_proj.weight"  # not a target: untouched
        assert torch.equal(weights[down], teacher[down])
    # the printed line measures it
    parts = stdout.split("--model.init_args.parts '")[1].split("'")[0]
    code, _, err = zoo_cli(["validate", "--config", config, "--model.init_args.parts", parts], capsys)
    assert code == 0, err[-3000:]
    validated = json.loads((tmp_path / "run" / "metrics_validate.json").read_text())
    assert validated["final"]["heldout_kl"] > 0 and validated["summary"]["quantized_maps"] == 12
    # finished: reused, not quantized again
    code, stdout, _ = zoo_cli(args, capsys)
    assert code == 0 and "reusing" in stdout


def test_bad_inputs_are_refused(tiny_teacher_dir, tmp_path, capsys):
    config = recipe(tmp_path, tiny_teacher_dir)
    code, _, err = zoo_cli(["autoround", "--recipe", config, "--bits", "5", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown bits 5; valid choices: 2, 3, 4, 8" in err
    code, _, err = zoo_cli(["autoround", "--recipe", config, "--nsamples", "3", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "nsamples must be in 1..2" in err
    (tmp_path / "foreign").mkdir()
    code, _, err = zoo_cli(["autoround", "--recipe", config, "--output", str(tmp_path / "foreign")], capsys)
    assert code == 2 and "not a finished zoo autoround result" in err


def test_missing_auto_round_says_how_to_install(tiny_teacher_dir, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "auto_round", None)
    code, _, err = zoo_cli(["autoround", "--recipe", recipe(tmp_path, tiny_teacher_dir), "--output",
                            str(tmp_path / "o")], capsys)
    assert code == 2 and "pip install auto-round" in err
