"""The command layer of ``zoo``: one registry of subcommands, one parser builder, one runner.

Every subcommand beside LightningCLI's ``fit``/``validate``/``test`` is a typed function (its options are
its parameters, their help its docstring's ``Args:`` section). ``COMMANDS`` names each one with a one-line
description; ``command_parser`` builds its jsonargparse parser (``--config``, optionally ``--data``, a
recipe DataModule whose teacher follows the command's, and ``--logger``); ``run_command`` parses,
instantiates and calls it. Logging is W&B, offline unless
``WANDB_MODE=online``.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jsonargparse import ActionConfigFile, ArgumentParser

if TYPE_CHECKING:  # imported where a parser or a logger is built: ``zoo --help`` needs no Lightning
    from lightning.pytorch.loggers import Logger


@dataclass(frozen=True)
class Command:
    """A ``zoo`` subcommand.

    Args:
        target: ``module:function`` of its typed function (imported only when the command runs); None:
            a LightningCLI subcommand.
        help: its one-line description (``zoo --help``, and the head of its own ``--help``).
        data: ``required`` or ``optional``: a ``--data`` recipe DataModule, its teacher linked to the
            function's ``teacher``.
        logger: a ``--logger`` option (a Lightning logger; true: W&B offline in ``output_dir``; false: none).
        logger_name: the W&B run name of ``--logger true``.
        positional: required options may be given without their ``--name`` (``zoo compare A B``).
    """

    target: str | None
    help: str
    data: str | None = None
    logger: bool = False
    logger_name: str | None = None
    positional: bool = False

    def function(self):
        if self.target is None:
            raise ValueError("fit/validate/test are LightningCLI's (recipes.cli.lightning_main), not functions")
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


#: every ``zoo`` subcommand, in ``zoo --help`` order
COMMANDS: dict[str, Command] = {
    "fit": Command(None, "repair a student: build it from a recipe YAML and distill it from its teacher"),
    "validate": Command(None, "the heldout metrics of a recipe's student (--ckpt_path: a repair state)"),
    "test": Command(None, "the test loop of a recipe's student (--ckpt_path: a repair state)"),
    "plan": Command("recipes.plan:plan_recipe", "parameter counts and a peak-memory estimate of a recipe on a "
                    "model, without loading its weights"),
    "export": Command("recipes.export:export_run", "write a compressed student as a transformers directory that "
                      "loads without the teacher"),
    "eval": Command("recipes.evaluate:eval_model", "greedy pass@1 on HumanEval+/MBPP+ through evalplus",
                    positional=True),
    "compare": Command("recipes.evaluate:compare_results", "paired table and exact McNemar test of two "
                       "evaluation results", positional=True),
    "lm-eval": Command("recipes.harness:lm_eval_model", "lm-eval-harness tasks on a teacher or a student, "
                       "through lm-eval's HFLM on the model in memory", logger=True, logger_name="lm_eval"),
    "ppl": Command("recipes.perplexity:ppl", "perplexity in non-overlapping windows (default 2048 tokens)",
                   logger=True, logger_name="ppl"),
    "speed": Command("recipes.speed:speed", "prefill and decode tokens/s of a recipe's exported student against its "
                     "dense teacher, side by side"),
    "duel": Command("recipes.duel:basis_duel", "compare bases of one layer at one rank (source 000, 4.2)",
                    data="required", logger=True, logger_name="basis_duel"),
    "spectrum": Command("recipes.spectrum:spectrum_report", "per-layer eigen-spectra of hidden states, Q, K, V "
                        "and their weights (source 004)", data="required", logger=True, logger_name="spectrum"),
    "ladder": Command("recipes.ladder:run_ladder", "the scaling ladder of structured replacements, one fit per "
                      "rung (source 000, 4.5-4.9)"),
    "frontier": Command("recipes.frontier:run_frontier", "whole-model compression methods x settings (ratios, "
                        "bits): bytes, code/prose ppl before and after repair, one row per (method, value)"),
    "autoround": Command("recipes.autoround:autoround", "the AutoRound baseline (auto-round's own API) on a recipe's "
                         "teacher and calibration tokens: a dequantized checkpoint for zoo.Transplant"),
    "tase-sweep": Command("recipes.tase_sweep:run_sweep", "TASE identity deviation over k, one fit per k "
                          "(source 000, 4.9, phase 51)"),
    "bank": Command("recipes.wizorb:train_bank", "a delta bank of LoRA adapters on disjoint code shards "
                    "(source 001, 3.3)", data="optional"),
    "basis": Command("recipes.wizorb:build_basis", "per-module universal bases of a delta bank, train/holdout "
                     "reconstruction error vs k (source 001, 4)"),
    "project": Command("recipes.wizorb:project", "an adapter projected into a universal basis, with "
                       "random/secondary/mean controls (source 001, phases 9-14)"),
}
LIGHTNING_COMMANDS = tuple(name for name, command in COMMANDS.items() if command.target is None)


def usage() -> str:
    """``zoo --help``: every subcommand with its one-line description."""
    width = max(map(len, COMMANDS))
    lines = ["usage: zoo COMMAND [--config CONFIG.yaml] [--option value ...]",
             "       zoo COMMAND --help   for a command's options", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def command_parser(name: str) -> ArgumentParser:
    """The parser of subcommand ``name``: its function's typed signature plus ``--config`` (and ``--data``,
    ``--logger`` where the registry says)."""
    command = COMMANDS[name]
    parser = ArgumentParser(prog=f"zoo {name}", exit_on_error=False, description=f"zoo {name}: {command.help}")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML with any of the options below")
    skip = ({"data"} if command.data else set()) | ({"logger"} if command.logger else set())
    parser.add_function_arguments(command.function(), skip=skip, as_positional=command.positional)
    if command.data:
        from .data import TokenDataModule

        parser.add_subclass_arguments(TokenDataModule, "data", required=command.data == "required")
        parser.link_arguments("teacher", "data.init_args.teacher")
    if command.logger:
        from lightning.pytorch.loggers import Logger

        parser.add_argument("--logger", type=Logger | bool | None, default=True,
                            help="a Lightning logger (class_path/init_args); true: W&B offline in output_dir; "
                                 "false/null: none")
    return parser


def run_command(name: str, argv: list[str]):
    """Parse ``argv`` for subcommand ``name``, build the objects it names, and call its function."""
    command = COMMANDS[name]
    parser = command_parser(name)
    init = parser.instantiate_classes(parser.parse_args(argv))
    kwargs = {k: v for k, v in vars(init).items() if k not in ("config", "__path__")}
    if command.logger and isinstance(kwargs.get("logger"), bool | None):
        kwargs["logger"] = command_logger(kwargs["logger"], command.logger_name or name, kwargs["output_dir"])
    return command.function()(**kwargs)


# --------------------------------------------------------------------------------------------------
# the W&B logger of every run


def wandb_init_args(name: str | None, save_dir: str | Path) -> dict:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"a W&B run name is a string, got {name!r} (arguments are name, save_dir)")
    return {"project": "zoo", "name": name, "save_dir": str(save_dir),
            "offline": os.environ.get("WANDB_MODE") != "online"}


def wandb_config(name: str | None, save_dir: str | Path) -> dict:
    """The W&B logger as a LightningCLI ``class_path``/``init_args`` dict."""
    return {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": wandb_init_args(name, save_dir)}


def wandb_logger(name: str, save_dir: str | Path) -> Logger:
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(**wandb_init_args(name, save_dir))


def command_logger(enabled: bool | None, name: str, save_dir: str | Path) -> Logger | None:
    """A command's W&B logger (``--logger true``), or None."""
    return wandb_logger(name, save_dir) if enabled else None


def end_wandb_run(failed: bool = False) -> None:
    """Finish the W&B run in progress, if any. Lightning's ``finalize`` leaves a W&B run open, and the next W&B
    logger in the same process would then log into it (wandb reuses a run in progress)."""
    wandb = sys.modules.get("wandb")  # never import wandb just to find nothing to finish
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def finish_logger(logger: Logger) -> None:
    """End a command's logger run (see ``end_wandb_run``)."""
    logger.finalize("success")
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        end_wandb_run()
