"""The ``zoo`` command: LightningCLI for fit/validate/test (``recipes.lightning_cli``), every other
subcommand a typed function run by the command layer (``recipes.command``: its registry, parser and runner).

``zoo fit --config configs/recipes/fisher_svd_repair.yaml`` builds the model (any ``RepairModule``,
subclass mode) and the data (any ``TokenDataModule``) from YAML, links the teacher from the model to
the data, logs to W&B (offline unless ``WANDB_MODE=online`` or the logger's ``offline: false``), and
always writes ``metrics.json`` next to the repair state. ``zoo --help`` lists the subcommands.

User errors (``ZooError``) end with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import warnings
from typing import TYPE_CHECKING

from jsonargparse import ArgumentError

from zoo.core.errors import ZooError

from .command import COMMANDS, LIGHTNING_COMMANDS, end_wandb_run, run_command, usage

if TYPE_CHECKING:
    from .lightning_cli import ZooCLI

# Lightning, the DataModules and the techniques are imported by the command that runs, not here: ``zoo --help``
# and ``zoo plan --help`` print without them.
_LIGHTNING_CLI = ("SaveConfigOnStart", "ZooCLI", "default_logger", "name_default_logger")


def __getattr__(name: str):
    """``recipes.cli.ZooCLI`` and the other names of ``recipes.lightning_cli``, imported on first use."""
    if name in _LIGHTNING_CLI:
        from . import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lightning_main(args: list[str] | None) -> None:
    # Ctrl-C and SIGTERM alike: during training, stop after the step in progress and write the resume
    # checkpoint (callbacks.resume.STOP); elsewhere, stop at once. Lightning's own SIGTERM handling would
    # exit with status 0 and no interrupt hooks.
    from callbacks.resume import STOP

    failed = True
    STOP.armed, STOP.requested = False, None
    previous = {s: signal.signal(s, STOP.signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _lightning_cli(args)
        if STOP.requested is not None:  # it came while the finished run wrote its files: those are whole
            raise KeyboardInterrupt(f"signal {STOP.requested}")
        failed = False
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        end_wandb_run(failed)  # a later run in this process (tests, notebooks) must not log into this one


def _lightning_cli(args: list[str] | None) -> ZooCLI:
    from zoo.core.lazy import load_all
    from zoo.core.module import RepairModule

    from .data import TokenDataModule
    from .lightning_cli import SaveConfigOnStart, ZooCLI, default_logger

    load_all("zoo")  # jsonargparse finds a short ``class_path: FisherSVD`` among imported subclasses
    return ZooCLI(
        RepairModule,
        TokenDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        auto_configure_optimizers=False,
        save_config_callback=SaveConfigOnStart, save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": default_logger(), "enable_checkpointing": False},
        # parse errors raise instead of printing the whole usage: main() prints one line
        parser_kwargs={"prog": "zoo", "exit_on_error": False,
                       "description": "zoo: structured replacements + distillation repair"},
    )


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _quiet() -> None:
    """zoo's own info lines on stderr (one per stage); third-party noise down."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for name in ("zoo", "recipes", "callbacks"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(h, _Stderr) for h in logger.handlers):
            handler = _Stderr()
            handler.setFormatter(logging.Formatter("zoo: %(message)s"))
            logger.addHandler(handler)
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
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    command = argv[0]
    try:
        if command in LIGHTNING_COMMANDS:
            lightning_main(None if from_command_line else argv)
        elif command in COMMANDS:
            run_command(command, argv[1:])
        else:
            raise ZooError(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
    except KeyboardInterrupt:
        print(f"zoo: interrupted ({command})", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - user errors print one message; anything else re-raises
        user_error = _user_error(exc)
        if user_error is None:
            raise
        message = str(user_error).strip()
        if isinstance(user_error, ArgumentError):
            configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
            configs += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
            if message.startswith("Unexpected config") and configs:  # an empty file, or a YAML scalar
                message = not_a_mapping(configs) or message
            if message.startswith("Problems parsing config") and configs:  # jsonargparse does not say which
                message = f"{' / '.join(configs)}: {message}"
            message = did_you_mean(message)
            message += f"\n(see: zoo {command} --help)"
        print(f"zoo: error: {message}", file=sys.stderr)
        sys.exit(2)


def not_a_mapping(configs: list[str]) -> str | None:
    """Which of the ``--config`` files is empty or not a mapping of options (jsonargparse says only
    "Unexpected config"), in one line; None if each is a mapping."""
    import yaml

    for config in configs:
        try:
            content = yaml.safe_load(open(config, encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # reported by jsonargparse in its own words
        if content is None:
            return f"config file {config!r} is empty: it must hold the command's options"
        if not isinstance(content, dict):
            return f"config file {config!r} holds a YAML {type(content).__name__}, not a mapping of options"
    return None


def _options(cls) -> set[str]:
    """The keyword options of ``cls``'s constructor, through its ``**kwargs`` chain."""
    import inspect

    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names


def _takes_parts(cls) -> bool:
    from zoo.core.module import RepairModule

    return isinstance(cls, type) and issubclass(cls, RepairModule)


def _specs_with_option(option: str) -> list[str]:
    """The zoo's technique specs that take ``option``."""
    import zoo

    specs = [getattr(zoo, n) for n in zoo.__all__]
    return [f"zoo.{s.__name__}" for s in specs if isinstance(s, type) and issubclass(s, zoo.Technique)
            and s is not zoo.Technique and option in _options(s)]


def did_you_mean(message: str) -> str:
    """jsonargparse's answer to a mistyped option (a Union of subtypes, or a bare "unrecognized") made into one
    line with the closest valid names."""
    import re

    from zoo.core.errors import choices_hint

    found = re.search(r"Problem with given class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", message)
    if found:
        module, _, name = found[1].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return message
        options = _options(cls)
        specs = _specs_with_option(found[2]) if found[2] not in options and _takes_parts(cls) else []
        if specs:  # a technique's option given to the training module: it belongs to a part
            return (f"{found[1]} has no option {found[2]!r}: it is an option of the technique "
                    f"({', '.join(specs)}); give it as --model.init_args.parts.{found[2]} (it sets the last part)")
        return (f"{found[1]} has no option {found[2]!r}{choices_hint(found[2], options)}; its options: "
                f"{', '.join(sorted(options))}")
    found = re.search(r"unrecognized arguments: --trainer\.(\w+)", message)
    if found:
        from lightning import Trainer

        return f"{message.splitlines()[0]}{choices_hint(found[1], _options(Trainer))}"
    return message


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
