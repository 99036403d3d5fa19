"""``zoo frontier`` on a tiny teacher: (method, ratio) items run as separate validates (and fits), rows,
a table and a chart come out, finished items (and finished stages) are not run again, and a failing item
is a row, not the end of the frontier."""
import json

import pytest
import torch
import yaml

from test_reliability import config_with
from zoo_cli import repair_model, zoo_cli


def test_frontier_rows_table_chart_resume_and_failures(tmp_path, tiny_teacher_dir, capsys):
    svd = repair_model("zoo.FisherSVD", targets="model.layers.{0..1}.mlp.down_proj", rank=0.8, weighting="none", lr=0.01)
    config = config_with(tmp_path, tiny_teacher_dir, {"class_path": "callbacks.RepairCurve"}, model=svd, max_steps=2)
    out_dir = tmp_path / "frontier"
    frontier = {
        "output_dir": str(out_dir), "logger": False, "ratios": [0.8, 0.5],
        "methods": [
            # a validation at the repair's last step: the repair writes its resume checkpoint
            {"name": "svd", "label": "SVD", "config": config, "overrides": ["--trainer.val_check_interval", "2"]},
            {"name": "cov", "config": config, "overrides": ["--model.init_args.parts.weighting", "covariance"]},
            {"name": "broken", "config": config, "overrides": ["--model.init_args.parts.weighting", "bogus"]},
        ],
    }
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump(frontier))
    code, out, err = zoo_cli(["frontier", "--config", str(path)], capsys)
    assert code == 0, err
    payload = json.loads((out_dir / "frontier.json").read_text())
    assert payload["commit"] is not None and payload["hardware"]["cpus"] >= 1 and payload["ratios"] == [0.8, 0.5]
    rows = {r["item"]: r for r in payload["rows"]}
    assert list(rows) == ["svd@0.8", "svd@0.5", "cov@0.8", "cov@0.5", "broken@0.8", "broken@0.5"]
    for name in ("svd@0.8", "svd@0.5", "cov@0.8", "cov@0.5"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["kl_before"] > 0 and r["ppl_before"] > 1 and r["teacher_ppl"] > 1
        assert r["ppl_x_teacher_before"] == r["ppl_before"] / r["teacher_ppl"]
        assert r["kl_after"] is None and r["seconds"]["before"] > 0 and "repair" not in r["seconds"]
        assert 0 < r["parameters"] < r["teacher_parameters"]
    assert rows["svd@0.5"]["parameters"] < rows["svd@0.8"]["parameters"] == rows["cov@0.8"]["parameters"]
    for name in ("svd@0.8", "svd@0.5"):  # counted from the built maps, equal to the shapes' count when uniform
        record = json.loads((out_dir / name / "item.json").read_text())
        assert rows[name]["parameters_built"] and rows[name]["parameters"] == record["count"]["parameters"]
    assert rows["svd@0.5"]["kl_before"] > rows["svd@0.8"]["kl_before"]
    broken = rows["broken@0.8"]  # the recipe does not parse: a row with the reason, no numbers
    assert broken["status"].startswith("failed: unknown weighting 'bogus'") and broken["kl_before"] is None
    table = (out_dir / "frontier.md").read_text()
    svd = rows["svd@0.8"]
    assert f"| SVD | rank 0.8 | {svd['bits_per_weight']:.2f} | {svd['bytes'] / 1e6:.1f} | {svd['parameters']:,} |" in table
    assert "| broken (failed" in table
    # bytes: the factors at 16 bits and sigma at 32, rank 34 of a 64 x 128 map
    assert svd["bits_per_weight"] == 8 * (2 * (64 + 128) * 34 + 4 * 34) / (64 * 128)
    assert svd["bytes"] < svd["teacher_bytes"] and svd["bytes_fraction"] == svd["bytes"] / svd["teacher_bytes"]
    assert svd["setting"] == "rank" and svd["value"] == svd["ratio"] == 0.8 and svd["ppl_code_ratio"] == svd["ppl_x_teacher_before"]
    assert "teacher:" in table and (out_dir / "frontier.png").stat().st_size > 0
    # the ranks per layer type: the built student's (64 x 128 maps: 0.8 -> 34, 0.5 -> 21)
    assert rows["svd@0.8"]["ranks"]["ranks/down_proj/mean"] == 34 and rows["svd@0.5"]["ranks"]["ranks/down_proj/max"] == 21
    assert "| down 34 |" in table and "| down 21 |" in table
    # resumed: a finished item is not run again
    code, out, err = zoo_cli(["frontier", "--config", str(path), "--only", "[svd@0.8]"], capsys)
    assert code == 0, err
    assert "svd@0.8: finished earlier" in out and "$ zoo" not in out
    # a repair (2 steps, or a budget of 5 minutes): the finished "before" stage is kept, the repair
    # and the validate of its state run
    code, out, err = zoo_cli(["frontier", "--config", str(path), "--only", "[svd@0.5]", "--repair_steps", "2",
                              "--repair_minutes", "5"], capsys)
    assert code == 0, err
    assert "--trainer.max_steps 2 --model.init_args.max_minutes 5" in out and "$ zoo fit" in out and "$ zoo validate" in out and "svd@0.5/before" not in out
    assert out.count("$ zoo validate") == 1 and "repair_state.safetensors" in out
    # a finished repair is never resumed: its resume checkpoint (the optimizer's moments too) is not kept
    assert (out_dir / "svd@0.5/repair/repair_state.safetensors").is_file()
    assert not (out_dir / "svd@0.5/repair/resume.safetensors").exists()
    rows = {r["item"]: r for r in json.loads((out_dir / "frontier.json").read_text())["rows"]}
    repaired = rows["svd@0.5"]
    assert repaired["status"] == "ok" and repaired["kl_after"] > 0 and repaired["ppl_after"] > 1
    assert repaired["repair_steps"] == 2 and set(repaired["seconds"]) == {"before", "repair", "after"}
    curve = json.loads((out_dir / "svd@0.5" / "item.json").read_text())["stages"]["repair"]["curve"]
    assert [p["step"] for p in curve] == [0, 2] and curve[0]["heldout_kl"] == pytest.approx(repaired["kl_before"], rel=1e-4)
    # finished earlier without repair: its own numbers, no repair in them
    assert rows["svd@0.8"]["status"] == "ok" and rows["svd@0.8"]["kl_before"] is not None
    assert rows["svd@0.8"]["kl_after"] is None and rows["svd@0.8"]["repair_minutes"] is None
    # an invocation without repair keeps the repaired item (it holds the unrepaired numbers too)
    code, out, err = zoo_cli(["frontier", "--config", str(path), "--only", "[svd@0.5]"], capsys)
    assert code == 0, err
    assert "svd@0.5: finished earlier" in out and "$ zoo" not in out
    rows = {r["item"]: r for r in json.loads((out_dir / "frontier.json").read_text())["rows"]}
    assert rows["svd@0.5"]["kl_after"] == repaired["kl_after"] and rows["svd@0.5"]["repair_steps"] == 2
    # the records alone (a study commits its item.json files, not the run directories) give the same rows
    alone = tmp_path / "records"
    for name in ("svd@0.8", "svd@0.5"):
        (alone / name).mkdir(parents=True)
        (alone / name / "item.json").write_text((out_dir / name / "item.json").read_text())
    code, out, err = zoo_cli(["frontier", "--config", str(path), "--only", "[svd@0.5]", "--output_dir", str(alone)],
                             capsys)
    assert code == 0 and "svd@0.5: finished earlier" in out and "$ zoo" not in out, err
    again = {r["item"]: r for r in json.loads((alone / "frontier.json").read_text())["rows"]}
    for name in ("svd@0.8", "svd@0.5"):
        for key in ("bits_per_weight", "bytes", "parameters", "parameters_built", "ranks", "kl_after"):
            assert again[name][key] == rows[name][key], (name, key)
    # a comment added to the recipe changes nothing it runs: the item is kept
    with open(config, "a") as f:
        f.write("# the lr decays now\n")
    code, out, err = zoo_cli(["frontier", "--config", str(path), "--only", "[svd@0.8]"], capsys)
    assert code == 0 and "svd@0.8: finished earlier" in out and "$ zoo" not in out, err
    # an edited value is not finished: it runs again
    recipe = yaml.safe_load(open(config))
    recipe["seed_everything"] = recipe.get("seed_everything", 0) + 1
    with open(config, "w") as f:
        yaml.safe_dump(recipe, f)
    code, out, err = zoo_cli(["frontier", "--config", str(path), "--only", "[svd@0.8]"], capsys)
    assert code == 0 and "finished earlier" not in out and out.count("$ zoo validate") == 1, err


def test_frontier_rejects_unknown_items_and_bad_options(tmp_path, capsys):
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump({"methods": [{"name": "a", "config": str(tmp_path / "nope.yaml")}], "logger": False}))
    code, _, err = zoo_cli(["frontier", "--config", str(path)], capsys)
    assert code == 2 and "config" in err and "does not exist" in err
    code, _, err = zoo_cli(["frontier", "--config", str(path), "--only", "[b@0.8]"], capsys)
    assert code == 2 and "unknown item(s) ['b@0.8']; valid: a@0.9, a@0.8" in err
    code, _, err = zoo_cli(["frontier", "--config", str(path), "--ratios", "[0.8, 0.8]"], capsys)
    assert code == 2 and "ratios must be unique" in err


def test_frontier_bits_items_prose_and_a_baseline_never_repaired(tmp_path, tiny_teacher_dir, capsys):
    """A low-bit method whose values are bits, beside a round-to-nearest baseline that the frontier's repair
    skips; every item scored on prose too; rows carry the bytes and the ratios the study plots."""
    grid = repair_model("zoo.Quantize", targets="model.layers.*.mlp.{gate,up,down}_proj", bits=4, group=32, lr=0.01)
    config = config_with(tmp_path, tiny_teacher_dir, {"class_path": "callbacks.RepairCurve"}, model=grid, max_steps=2)
    out_dir = tmp_path / "frontier"
    frontier = {"output_dir": str(out_dir), "logger": False, "prose_windows": 2, "prose_seq_len": 64,
                "repair_steps": 2, "methods": [
                    {"name": "rtn", "config": config, "setting": "bits", "values": [8, 3], "repair": False,
                     "overrides": ["--model.init_args.parts.rounding", "nearest"]},
                    {"name": "zoo-int", "config": config, "setting": "bits", "values": [3]}]}
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump(frontier))
    code, out, err = zoo_cli(["frontier", "--config", str(path)], capsys)
    assert code == 0, err
    assert out.count("$ zoo fit") == 1 and out.count("$ zoo ppl") == 4  # rtn: before only; zoo-int: both
    rows = {r["item"]: r for r in json.loads((out_dir / "frontier.json").read_text())["rows"]}
    assert list(rows) == ["rtn@8", "rtn@3", "zoo-int@3"]
    for r in rows.values():
        assert r["status"] == "ok", r
        for key in ("method", "bits_per_weight", "bytes", "ppl_code_ratio", "ppl_prose_ratio"):
            assert r[key] is not None, (r["item"], key)
        assert r["teacher_prose_ppl"] > 1 and r["ppl_prose_ratio"] > 0
    assert rows["rtn@8"]["repair_minutes"] is None and rows["rtn@8"]["kl_after"] is None
    assert rows["rtn@3"]["bits_per_weight"] < rows["rtn@8"]["bits_per_weight"] < 16
    assert rows["rtn@8"]["ppl_code_ratio"] < rows["rtn@3"]["ppl_code_ratio"]  # 8 bits: near the teacher
    repaired = rows["zoo-int@3"]
    assert repaired["kl_after"] is not None and repaired["repair_minutes"] > 0
    assert repaired["ppl_prose_ratio"] == repaired["prose_x_teacher_after"] != repaired["prose_x_teacher_before"]
    assert repaired["ppl_code_ratio"] == repaired["ppl_x_teacher_after"]
    assert "| rtn | bits 8 |" in (out_dir / "frontier.md").read_text()


def test_frontier_decode_speed_of_the_student_as_shipped(tmp_path, tiny_teacher_dir, capsys):
    """``decode_tokens``: each item's exported student decodes beside its dense teacher (``zoo speed``); the stage
    is kept on a second run with the same settings and measured again with others."""
    grid = repair_model("zoo.Quantize", targets="model.layers.*.mlp.{gate,up,down}_proj", bits=4, group=32, lr=0.01)
    config = config_with(tmp_path, tiny_teacher_dir, model=grid, max_steps=2)
    out_dir = tmp_path / "frontier"
    frontier = {"output_dir": str(out_dir), "logger": False, "decode_tokens": 2, "decode_dtype": "float32",
                "methods": [{"name": "rtn", "config": config, "setting": "bits", "values": [4], "repair": False}]}
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump(frontier))
    code, out, err = zoo_cli(["frontier", "--config", str(path)], capsys)
    assert code == 0 and out.count("$ zoo speed") == 1, err
    row = json.loads((out_dir / "frontier.json").read_text())["rows"][0]
    assert row["decode_speedup"] > 0 and row["decode_tokens_per_s"] > 0 and row["decode_dtype"] == "float32"
    speed = json.loads((out_dir / "rtn@4" / "speed" / "speed.json").read_text())
    assert speed["bytes_ratio"] < 1 and [r["student"] for r in speed["rows"]] == ["dense", "student"]
    code, out, _ = zoo_cli(["frontier", "--config", str(path)], capsys)
    assert code == 0 and "$ zoo speed" not in out  # finished with these settings
    code, out, _ = zoo_cli(["frontier", "--config", str(path), "--decode_tokens", "3"], capsys)
    assert code == 0 and out.count("$ zoo speed") == 1 and "$ zoo validate" not in out  # only the stage that changed


def test_zoo_speed_refuses_bad_options_by_name(tmp_path, capsys):
    code, _, err = zoo_cli(["speed", "--recipe", "r.yaml", "--dtype", "float16"], capsys)
    assert code == 2 and "float16" in err and "bfloat16" in err
    code, _, err = zoo_cli(["speed", "--recipe", "r.yaml", "--new", "0"], capsys)
    assert code == 2 and "new=0" in err
    code, _, err = zoo_cli(["speed", "--recipe", "r.yaml", "--kernel", "mkl"], capsys)
    assert code == 2 and "mkl" in err and "onednn" in err


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_zoo_speed_runs_both_models_on_onednn_kernels(tmp_path, tiny_teacher_dir, capsys):
    svd = repair_model("zoo.FisherSVD", targets="model.layers.*.mlp.{gate,up,down}_proj", rank=0.5, lr=0.01)
    config = config_with(tmp_path, tiny_teacher_dir, model=svd, max_steps=1)
    out = tmp_path / "speed.json"
    code, stdout, err = zoo_cli(["speed", "--recipe", config, "--dtype", "bfloat16", "--kernel", "onednn",
                                 "--new", "2", "--rounds", "1", "--output", str(out)], capsys)
    assert code == 0 and "onednn kernels" in stdout, err
    result = json.loads(out.read_text())
    assert result["kernel"] == "onednn" and result["decode_tokens_per_s"] > 0 and result["bytes_ratio"] < 1


def test_frontier_seeds_hologram_kl_and_multiple_choice(tmp_path, tiny_teacher_dir, capsys, monkeypatch):
    """``seeds``: an item runs once per seed (seed 0 in ``<method>@<value>``, others in ``#s<seed>``), its row
    the mean with the spread and each seed's figures; the hologram KL and multiple-choice stages score the
    student before and after repair (issue 27)."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    svd = repair_model("zoo.FisherSVD", targets="model.layers.{0..1}.mlp.down_proj", rank=0.5, weighting="none", lr=0.01)
    config = config_with(tmp_path, tiny_teacher_dir, model=svd, max_steps=1)
    out_dir = tmp_path / "frontier"
    frontier = {"output_dir": str(out_dir), "logger": False, "ratios": [0.5], "seeds": [0, 3], "repair_steps": 1,
                "hologram_samples": 8, "hologram_new_tokens": 16, "hologram_blocks": 2, "hologram_seq_len": 32,
                "mc_items": 6, "methods": [{"name": "svd", "config": config,
                                            "heldout": ["--data.init_args.seed", "{seed}"]}]}
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump(frontier))
    code, out, err = zoo_cli(["frontier", "--config", str(path)], capsys)
    assert code == 0, err
    # the teacher's accuracy is measured once: the second seed keeps the first's
    assert out.count("$ zoo fit") == 2 and out.count("$ zoo lm-eval") == 5 and out.count("$ zoo validate") == 8
    assert "--seed_everything 3 --data.init_args.seed 3" in out and "heldout_data recipes.HologramDataModule" in out
    # the method's heldout overrides reach the before and after validates alone, with the item's seed
    assert out.count("--data.init_args.seed 3 --trainer.limit_val_batches") == 1
    assert out.count("--data.init_args.seed 3 --ckpt_path") == 1 and out.count("--data.init_args.seed 0 --") == 2
    first, second = (json.loads((out_dir / d / "item.json").read_text()) for d in ("svd@0.5", "svd@0.5#s3"))
    assert second["stages"]["mc_teacher"] == {**first["stages"]["mc_teacher"], "kept_from": "svd@0.5"}
    assert "kept_from" not in first["stages"]["mc_teacher"] and first["count"]["teacher"] == str(tiny_teacher_dir)
    [row] = json.loads((out_dir / "frontier.json").read_text())["rows"]
    assert row["item"] == "svd@0.5" and row["status"] == "ok" and row["seeds"] == [0, 3]
    per_seed = {s["seed"]: s for s in row["per_seed"]}
    assert set(per_seed) == {0, 3} and per_seed[0]["kl_after"] != per_seed[3]["kl_after"]  # other data, other run
    for key in ("kl_after", "ppl_code_ratio", "hologram_kl_before", "hologram_kl_after", "mc_acc_after",
                "repair_steps"):
        values = [per_seed[s][key] for s in (0, 3)]
        assert row[key] == pytest.approx(sum(values) / 2), key
        assert row[f"{key}_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5), key
    assert 0 < row["hologram_kl_after"] and row["hologram_kl_before"] != row["kl_before"]  # another heldout set
    assert 0 <= row["mc_acc_before"] <= 1 and 0 <= row["mc_acc_teacher"] <= 1 and row["ppl_prose_ratio"] is None
    table = (out_dir / "frontier.md").read_text()
    assert "hologram KL before" in table and f"{row['kl_after']:.4f} ± {row['kl_after_std']:.4f}" in table
    assert "| 0,3 |" in table and "mean ± the sample standard deviation" in table
    # one seed again: its finished run is kept, and `only` names an item's every seed
    code, out, err = zoo_cli(["frontier", "--config", str(path), "--only", "[svd@0.5]"], capsys)
    assert code == 0 and "$ zoo" not in out and "svd@0.5#s3: finished earlier" in out, err


def test_frontier_refuses_bad_seeds_and_sizes(tmp_path, capsys):
    path = tmp_path / "frontier.yaml"
    path.write_text(yaml.safe_dump({"methods": [{"name": "a", "config": str(tmp_path / "a.yaml")}], "logger": False}))
    for args, message in ((["--seeds", "[1, 1]"], "seeds must be unique, got ['1', '1']"),
                          (["--seeds", "[]"], "seeds must be a non-empty list"),
                          (["--mc_items", "-1"], "mc_items must be >= 0 (0: not measured), got -1"),
                          (["--hologram_samples", "4", "--hologram_blocks", "0"], "hologram_blocks must be >= 1")):
        code, _, err = zoo_cli(["frontier", "--config", str(path), *args], capsys)
        assert code == 2 and message in err, (args, err)


def test_seed_rows_average_the_finished_seeds_alone():
    """A seed stopped after its before stages must not enter the mean: the row's before and after figures
    are then over different seeds, and an unrepaired seed's code ratio is its before-figure (issue 27)."""
    from recipes.frontier_report import steps_cell
    from recipes.frontier_rows import seed_rows

    def run(seed, status, before, after, steps=None, state_step=None):
        return {"item": "m@0.8" + (f"#s{seed}" if seed else ""), "method": "m", "value": 0.8, "seed": seed,
                "status": status, "ppl_x_teacher_before": before, "ppl_x_teacher_after": after,
                "ppl_code_ratio": after if after is not None else before, "repair_steps": steps,
                "repair_state_step": state_step}

    [row] = seed_rows([run(0, "ok", 3.0, 1.5, 400, 400), run(1, "ok", 3.5, 1.6, 460, 200), run(2, "not run", 9.0, None)])
    # a repair that went worse after its best validation ships that state: the table says which seed and step
    assert steps_cell(row) == "430 ± 42 (s1 kept step 200)"
    assert row["repair_state_step"] is None and row["per_seed"][1]["repair_state_step"] == 200  # a step, not a mean
    # while no seed finished, the cell is over the runs the figures are over
    assert steps_cell(seed_rows([run(0, "not run", 3.0, None, 460, 200)])[0]) == "460 (kept step 200)"
    [one] = seed_rows([run(0, "ok", 3.0, 1.5, 460, 200)])
    assert steps_cell(one) == "460 (kept step 200)" and steps_cell(seed_rows([run(0, "ok", 3, 1, 9, 9)])[0]) == "9"
    assert row["seeds"] == [0, 1] and row["ppl_x_teacher_before"] == pytest.approx(3.25)
    assert row["ppl_code_ratio"] == pytest.approx(1.55) and row["ppl_x_teacher_after_std"] == pytest.approx(0.1 / 2 ** 0.5)
    assert [s["seed"] for s in row["per_seed"]] == [0, 1, 2] and row["per_seed"][2]["ppl_x_teacher_before"] == 9.0
    # while no seed finished, the row shows what the runs have so far
    [row] = seed_rows([run(0, "not run", 3.0, None), run(1, "not run", 4.0, None)])
    assert row["seeds"] == [] and row["ppl_x_teacher_before"] == pytest.approx(3.5) and row["ppl_x_teacher_after"] is None
