"""``zoo ladder`` on a tiny teacher: rungs run as separate fits, a table comes out, finished rungs are
not run again, and a failing rung does not stop the ladder."""
import json

import yaml

from zoo_cli import repair_model, write_config, zoo_cli


def test_ladder_runs_rungs_writes_the_table_and_resumes(tmp_path, tiny_teacher_dir, capsys):
    phd = repair_model("zoo.BlockwisePHD", **{"targets": "model.layers.0.mlp.down_proj", "rank": 16, "block": 16, "lr": 0.01})
    config = write_config(tmp_path, tiny_teacher_dir, phd, max_steps=2)
    ladder = {
        "output_dir": str(tmp_path / "ladder"), "logger": False, "overrides": ["--trainer.max_steps", "2"],
        "rungs": [
            {"name": "one", "config": config, "method": "PHD"},
            {"name": "broken", "config": config, "overrides": ["--model.init_args.parts.rank", "999"]},
        ],
    }
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(ladder))
    code, out, err = zoo_cli(["ladder", "--config", str(path)], capsys)
    assert code == 0, err
    rows = {r["rung"]: r for r in json.loads((tmp_path / "ladder" / "ladder.json").read_text())["rows"]}
    assert rows["one"]["layers"] == 1 and rows["one"]["trainable_parameters"] == 16 * 16
    assert rows["one"]["kl_before"] > 0 and rows["one"]["kl_after"] is not None
    assert rows["broken"]["status"].startswith("failed") and "rank 999" in rows["broken"]["status"]
    assert "| one | 1 | PHD |" in (tmp_path / "ladder" / "ladder.md").read_text()
    assert (tmp_path / "ladder" / "ladder.png").stat().st_size > 0
    # a second run resumes: finished rungs are not fitted again
    code, out, err = zoo_cli(["ladder", "--config", str(path), "--only", "[one]"], capsys)
    assert code == 0, err
    assert "one: finished earlier" in out and "$ " not in out


def test_ladder_rejects_unknown_rungs_and_missing_configs(tmp_path, capsys):
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump({"rungs": [{"name": "a", "config": str(tmp_path / "nope.yaml")}], "logger": False}))
    code, _, err = zoo_cli(["ladder", "--config", str(path)], capsys)
    assert code == 2 and "config" in err and "does not exist" in err
    code, _, err = zoo_cli(["ladder", "--config", str(path), "--only", "[b]"], capsys)
    assert code == 2 and "unknown rung(s) ['b']; valid: a" in err
