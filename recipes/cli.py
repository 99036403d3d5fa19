"""The ``zoo`` command: LightningCLI for fit/validate/test, plus the multi-stage subcommands.

``zoo fit --config configs/recipes/fisher_svd_repair.yaml`` builds the model (any ``RepairModule``,
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
import signal
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks import MetricsJSON
from callbacks.resume import STOP, Resume, SafetensorsCheckpointIO
from zoo.core.cache import check_writable
from zoo.core.errors import ZooError
from zoo.core.models import META_PREFIX, RANDOM_PREFIX
from zoo.core.state import RESUME_FILE, load_checkpoint, read_header
from zoo.core.module import RepairModule

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
    "tase-sweep": "recipes.tase_sweep:tase_sweep_main", "export": "recipes.export:export_main",
}


def default_logger() -> dict:
    """The logger of a run whose recipe names none: W&B (offline unless ``WANDB_MODE=online``) in ``runs/``;
    ``name_default_logger`` names it after the run."""
    return wandb_config(None, "runs")


def name_default_logger(config) -> None:
    """Name the default logger of a parsed fit/validate/test ``config`` after the run: the W&B run is called
    after the (first) ``--config`` file (``configs/recipes/X.yaml`` logs run ``X``) and saved in the run's
    ``trainer.default_root_dir``. A logger the recipe or the command line names (or sets a save_dir for) is
    left as it is."""
    logger, default = config["trainer"].get("logger"), default_logger()
    init = getattr(logger, "init_args", None)
    if getattr(logger, "class_path", None) != default["class_path"] or init is None:
        return
    if init.get("name") is not None or str(init.get("save_dir")) != default["init_args"]["save_dir"]:
        return
    files = config.get("config") or []
    if files:
        init["name"] = Path(str(files[0])).stem
    if config["trainer"].get("default_root_dir"):
        init["save_dir"] = str(config["trainer"]["default_root_dir"])


class SaveConfigOnStart(SaveConfigCallback):
    """LightningCLI's ``config.yaml``: the recipe of a fit, written when it reaches training, not at setup, so
    a rerun into the same directory that fails while it loads or calibrates leaves the earlier run's config as
    it was. ``zoo validate``/``test`` of a run never replace it (``zoo export --run`` rebuilds from it)."""

    def setup(self, trainer, pl_module, stage):
        pass

    def on_train_start(self, trainer, pl_module):
        SaveConfigCallback.setup(self, trainer, pl_module, "fit")


class ZooCLI(LightningCLI):
    def __init__(self, *args, meta: bool = False, **kwargs):
        self.meta = meta
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.init_args.teacher", "data.init_args.teacher")
        parser.add_argument("--resume", type=str | None, default=None,
                            help="fit: continue the interrupted run in this directory exactly where it stopped")

    def before_instantiate_classes(self):
        if self.meta:  # shapes only (zoo plan): the model's architecture on the meta device, no weights
            init = (self.config if self.subcommand is None else self.config[self.subcommand])["model"]["init_args"]
            init["teacher"] = META_PREFIX + init["teacher"].removeprefix(RANDOM_PREFIX).removeprefix(META_PREFIX)
        if self.subcommand is None:  # run=False (load_recipe): no ckpt_path to route
            return
        config = self.config[self.subcommand]
        resume = config.get("resume")
        if resume:
            if self.subcommand != "fit":
                raise ZooError(f"--resume continues a fit; `zoo {self.subcommand}` takes --ckpt_path")
            if config.get("ckpt_path"):
                raise ZooError("give --resume RUN_DIR or --ckpt_path STATE, not both")
            path = Path(resume) / RESUME_FILE
            check_resume(path)
            config["trainer"]["default_root_dir"] = str(Path(resume))
        name_default_logger(config)
        check_output_dirs(config)
        self._parse_ckpt_path()
        if resume:
            config["ckpt_path"] = str(path)  # after the repair-state routing: Lightning restores it

    def _parse_ckpt_path(self):
        # Lightning's own version torch.loads the file while parsing, before any hook of ours: a repair
        # state is not a Lightning checkpoint; the model loads it after building the student
        config = self.config.get(self.config.get("subcommand") or "", None)
        ckpt = config.get("ckpt_path") if config is not None else None
        if ckpt:
            config["model"]["init_args"]["repair_state"] = str(repair_state_path(str(ckpt)))
            config["ckpt_path"] = None

    def _log_run_config(self):
        """The whole resolved config (model, data, trainer, seed) and the code's commit, for every logger."""
        config = self.config[self.subcommand].as_dict()
        config.pop("config", None)
        config["git_commit"] = git_commit()
        for logger in self.trainer.loggers:
            logger.log_hyperparams({"zoo": config})

    def _log_run_summary(self):
        """What the run built and reached (trainable-parameter count, targets, gate results) in the W&B summary."""
        from lightning.pytorch.loggers import WandbLogger

        summary = getattr(self.model, "summary", {})
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and summary:
                logger.experiment.summary.update(summary)

    def before_fit(self):
        self._log_run_config()

    def before_validate(self):
        self._log_run_config()

    def after_fit(self):
        self._log_run_summary()

    def after_validate(self):
        self._log_run_summary()

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for kind in (MetricsJSON, Resume):
            if not any(isinstance(c, kind) for c in trainer.callbacks):
                trainer.callbacks.append(kind())
        trainer.strategy.checkpoint_io = SafetensorsCheckpointIO()
        return trainer


def git_commit() -> str | None:
    """The commit of the zoo checkout this code runs from (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def repair_state_path(ckpt: str) -> Path:
    """The repair state ``--ckpt_path`` names (a ``.safetensors`` state, or a run directory holding one), its
    header checked now, before any weights load. Lightning's own checkpoints are refused: they are pickles
    (``torch.load``), and a URL would be fetched and unpickled."""
    if "://" in ckpt:
        raise ZooError(f"--ckpt_path {ckpt!r} is a URL; the zoo loads only local repair states (download it first)")
    path = Path(ckpt)
    if path.is_dir():
        path = path / "repair_state.safetensors"
    elif path.suffix != ".safetensors":
        raise ZooError(f"--ckpt_path {ckpt!r} is not a repair state: give a .safetensors repair state or a run "
                       "directory holding repair_state.safetensors (Lightning .ckpt pickles are not loaded)")
    read_header(path)  # one-line error for a missing, truncated or foreign file
    return path


def check_output_dirs(config) -> None:
    """Every directory the run will write (the run directory, callbacks' ``dirpath``) is writable, checked
    before the teacher loads and calibration starts."""
    trainer = config["trainer"]
    check_writable(trainer.get("default_root_dir") or os.getcwd(), "trainer.default_root_dir")
    for callback in trainer.get("callbacks") or []:
        init = getattr(callback, "init_args", None) or (callback.get("init_args") if isinstance(callback, dict) else None)
        dirpath = init.get("dirpath") if init is not None else None
        if dirpath:
            check_writable(dirpath, f"{getattr(callback, 'class_path', 'callback')} dirpath")


def check_resume(path: Path) -> None:
    """One line for a run directory with nothing to resume, before any work."""
    if not path.parent.is_dir():
        raise ZooError(f"--resume {str(path.parent)!r}: no such run directory")
    if not path.is_file():
        raise ZooError(f"--resume {str(path.parent)!r}: the run left no {RESUME_FILE} (it stopped before its "
                       "first step, or it is not a zoo run directory); start it again without --resume")
    load_checkpoint(path)  # a damaged file is reported now, not after calibration


def lightning_main(args: list[str] | None) -> None:
    # Ctrl-C and SIGTERM alike: during training, stop after the step in progress and write the resume
    # checkpoint (callbacks.resume.STOP); elsewhere, stop at once. Lightning's own SIGTERM handling would
    # exit with status 0 and no interrupt hooks.
    failed = True
    previous = {s: signal.signal(s, STOP.signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _lightning_cli(args)
        failed = False
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        end_wandb_run(failed)  # a later run in this process (tests, notebooks) must not log into this one


def _lightning_cli(args: list[str] | None) -> ZooCLI:
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
    cli = ZooCLI(RepairModule, TokenDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 args=args, run=False, meta=meta, auto_configure_optimizers=False, save_config_callback=None,
                 trainer_defaults={"logger": False, "enable_checkpointing": False},
                 parser_kwargs={"prog": "zoo", "exit_on_error": False})
    if build:
        cli.model.build_student_from(cli.datamodule, device)
    return cli.model, cli.datamodule, cli.trainer


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
            if message.startswith("Problems parsing config") and configs:  # jsonargparse does not say which
                message = f"{' / '.join(configs)}: {message}"
            message = did_you_mean(message)
            message += f"\n(see: zoo {command} --help)"
        print(f"zoo: error: {message}", file=sys.stderr)
        sys.exit(2)


def _options(cls) -> set[str]:
    """The keyword options of ``cls``'s constructor, through its ``**kwargs`` chain."""
    import inspect

    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names


def did_you_mean(message: str) -> str:
    """jsonargparse's answer to a mistyped option (a Union of subtypes, or a bare "unrecognized") made into one
    line with the closest valid names."""
    import re

    from zoo.core.errors import choices_hint

    found = re.search(r"Problem with given class_path '([\w.]+)':\s+Option '(\w+)' is not accepted", message)
    if found:
        module, _, name = found[1].rpartition(".")
        try:
            options = _options(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            return message
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
