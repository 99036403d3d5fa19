"""The ``zoo`` command: LightningCLI for fit/validate/test, plus the multi-stage subcommands.

``zoo fit --config configs/fisher_svd_repair.yaml`` builds the model (any ``DistillationModule``,
subclass mode) and the data (any ``TokenDataModule``) from YAML, links the teacher from the model to
the data, logs to W&B (offline unless ``WANDB_MODE=online`` or the logger's ``offline: false``), and
always writes ``metrics.json`` next to the repair state. ``--ckpt_path`` accepts a repair state
(``.safetensors``): the student is rebuilt and the state loaded into it.

User errors (``ZooError``) end with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from callbacks import MetricsJSON
from zoo.core.errors import ZooError
from zoo.core.models import META_PREFIX, RANDOM_PREFIX
from zoo.core.module import DistillationModule

from .command import end_wandb_run, wandb_config
from .data import TokenDataModule

LIGHTNING_COMMANDS = ("fit", "validate", "test")

#: multi-stage subcommands: name -> "module:function"; the function takes the remaining argv.
#: Imported lazily so ``zoo fit`` does not pay for them.
COMMANDS: dict[str, str] = {
    "duel": "recipes.duel:duel_main", "ladder": "recipes.ladder:ladder_main", "spectrum": "recipes.spectrum:spectrum_main",
    "eval": "recipes.evaluate:eval_main", "compare": "recipes.evaluate:compare_main",
    "lm-eval": "recipes.harness:lm_eval_main", "ppl": "recipes.perplexity:ppl_main",
    "bank": "recipes.wizorb:bank_main", "basis": "recipes.wizorb:basis_main", "project": "recipes.wizorb:project_main",
    "plan": "recipes.plan:plan_main",
    "tase-sweep": "recipes.tase_sweep:tase_sweep_main",
}


def default_logger() -> dict:
    return wandb_config(None, "runs")


class ZooCLI(LightningCLI):
    def __init__(self, *args, meta: bool = False, **kwargs):
        self.meta = meta
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.init_args.teacher", "data.init_args.teacher")

    def before_instantiate_classes(self):
        if self.meta:  # shapes only (zoo plan): the model's architecture on the meta device, no weights
            init = (self.config if self.subcommand is None else self.config[self.subcommand])["model"]["init_args"]
            init["teacher"] = META_PREFIX + init["teacher"].removeprefix(RANDOM_PREFIX).removeprefix(META_PREFIX)
        if self.subcommand is None:  # run=False (load_recipe): no ckpt_path to route
            return
        config = self.config[self.subcommand]
        ckpt = config.get("ckpt_path")
        if ckpt and str(ckpt).endswith(".safetensors"):
            # a repair state is not a Lightning checkpoint: the model loads it after building the student
            config["model"]["init_args"]["repair_state"] = str(ckpt)
            config["ckpt_path"] = None

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, MetricsJSON) for c in trainer.callbacks):
            trainer.callbacks.append(MetricsJSON())
        return trainer


def lightning_main(args: list[str] | None) -> None:
    failed = True
    try:
        _lightning_cli(args)
        failed = False
    finally:
        end_wandb_run(failed)  # a later run in this process (tests, notebooks) must not log into this one


def _lightning_cli(args: list[str] | None) -> None:
    ZooCLI(
        DistillationModule,
        TokenDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": default_logger(), "enable_checkpointing": False},
        # parse errors raise instead of printing the whole usage: main() prints one line
        parser_kwargs={"prog": "zoo", "exit_on_error": False,
                       "description": "zoo: structured replacements + distillation repair"},
    )


def load_recipe(config: str, overrides: list[str] | tuple[str, ...] = (), repair_state: str | None = None,
                build: bool = True, device: str | None = None, meta: bool = False):
    """(model, datamodule, trainer) of a recipe YAML, as ``zoo fit --config`` would build them.

    With ``build`` the student is built (calibration from the recipe's data, cached) and
    ``repair_state`` loaded into it: this is how multi-stage commands (``zoo eval``, ...) rebuild a
    student from (config, repair state). With ``meta`` the teacher is its architecture alone on the
    meta device (``meta:<teacher>``; no weights, no tokenizer): what ``zoo plan`` sizes.
    """
    args = ["--config", str(config), *overrides]
    if repair_state:
        args += ["--model.init_args.repair_state", str(repair_state)]
    cli = ZooCLI(DistillationModule, TokenDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 args=args, run=False, meta=meta, auto_configure_optimizers=False, save_config_callback=None,
                 trainer_defaults={"logger": False, "enable_checkpointing": False},
                 parser_kwargs={"prog": "zoo", "exit_on_error": False})
    if build:
        cli.model.build_student_from(cli.datamodule, device)
    return cli.model, cli.datamodule, cli.trainer


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("zoo").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    # the teacher stays in eval mode on purpose (no dropout in the repair forward)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet()
    commands = (*LIGHTNING_COMMANDS, *COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: zoo {{{','.join(commands)}}} --config CONFIG.yaml [--section.key value ...]\n"
              "       zoo COMMAND --help   for a command's options", file=sys.stderr)
        sys.exit(0 if argv else 2)
    command = argv[0]
    try:
        if command in LIGHTNING_COMMANDS:
            lightning_main(None if from_command_line else argv)
        elif command in COMMANDS:
            module_name, _, function = COMMANDS[command].partition(":")
            getattr(importlib.import_module(module_name), function)(argv[1:])
        else:
            raise ZooError(f"unknown command {command!r}; valid commands: {', '.join(commands)}")
    except Exception as exc:  # noqa: BLE001 - user errors print one message; anything else re-raises
        user_error = _user_error(exc)
        if user_error is None:
            raise
        message = str(user_error).strip()
        if isinstance(user_error, ArgumentError):
            message += f"\n(see: zoo {command} --help)"
        print(f"zoo: error: {message}", file=sys.stderr)
        sys.exit(2)


def _user_error(exc: BaseException) -> BaseException | None:
    """The ZooError behind ``exc`` (jsonargparse wraps errors raised while instantiating), if any."""
    seen = exc
    while seen is not None:
        if isinstance(seen, ZooError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc if isinstance(exc, ArgumentError) else None


if __name__ == "__main__":
    main()
