"""Run the ``zoo`` command in-process for tests, and write the small recipe configs they run."""
from __future__ import annotations

import yaml

from recipes.cli import main


def zoo_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``zoo ARGS``."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_config(tmp_path, teacher, model=None, **trainer):
    config = {
        "seed_everything": 0,
        "model": model or repair_model("zoo.FisherSVD", targets="model.layers.{0..1}.mlp.down_proj", rank=8, lr=0.01),
        "data": {
            "class_path": "recipes.DistillationDataModule",
            "init_args": {"seq_len": 32, "batch_size": 2, "n_calibration": 4, "n_train": 8, "n_heldout": 4,
                          "max_repeat": 4.0, "code": {"max_files": 40},
                          "hologram": {"n_samples": 6, "max_new_tokens": 24, "gen_batch_size": 6}},
        },
        "trainer": {
            "max_steps": 8, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"), "check_val_every_n_epoch": 1,
            "callbacks": [{"class_path": "callbacks.HeldoutKLGate", "init_args": {"tolerance": 1.0}},
                          {"class_path": "callbacks.RepairStateCheckpoint"}],
            **trainer,
        },
    }
    config["model"]["init_args"]["teacher"] = teacher
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def write_rank1_recipe(tmp_path, teacher):
    """A rank-1 plain-SVD student of the tiny teacher on a few code blocks: a student that differs from its
    teacher, for evaluation commands (``--recipe``)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": repair_model("zoo.FisherSVD", **{"teacher": teacher, "targets": "model.layers.{0..1}.mlp.down_proj",
                                "rank": 1, "weighting": "none"}),
        "data": {"class_path": "recipes.CodeDataModule",
                 "init_args": {"seq_len": 32, "n_calibration": 2, "n_train": 2, "n_heldout": 2, "max_repeat": 4.0,
                               "code": {"max_files": 10}}},
        "trainer": {"logger": False}}))
    return path


def _split(kwargs: dict) -> tuple[dict, dict]:
    """(spec options, DistillationModule options) of one flat dict of both."""
    import inspect

    from zoo import DistillationModule

    shared = set(inspect.signature(DistillationModule.__init__).parameters) - {"self", "parts"}
    return ({k: v for k, v in kwargs.items() if k not in shared}, {k: v for k, v in kwargs.items() if k in shared})


def repair(spec, **kwargs):
    """``DistillationModule(parts=[spec(...)], ...)`` from one flat set of options: the recipe of one technique."""
    from zoo import DistillationModule

    spec_args, module_args = _split(kwargs)
    return DistillationModule(parts=[spec(**spec_args)], **module_args)


def repair_model(spec: str, **kwargs) -> dict:
    """The YAML ``model:`` of a one-technique recipe (``zoo.DistillationModule`` with one part ``spec``)."""
    spec_args, module_args = _split(kwargs)
    return {"class_path": "zoo.DistillationModule",
            "init_args": {"parts": [{"class_path": spec, "init_args": spec_args}], **module_args}}
