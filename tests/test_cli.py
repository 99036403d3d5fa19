"""End to end through the ``zoo`` CLI on a tiny in-process teacher: fit, validate, mix, bad input."""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from zoo_cli import write_config, zoo_cli


def run(args, capsys):
    """(exit code, stderr) of ``zoo ARGS``."""
    code, _, err = zoo_cli(args, capsys)
    return code, err


def test_fit_then_validate_reproduces_the_final_heldout_kl(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir)
    code, err = run(["fit", "--config", config], capsys)
    assert code == 0, err
    state = tmp_path / "run" / "repair_state.safetensors"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    before, after = metrics["summary"]["heldout_kl_before"], metrics["summary"]["heldout_kl_after"]
    assert after < before
    assert state.stat().st_size < 2 * 2**20
    with safe_open(str(state), "pt") as f:
        assert sorted(f.keys()) == [f"model.layers.{i}.mlp.down_proj.replacement.sigma" for i in range(2)]
        assert json.loads(f.metadata()["global_step"]) == 8

    code, err = run(["validate", "--config", config, "--ckpt_path", str(state)], capsys)
    assert code == 0, err
    validated = json.loads((tmp_path / "run" / "metrics_validate.json").read_text())
    assert abs(validated["final"]["heldout_kl"] - after) < 1e-5


def test_mixed_composite_fits_and_validates(tmp_path, tiny_teacher_dir, capsys):
    model = {"class_path": "zoo.Composite", "init_args": {"lr": 0.05, "parts": [
        {"class_path": "zoo.FisherSVD", "init_args": {"targets": "model.layers.*.mlp.down_proj", "rank": 8}},
        {"class_path": "zoo.FisherSVD", "init_args": {"targets": "model.layers.*.self_attn.o_proj", "rank": 4,
                                                      "weighting": "diagonal"}},
    ]}}
    config = write_config(tmp_path, tiny_teacher_dir, model=model)
    assert run(["fit", "--config", config], capsys)[0] == 0
    state = tmp_path / "run" / "repair_state.safetensors"
    with safe_open(str(state), "pt") as f:
        assert len(f.keys()) == 4 and len(json.loads(f.metadata()["parts"])) == 2
        assert "technique" not in f.metadata()  # the header keys on the parts
    code, err = run(["validate", "--config", config, "--ckpt_path", str(state)], capsys)
    assert code == 0, err


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    message = err[err.index("zoo: error: "):]  # progress bars may come before it
    for needle in needles:
        assert needle in message, err


def test_bad_inputs_end_with_a_short_error(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir)
    assert_clean_error(*run(["fit", "--config", config, "--model.init_args.parts.targets", "model.layers.0.mlp.dwn_proj"],
                            capsys), "matches no linear module", "model.layers.0.mlp.down_proj")
    assert_clean_error(*run(["fit", "--config", config, "--model.init_args.parts.rank", "100"], capsys),
                       "rank 100", "= 64")
    assert_clean_error(*run(["fit", "--config", config, "--model.init_args.teacher", str(tmp_path / "nope")], capsys),
                       "nope")
    assert_clean_error(*run(["fit", "--config", config, "--model.init_args.parts.rnk", "3"], capsys), "rnk")
    assert_clean_error(*run(["fit", "--config", config, "--model.init_args.parts.weighting", "cov"], capsys),
                       "covariance, diagonal, fisher, none")
    assert_clean_error(*run(["frobnicate"], capsys), "unknown command 'frobnicate'")


def test_repair_state_of_another_rank_is_refused(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir, max_steps=2)
    assert run(["fit", "--config", config], capsys)[0] == 0
    state = str(tmp_path / "run" / "repair_state.safetensors")
    assert_clean_error(*run(["validate", "--config", config, "--model.init_args.parts.rank", "4", "--ckpt_path", state],
                            capsys), "does not match this run", '"rank": 8', '"rank": 4')
    assert_clean_error(*run(["validate", "--config", config, "--ckpt_path", str(tmp_path / "x.safetensors")], capsys),
                       "does not exist")


def test_heldout_kl_gate_fails_the_run(tmp_path, tiny_teacher_dir, capsys):
    config = write_config(tmp_path, tiny_teacher_dir, max_steps=2)
    # an absurd learning rate makes the student worse; tolerance 0 must then fail the run
    code, err = run(["fit", "--config", config, "--model.init_args.lr", "50",
                     "--trainer.callbacks+=callbacks.HeldoutKLGate", "--trainer.callbacks.tolerance", "0"], capsys)
    assert_clean_error(code, err, "HeldoutKLGate", "got worse", "the run left its repair state (step",
                       str(tmp_path / "run" / "repair_state.safetensors"))


@pytest.mark.slow  # starts the wandb service process
def test_default_logger_is_wandb_offline_and_writes_a_local_run(tmp_path, tiny_teacher_dir, capsys, monkeypatch):
    from recipes.cli import default_logger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert default_logger()["init_args"]["offline"] is True
    monkeypatch.setenv("WANDB_MODE", "online")
    assert default_logger()["init_args"]["offline"] is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = write_config(tmp_path, tiny_teacher_dir, max_steps=2)
    run_dir = tmp_path / "wandb_runs"
    logger = ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
              "--trainer.logger.save_dir", str(run_dir), "--trainer.logger.offline", "true"]
    code, err = run(["fit", "--config", config, *logger], capsys)
    assert code == 0, err
    assert list(run_dir.glob("wandb/offline-run-*/*.wandb")), list(run_dir.rglob("*"))
    import wandb

    assert wandb.run is None  # finished: a later W&B logger in this process must start its own run


def test_the_default_logger_is_named_after_the_recipe_and_saved_in_the_run(tmp_path, monkeypatch):
    from jsonargparse import dict_to_namespace

    from recipes.cli import default_logger, name_default_logger

    monkeypatch.setenv("WANDB_MODE", "offline")

    def resolved(logger, root="runs/my_run", files=("configs/recipes/my_recipe.yaml", "tweaks.yaml")):
        config = dict_to_namespace({"config": list(files), "trainer": {"logger": logger, "default_root_dir": root}})
        name_default_logger(config)
        logger = config.trainer.logger
        return logger.as_dict() if hasattr(logger, "as_dict") else logger

    # the recipes name no logger: the run is named after the (first) config file, saved in the run directory
    assert resolved(default_logger()) == {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {
        "project": "zoo", "name": "my_recipe", "save_dir": "runs/my_run", "offline": True}}
    assert resolved(default_logger(), root=None)["init_args"]["save_dir"] == "runs"
    assert resolved(default_logger(), files=())["init_args"]["name"] is None
    # a logger the recipe or the command line sets up is left alone
    named = {**default_logger(), "init_args": {**default_logger()["init_args"], "name": "mine"}}
    assert resolved(named)["init_args"] == {**default_logger()["init_args"], "name": "mine"}
    elsewhere = {**default_logger(), "init_args": {**default_logger()["init_args"], "save_dir": str(tmp_path)}}
    assert resolved(elsewhere)["init_args"] == {**default_logger()["init_args"], "save_dir": str(tmp_path)}
    assert resolved(False) is False
    csv = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}
    assert resolved(csv) == csv


def test_wandb_run_holds_the_whole_config_and_what_was_built(tmp_path, tiny_teacher_dir, monkeypatch):
    from recipes.cli import _lightning_cli, end_wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    # the logger in the YAML: jsonargparse < 4.36 fails on a subclass named on the command line
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"save_dir": str(tmp_path / "wb"), "offline": True}}
    config = write_config(tmp_path, tiny_teacher_dir, max_steps=2, logger=logger)
    cli = _lightning_cli(["fit", "--config", config])
    try:
        run = cli.trainer.logger.experiment
        logged = dict(run.config)["zoo"]
        assert {"model", "data", "trainer", "seed_everything", "git_commit"} <= set(logged)
        assert logged["data"]["init_args"]["seq_len"] == 32 and logged["trainer"]["max_steps"] == 2
        assert run.summary["trainable_parameters"] == 16 and run.summary["targets"] == 2
        assert run.summary["heldout_kl_after"] == cli.model.summary["heldout_kl_after"]
    finally:
        end_wandb_run()


def help_entries(text: str) -> list[tuple[str, str]]:
    """(option, description) of every option and positional argument of an argparse help text: an entry starts
    at two spaces of indent, its description follows on that line or on the deeper-indented lines below."""
    import re

    entries = []
    for line in text.splitlines():
        found = re.match(r"^  (\S.*?)(?:\s{2,}(.*))?$", line)
        if found and not line.startswith("   "):
            entries.append([found[1], found[2] or ""])
        elif entries and entries[-1] is not None and line.startswith("    ") and line.strip():
            entries[-1][1] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            entries.append(None)  # a blank line or a section title ends the entry
    return [tuple(e) for e in entries if e is not None]


def test_every_command_and_every_option_has_a_one_line_description(capsys, monkeypatch):
    import re

    from recipes.command import COMMANDS

    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = zoo_cli(["--help"], capsys)
    assert code == 0, err
    listed = dict(re.findall(r"^  (\S+)\s{2,}(\S.*)$", out, re.M))
    assert set(listed) == set(COMMANDS) >= {"fit", "validate", "test", "ladder", "tase-sweep", "bank", "compare"}
    for name in COMMANDS:
        code, out, err = zoo_cli([name, "--help"], capsys)
        assert code == 0, (name, err)
        entries = help_entries(out)
        assert len(entries) > 3, (name, out)
        for option, description in entries:
            # jsonargparse appends "(type: ..., default: ...)" by itself: a description is more than that
            text = re.sub(r"\((required, )?(type|default): .*\)\s*$", "", description, flags=re.S).strip()
            assert text, f"zoo {name} --help: {option!r} has no description"
    code, out, _ = zoo_cli(["compare", "--help"], capsys)
    assert ("a", "results file of model A. (required, type: str)") in help_entries(out)  # positional, with its help
