"""A recipe and its student, without a Trainer (ZOMBORG, source 000, sections 2.1-2.4: project, then repair).

A recipe is the YAML ``zoo fit --config`` reads: a model (any ``RepairModule``, its technique specs in
``parts``), a data module (any ``TokenDataModule``), a trainer section and a seed. ``load_recipe`` turns one
(a path, a YAML string or a parsed dict, plus command-line style overrides) into its model and data objects
and, unless told not to, builds the student: teacher, targets, calibration from the data module (the
``zoo.core.student.CalibrationSource`` protocol), plan, replacements, repair state. Every command that needs
a student (``zoo export``, ``plan``, ``frontier``, ``ppl``, ``eval``, ``lm-eval``, ``autoround``, the
benchmarks) calls it; ``zoo fit``/``validate`` reach the same ``Student.build_from`` through the
LightningModule's ``setup``. The trainer section is parsed (a typo in it is an error here too) but never
instantiated: building a student needs no Trainer, so no command carries CPU-trainer overrides.

``recipe_parser`` and LightningCLI's parser of ``zoo fit`` declare the zoo's own options through one function,
``add_zoo_arguments``: the same YAML parses the same way in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ActionConfigFile
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser

from zoo.core.errors import ZooError
from zoo.core.models import META_PREFIX, RANDOM_PREFIX
from zoo.core.module import RepairModule

from .data import TokenDataModule


def add_zoo_arguments(parser) -> None:
    """What the zoo adds to LightningCLI's parser (and ``recipe_parser``): the data module follows the
    model's teacher, and ``--resume`` of an interrupted fit."""
    parser.link_arguments("model.init_args.teacher", "data.init_args.teacher")
    parser.add_argument("--resume", type=str | None, default=None,
                        help="fit: continue the interrupted run in this directory exactly where it stopped")


def recipe_parser() -> LightningArgumentParser:
    """The parser of a recipe: every key ``zoo fit`` reads (so a run's own ``config.yaml`` is a recipe), with
    the trainer section and fit's checkpoint options parsed but never instantiated."""
    from zoo.core.lazy import load_all

    load_all("zoo")  # as for ``zoo fit``: jsonargparse finds a short ``class_path: FisherSVD`` among imported subclasses
    parser = LightningArgumentParser(prog="zoo recipe", exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="the recipe YAML (a path or its text)")
    parser.add_argument("--seed_everything", type=bool | int, default=True,
                        help="an int seeds everything before the classes are built; true: a random seed")
    parser.add_lightning_class_args(Trainer, "trainer")  # parsed, not built (Lightning's own rule for trainers)
    parser.add_lightning_class_args(RepairModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(TokenDataModule, "data", subclass_mode=True, required=False)
    add_zoo_arguments(parser)
    # `zoo fit` writes these into a run's config.yaml (Trainer.fit's options); a student never reads them
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    parser.add_argument("--weights_only", type=bool | None, default=None)
    return parser


@dataclass
class Recipe:
    """A recipe's objects: its model (holding the ``Student``) and its data module (None if it names none), and
    the recipe as parsed (its own teacher, also where the model is on the meta device)."""

    module: RepairModule
    data: TokenDataModule | None
    config: dict


def load_recipe(config: str | Path | dict, overrides: list[str] | tuple[str, ...] = (),
                repair_state: str | None = None, build: bool = True, device: str | None = None,
                meta: bool = False) -> Recipe:
    """The model and data of a recipe, as ``zoo fit --config`` builds them, and its student.

    Args:
        config: a recipe YAML's path, or the recipe itself (a dict, or a YAML string).
        overrides: command-line style options, e.g. ``['--model.init_args.parts.rank', '0.5']``.
        repair_state: a repair state loaded into the student once built; one that holds every tensor of the
            student (a low-rank repair with ``train_factors``) rebuilds it alone, with no calibration.
        build: build the student (calibration from the recipe's data, cached); false: the teacher with its
            targets resolved, nothing replaced (what ``zoo autoround`` and shape counts need).
        device: where calibration runs (default: where the model is, the CPU).
        meta: the teacher is its architecture alone on the meta device (``meta:<teacher>``; no weights, no
            tokenizer): what ``zoo plan`` sizes.
    """
    if isinstance(config, dict):
        import yaml

        config = yaml.safe_dump(config)
    elif "\n" not in str(config) and not Path(config).is_file():
        raise ZooError(f"recipe {str(config)!r}: no such file")
    parser = recipe_parser()
    cfg = parser.parse_args(["--config", str(config), *overrides])
    init = cfg.model.init_args
    if repair_state:
        init.repair_state = str(repair_state)
    written = cfg.as_dict()
    if meta:  # the model only: the data module keeps the real teacher's name (its tokenizer, its cache keys)
        init.teacher = META_PREFIX + init.teacher.removeprefix(RANDOM_PREFIX).removeprefix(META_PREFIX)
    if cfg.seed_everything is not False:  # as LightningCLI seeds before it builds (LoRA and random-init weights)
        seed_everything(None if cfg.seed_everything is True else cfg.seed_everything, workers=True)
    objects = parser.instantiate_classes(cfg)
    recipe = Recipe(objects.model, objects.get("data"), written)
    if build:
        recipe.module.build_student_from(recipe.data, device, from_state=True)
    return recipe
