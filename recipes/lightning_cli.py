"""The LightningCLI of ``zoo fit``/``validate``/``test`` (``ZooCLI``) and the checks it makes before any
work: ``--ckpt_path`` as a repair state, ``--resume`` of a run directory, writable output directories, the
data's sizes.

``zoo fit --config configs/recipes/fisher_svd_repair.yaml`` builds the model (any ``RepairModule``,
subclass mode) and the data (any ``TokenDataModule``) from YAML, links the teacher from the model to the
data, and always writes ``metrics.json`` next to the repair state. ``--ckpt_path`` accepts a repair state
(``.safetensors``): the student is rebuilt and the state loaded into it. ``recipes.recipe.load_recipe``
builds the same objects without a Trainer (the zoo's options come from one function, ``add_zoo_arguments``).
"""
from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks import MetricsJSON
from callbacks.resume import Resume, SafetensorsCheckpointIO
from zoo.core.cache import check_writable
from zoo.core.errors import ZooError
from zoo.core.state import RESUME_FILE, load_checkpoint, read_header

from .command import wandb_config
from .data.modules import check_data_options, check_teacher_logits
from .recipe import add_zoo_arguments


def default_logger() -> dict:
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
    def add_arguments_to_parser(self, parser):
        add_zoo_arguments(parser)

    def before_instantiate_classes(self):
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
        data_init = (config.get("data") or {}).get("init_args", {})
        check_data_options(**data_init)
        check_teacher_logits(config["model"].get("init_args", {}), data_init)
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
        return equip_trainer(super().instantiate_trainer(**kwargs))


def equip_trainer(trainer, resume: bool = True):
    """What every zoo fit's trainer has: ``metrics.json`` (``MetricsJSON``), the resume checkpoint
    (``Resume``, unless ``resume`` is false) and safetensors checkpoints instead of pickles."""
    for kind in (MetricsJSON, Resume) if resume else (MetricsJSON,):
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
