"""``zoo lm-eval`` against lm-eval-harness's own CLI, and ``zoo compare`` on lm-eval's per-sample files.

A local multiple-choice task (a task YAML + a JSONL of 36 items, ``dataset_path: json``: no hub) is run by
``zoo lm-eval`` on a tiny model directory and on a repaired student (recipe + repair state from ``zoo fit``),
and by ``lm-eval run --model hf --model_args pretrained=<dir>`` as a separate program on the same model
saved with ``save_pretrained`` (the student densified by ``--save_model``). Accuracies must be equal to the
last digit, and the per-sample log-likelihoods equal to float rounding.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zoo_cli import repair_model, zoo_cli
from zoo.evaluation import mcnemar_exact

TASK = "zoo_tiny_mc"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def task_yaml(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    rows = []
    for i in range(36):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        choices = [str(a + b), str(a * b + 1), str(abs(a - b) + 2), str(a + b + 3)]
        rows.append({"question": f"def f():\n    return {a} + {b}\n# f() returns", "choices": choices, "answer": 0})
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "mc.jsonl")}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "choices", "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
    path = folder / "tiny_mc.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def lm_eval_cli(model_dir, task_yaml, out) -> dict:
    """lm-eval's own CLI in a separate process: (aggregated results, per-sample rows)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={model_dir},dtype=float32", "--tasks", TASK, "--include_path", str(task_yaml.parent),
         "--device", "cpu", "--batch_size", "1", "--output_path", str(out), "--log_samples"],
        env=dict(os.environ, **OFFLINE), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_run(out)


def read_run(out) -> dict:
    [results] = sorted(Path(out).glob("**/results_*.json"))
    [samples] = sorted(Path(out).glob(f"**/samples_{TASK}_*.jsonl"))
    return {"results": json.loads(results.read_text())["results"][TASK], "results_file": results,
            "samples": [json.loads(line) for line in samples.read_text().splitlines()]}


def loglikelihoods(run) -> list[list[float]]:
    return [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(run["samples"], key=lambda s: s["doc_id"])]


def assert_same_run(zoo, theirs):
    for metric in ("acc,none", "acc_norm,none", "acc_stderr,none"):
        assert zoo["results"][metric] == theirs["results"][metric], metric  # to the last digit
    assert len(zoo["samples"]) == len(theirs["samples"]) == 36
    for mine, ref in zip(loglikelihoods(zoo), loglikelihoods(theirs)):
        assert mine == pytest.approx(ref, abs=1e-4)


def recipe(tmp_path, teacher) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "model": repair_model("zoo.FisherSVD", **{"teacher": teacher, "targets": "model.layers.{0..1}.**_proj",
                                "rank": 1, "weighting": "none", "lr": 0.05}),
        "data": {"class_path": "recipes.CodeDataModule",
                 "init_args": {"seq_len": 32, "batch_size": 2, "n_calibration": 2, "n_train": 4, "n_heldout": 2,
                               "max_repeat": 4.0, "code": {"max_files": 10}}},
        "trainer": {"max_steps": 2, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"), "check_val_every_n_epoch": 1,
                    "callbacks": [{"class_path": "callbacks.RepairStateCheckpoint"}]}}))
    return path


def test_zoo_lm_eval_equals_lm_eval_cli_on_a_model_and_on_a_repaired_student(tiny_teacher_dir, task_yaml, tmp_path,
                                                                           capsys):
    # a plain model directory
    code, stdout, err = zoo_cli(["lm-eval", "--model", tiny_teacher_dir, "--tasks", str(task_yaml), "--log_samples",
                                 "true", "--device", "cpu", "--output_dir", str(tmp_path / "zoo_model"), "--logger",
                                 "false"], capsys)
    assert code == 0, err
    zoo_model = read_run(tmp_path / "zoo_model")
    assert f"{TASK}: acc = {zoo_model['results']['acc,none']:.4f}" in stdout and "(n = 36)" in stdout
    assert_same_run(zoo_model, lm_eval_cli(tiny_teacher_dir, task_yaml, tmp_path / "cli_model"))

    # a repaired student: zoo fit writes the repair state; zoo lm-eval rebuilds the student in memory
    config = recipe(tmp_path, tiny_teacher_dir)
    code, _, err = zoo_cli(["fit", "--config", str(config)], capsys)
    assert code == 0, err
    state = tmp_path / "run" / "repair_state.safetensors"
    assert state.is_file()
    student_dir = tmp_path / "student_hf"
    code, stdout, err = zoo_cli(["lm-eval", "--recipe", str(config), "--repair_state", str(state), "--tasks", TASK,
                                 "--include_path", str(task_yaml.parent), "--log_samples", "true", "--device", "cpu",
                                 "--output_dir", str(tmp_path / "zoo_student"), "--save_model", str(student_dir),
                                 "--logger", "false"], capsys)
    assert code == 0, err
    zoo_student = read_run(tmp_path / "zoo_student")
    assert_same_run(zoo_student, lm_eval_cli(student_dir, task_yaml, tmp_path / "cli_student"))
    assert loglikelihoods(zoo_student) != loglikelihoods(zoo_model)  # rank 1: not the teacher

    # the teacher view of the same student is the plain teacher, example by example
    code, _, err = zoo_cli(["lm-eval", "--recipe", str(config), "--repair_state", str(state), "--view", "teacher",
                            "--tasks", str(task_yaml), "--log_samples", "true", "--device", "cpu", "--output_dir",
                            str(tmp_path / "zoo_teacher_view"), "--logger", "false"], capsys)
    assert code == 0, err
    assert loglikelihoods(read_run(tmp_path / "zoo_teacher_view")) == loglikelihoods(zoo_model)


def test_zoo_compare_pairs_two_lm_eval_runs_per_example(tiny_teacher_dir, task_yaml, tmp_path, capsys):
    from conftest import build_model, build_tokenizer

    other = tmp_path / "other_model"  # another random init: it answers some items differently
    tokenizer = build_tokenizer()
    build_model(len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    runs = {}
    for name, model in (("a", tiny_teacher_dir), ("b", str(other))):
        code, _, err = zoo_cli(["lm-eval", "--model", model, "--tasks", str(task_yaml), "--log_samples", "true",
                                "--device", "cpu", "--output_dir", str(tmp_path / name), "--logger", "false"], capsys)
        assert code == 0, err
        runs[name] = read_run(tmp_path / name)
    code, stdout, err = zoo_cli(["compare", str(runs["a"]["results_file"]), str(runs["b"]["results_file"])], capsys)
    assert code == 0, err
    a, b = ({s["doc_id"]: s["acc"] == 1.0 for s in runs[k]["samples"]} for k in "ab")
    only_a = sum(a[d] and not b[d] for d in a)
    only_b = sum(b[d] and not a[d] for d in a)
    assert only_a + only_b > 0
    assert f"lm-eval {TASK} [acc]: 36 paired tasks" in stdout
    assert f"only A      {only_a:5d}" in stdout and f"only B      {only_b:5d}" in stdout
    assert f"p = {mcnemar_exact(only_a, only_b):.4g}" in stdout
    # a per-sample file alone works too, and another metric
    [samples] = sorted((tmp_path / "a").glob("**/samples_*.jsonl"))
    code, stdout, err = zoo_cli(["compare", str(samples), str(samples), "--metric", "acc_norm"], capsys)
    assert code == 0, err
    assert "[acc_norm]: 36 paired tasks" in stdout and "p = 1" in stdout


def test_zoo_lm_eval_logs_its_metrics(tiny_teacher_dir, task_yaml, tmp_path, capsys):
    import wandb

    common = ["lm-eval", "--model", tiny_teacher_dir, "--tasks", str(task_yaml), "--limit", "4", "--device", "cpu"]
    # the default logger: W&B, offline, in output_dir, finished at the end
    code, _, err = zoo_cli([*common, "--output_dir", str(tmp_path / "w")], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "w" / "wandb").glob("offline-run-*/*.wandb"))) == 1
    assert wandb.run is None  # a later W&B logger in this process starts its own run
    # any Lightning logger gets the same metrics (a CSV one can be read back at once)
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                         "init_args": {"save_dir": str(tmp_path / "csv"), "name": "lm", "version": 0}})
    code, stdout, err = zoo_cli([*common, "--output_dir", str(tmp_path / "c"), "--logger", logger], capsys)
    assert code == 0, err
    header, row = (tmp_path / "csv" / "lm" / "version_0" / "metrics.csv").read_text().splitlines()[:2]
    metrics = dict(zip(header.split(","), row.split(",")))
    [results] = sorted((tmp_path / "c").glob("**/results_*.json"))
    acc = json.loads(results.read_text())["results"][TASK]["acc,none"]
    assert float(metrics[f"lm_eval/{TASK}/acc"]) == pytest.approx(acc) and "(n = 4)" in stdout


@pytest.mark.parametrize("args, message", [
    (["--tasks", "arc_eazy"], "unknown lm-eval task 'arc_eazy'; closest: arc_easy"),
    (["--tasks", "missing.yaml"], "task file 'missing.yaml' does not exist"),
    (["--tasks", "piqa", "--view", "teacher"], "--view teacher needs --recipe"),
])
def test_zoo_lm_eval_user_errors_are_one_line(args, message, capsys):
    code, _, err = zoo_cli(["lm-eval", *args, "--logger", "false"], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("zoo: error:") == 1 and err.strip().splitlines()[-1].startswith("zoo: error:"), err


def test_zoo_compare_needs_per_sample_files(tmp_path, capsys):
    results = tmp_path / "results_2026-01-01T00-00-00.000000.json"
    results.write_text(json.dumps({"results": {TASK: {}}, "configs": {TASK: {}}}))
    code, _, err = zoo_cli(["compare", str(results), str(results)], capsys)
    assert code == 2 and "--log_samples" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_embedded_teacher_through_lm_eval_and_the_offline_ppl_source(task_yaml, tmp_path, capsys):
    from zoo.core.models import load_tokenizer
    from zoo.evaluation.perplexity import PYDOC_TOPICS, load_texts, token_windows

    # the offline default of zoo ppl holds >= 100k of this teacher's tokens in windows of 2048
    windows = token_windows(load_texts(PYDOC_TOPICS).texts, load_tokenizer("smollm2-135m-instruct"), 2048)
    assert windows.numel() >= 100_000  # 55 windows on CPython 3.11.7

    code, stdout, err = zoo_cli(["lm-eval", "--model", "smollm2-135m-instruct", "--tasks", str(task_yaml), "--limit",
                                 "12", "--log_samples", "true", "--device", "cpu", "--output_dir", str(tmp_path),
                                 "--logger", "false"], capsys)
    assert code == 0, err
    run = read_run(tmp_path)
    assert len(run["samples"]) == 12 and "(n = 12)" in stdout
    # a real model adds small numbers: it should beat the 1-in-4 chance of a random init on these sums
    assert run["results"]["acc,none"] > 0.25
