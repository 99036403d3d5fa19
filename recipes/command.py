"""What the multi-stage ``zoo`` commands (``zoo duel``, ``zoo spectrum``, ``zoo bank``, ...) share: a
jsonargparse parser over the command's function (with ``--config``, optionally a recipe DataModule whose
teacher is linked to the command's, and a Lightning logger), running it, and the W&B logger every run uses
(offline unless ``WANDB_MODE=online``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.loggers import Logger

from .data import TokenDataModule


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


def command_parser(function, prog: str, description: str, *, data: str | None = None,
                   logger: bool = False, positional: bool = False) -> ArgumentParser:
    """A parser of ``function``'s typed signature plus ``--config``.

    ``data``: ``required`` or ``optional`` adds ``--data`` (any recipe DataModule; its teacher follows the
    command's ``teacher``). ``logger`` adds ``--logger`` (a Lightning logger, or true: W&B offline in the
    command's ``output_dir``, or false). ``positional``: required arguments may be given without their
    ``--name`` (``zoo compare A.json B.json``).
    """
    parser = ArgumentParser(prog=prog, exit_on_error=False, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML with any of the options below")
    skip = ({"data"} if data else set()) | ({"logger"} if logger else set())
    parser.add_function_arguments(function, skip=skip, as_positional=positional)
    if data:
        parser.add_subclass_arguments(TokenDataModule, "data", required=data == "required")
        parser.link_arguments("teacher", "data.init_args.teacher")
    if logger:
        parser.add_argument("--logger", type=Logger | bool | None, default=True,
                            help="a Lightning logger (class_path/init_args); true: W&B offline in output_dir; "
                                 "false/null: none")
    return parser


def run_command(function, parser: ArgumentParser, argv: list[str], logger_name: str | None = None):
    """Parse ``argv``, build the objects it names, and call ``function`` with them."""
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in vars(init).items() if k not in ("config", "__path__")}
    if logger_name is not None and "logger" in kwargs and isinstance(kwargs["logger"], bool | None):
        kwargs["logger"] = wandb_logger(logger_name, kwargs["output_dir"]) if kwargs["logger"] else None
    return function(**kwargs)


def run_streaming(args: list[str], log_path: Path) -> tuple[int, str]:
    """Run a command, streaming its output to the terminal and to ``log_path``; (exit code, last line of stderr)."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        last = ""
        for line in proc.stdout:
            sys.stdout.write(line)
            log_file.write(line)
            if line.strip():
                last = line.strip()
        return proc.wait(), last


def fit_args(config: str, overrides: list[str], run_dir: Path, logger_name: str | None) -> list[str]:
    """``zoo fit`` of ``config`` with ``overrides`` as a subprocess argv, run in ``run_dir``, logging to W&B
    under ``logger_name`` (None: no logger). Series of runs (``zoo ladder``, ``zoo tase-sweep``) use it."""
    logger = json.dumps(wandb_config(logger_name, run_dir)) if logger_name else "false"
    return [sys.executable, "-m", "recipes.cli", "fit", "--config", config, *overrides,
            "--trainer.default_root_dir", str(run_dir), "--trainer.logger", logger]


def finished_metrics(run_dir: Path, summary_key: str) -> dict | None:
    """The ``metrics.json`` of a run in ``run_dir`` whose summary has ``summary_key`` (its end-of-run result),
    else None: how a series of runs knows which ones it need not run again."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if summary_key in metrics.get("summary", {}) else None


def fmt(value, spec: str) -> str:
    """A table cell: ``value`` formatted, or "-" when missing."""
    return "-" if value is None else format(value, spec)
