"""The one runner of a series of runs (``zoo ladder``, ``zoo tase-sweep``, ``zoo bank``): each run a named
item (a recipe config and its overrides, or whatever the series trains) in its own directory under the
series' output directory; a run whose result is already there is not run again (an interrupted series
resumes where it stopped, ``rerun`` runs it anyway); a failed run is a row of the table, not the end of the
series; the series' JSON is rewritten after every run; the table and chart come at the end (``report``).

A fit runs as ``zoo fit`` in its own process (``fit_subprocess``: a crash ends that run, not the series), or
in this process (``fit_in_process``) where the series holds the module and the data itself.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from zoo.core.errors import ZooError

from .command import finish_logger, wandb_config, wandb_logger
from .report import Outputs


@dataclass
class Item:
    """One run of a series.

    Args:
        name: what ``only`` and the table call it.
        directory: its run directory under the series' output_dir (default: ``name``).
        config: the recipe YAML it fits (as for ``zoo fit --config``), if it is a ``zoo fit``.
        overrides: ``zoo fit`` options after the config.
    """

    name: str
    directory: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def dir_name(self) -> str:
        return self.directory or self.name


class Series:
    """A resumable series of runs. A series says what a finished run left (``done``), how to run one
    (``execute``; default: ``zoo fit`` of the item's config and overrides in a subprocess), the table row of
    a run (``row``) and the JSON of the rows (``payload``, written to ``<stem>.json`` after every run)."""

    title = "series"  #: progress lines: ``=== <title> i/n: <label>``
    noun = "run(s)"  #: in the error for an unknown name in ``only``
    summary_key: str | None = None  #: the metrics.json summary key a finished ``zoo fit`` run has

    def __init__(self, items: list[Item], output_dir: str | Path, stem: str, only: list[str] | None = None,
                 rerun: bool = False, logger: bool = False):
        names = [i.name for i in items]
        unknown = sorted(set(map(str, only or [])) - set(names))
        if unknown:
            raise ZooError(f"unknown {self.noun} {unknown}; valid: {', '.join(names)}")
        self.items, self.only, self.rerun, self.logger = items, only, rerun, logger
        self.outputs = Outputs(output_dir, stem)
        self.out = self.outputs.dir

    def label(self, item: Item) -> str:
        return item.name

    def done(self, item: Item, run_dir: Path) -> dict | None:
        """The result of a finished run in ``run_dir``, else None (default: its ``metrics.json`` if the summary
        has ``summary_key``)."""
        return finished_metrics(run_dir, self.summary_key)

    def kept(self, item: Item, run_dir: Path) -> str:
        return f"finished earlier ({run_dir / 'metrics.json'})"

    def execute(self, item: Item, run_dir: Path) -> str:
        """Run ``item`` into ``run_dir``; its status (``ok``, or why not)."""
        logger_name = f"{self.outputs.stem}/{item.dir_name}" if self.logger else None
        code, last = fit_subprocess(item.config, item.overrides, run_dir, logger_name)
        return self.status(code, last, self.done(item, run_dir))

    def status(self, code: int, last: str, metrics: dict | None) -> str:
        return "ok" if code == 0 else f"failed: {last[:120]}"

    def row(self, item: Item, result: dict | None, status: str, run_dir: Path) -> dict:
        raise NotImplementedError

    def payload(self, rows: list[dict]) -> dict:
        raise NotImplementedError

    def save(self, rows: list[dict]) -> Path:
        return self.outputs.json(self.payload(rows), default=str, record=False)

    def run(self) -> list[dict]:
        """Every selected item not finished (or every selected one with ``rerun``), then its row; the rows."""
        rows, n = [], len(self.items)
        for i, item in enumerate(self.items, 1):
            run_dir = self.out / item.dir_name
            result = self.done(item, run_dir)
            head = f"=== {self.title} {i}/{n}: {self.label(item)}"
            status = "ok"
            if (self.only is None or item.name in map(str, self.only)) and (result is None or self.rerun):
                run_dir.mkdir(parents=True, exist_ok=True)
                print(f"\n{head}", flush=True)
                status = self.execute(item, run_dir)
                result = self.done(item, run_dir)
            elif result is None:
                status = "not run"
            else:
                print(f"{head}: {self.kept(item, run_dir)}")
            rows.append(self.row(item, result, status, run_dir))
            self.save(rows)
        return rows


def check_unique(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise ZooError(f"{what} must be unique, got {names}")


def check_configs(items: list[Item], what: str) -> None:
    for item in items:
        if not Path(item.config).is_file():
            raise ZooError(f"{what} {item.name!r}: config {item.config!r} does not exist")


# --------------------------------------------------------------------------------------------------
# running a fit


def zoo_args(subcommand: str, config: str, overrides: list[str], run_dir: Path, logger_name: str | None) -> list[str]:
    """``zoo <subcommand>`` (fit, validate, test) of ``config`` with ``overrides`` as a subprocess argv, run in
    ``run_dir``, logging to W&B under ``logger_name`` (None: no logger)."""
    logger = json.dumps(wandb_config(logger_name, run_dir)) if logger_name else "false"
    return [sys.executable, "-m", "recipes.cli", subcommand, "--config", config, *overrides,
            "--trainer.default_root_dir", str(run_dir), "--trainer.logger", logger]


def fit_args(config: str, overrides: list[str], run_dir: Path, logger_name: str | None) -> list[str]:
    """``zoo fit`` of ``config`` as a subprocess argv (see ``zoo_args``)."""
    return zoo_args("fit", config, overrides, run_dir, logger_name)


def fit_subprocess(config: str, overrides: list[str], run_dir: Path, logger_name: str | None) -> tuple[int, str]:
    """``zoo fit`` in its own process, its output streamed to the terminal and ``run_dir/fit.log``; (exit code,
    last line)."""
    args = fit_args(config, overrides, run_dir, logger_name)
    print(f"$ {shlex.join(args[1:])}", flush=True)
    return run_streaming(args, run_dir / "fit.log")


def fit_in_process(module, datamodule, run_dir: Path, logger_name: str | None, **trainer_options) -> dict:
    """``trainer.fit`` of ``module`` on ``datamodule`` in this process, into ``run_dir``, with the trainer of
    ``zoo fit`` (``equip_trainer``: ``metrics.json`` there; no resume checkpoint, the series keeps finished
    runs) and its own W&B run under ``logger_name`` (None: none); the final scalar metrics."""
    import lightning as L
    import torch

    from .lightning_cli import equip_trainer

    logger = wandb_logger(logger_name, run_dir) if logger_name else False
    trainer = L.Trainer(logger=logger, enable_checkpointing=False, default_root_dir=str(run_dir), **trainer_options)
    equip_trainer(trainer, resume=False).fit(module, datamodule=datamodule)
    if logger:
        finish_logger(logger)  # each run its own W&B run
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


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


def finished_metrics(run_dir: Path, summary_key: str) -> dict | None:
    """The ``metrics.json`` of a run in ``run_dir`` whose summary has ``summary_key`` (its end-of-run result),
    else None: how a series of runs knows which ones it need not run again."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if summary_key in metrics.get("summary", {}) else None


def one_line(exc: Exception) -> str:
    """The reason of a recipe that does not parse (jsonargparse's union error names it on a ``- `` line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    reasons = [line[2:] for line in lines if line.startswith("- ") and "NoneType" not in line]
    return (reasons[0] if reasons else lines[0] if lines else type(exc).__name__)[:160]


def run_stage(args: list[str], log: Path, stale: tuple[Path, ...]) -> tuple[dict, int, str]:
    """A stage's command in its own process, streamed to ``log``, after the ``stale`` files an earlier attempt
    left are removed (they must not pass for this run's); ({seconds, exit_code}, exit code, last line)."""
    for left in stale:
        left.unlink(missing_ok=True)
    print(f"$ {shlex.join(['zoo', *args[3:]])}", flush=True)
    start = time.monotonic()
    code, last = run_streaming(args, log)
    return {"seconds": round(time.monotonic() - start, 1), "exit_code": code}, code, last
