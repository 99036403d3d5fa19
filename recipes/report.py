"""The one writer of what commands produce: ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in the command's
output directory (written through a temp file and rename, ``zoo.core.cache.atomic_write_text``), a
Markdown table, and the same figures to a Lightning logger (W&B: tables, texts and images too)."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.core.cache import atomic_write_text

from .command import finish_logger

if TYPE_CHECKING:  # a hint only: Lightning takes seconds to import
    from lightning.pytorch.loggers import Logger


def fmt(value, spec: str) -> str:
    """A table cell: ``value`` formatted, or "-" when missing."""
    return "-" if value is None else format(value, spec)


def cell(value) -> str:
    """A table cell of any value: floats to 4 decimals (NaN: "-")."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(head: list[str], rows: Iterable[list], compact: bool = True) -> str:
    """A Markdown table of cells (strings, or any value through ``cell``); ``compact``: ``|---|`` rules. A ``|``
    inside a cell (a label such as ``mean |x|``) is escaped, so it does not split the cell."""
    rule = "|" + "---|" * len(head) if compact else "| " + " | ".join("---" for _ in head) + " |"
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, head)) + " |", rule]
    lines += ["| " + " | ".join(escape(cell(v)) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Outputs:
    """The files of one command run in ``output_dir``, named ``<stem>.<ext>`` unless given a name; ``wrote()``
    lists what was written."""

    def __init__(self, output_dir: str | Path, stem: str):
        self.dir, self.stem = Path(output_dir), stem
        self.written: list[Path] = []

    def path(self, ext: str, name: str | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / (name or f"{self.stem}.{ext}")

    def add(self, path: str | Path) -> Path:
        """Record a file the command wrote itself (e.g. a safetensors file)."""
        self.written.append(Path(path))
        return Path(path)

    def json(self, payload: dict, name: str | None = None, indent: int = 2, default=None,
             record: bool = True) -> Path:
        path = atomic_write_text(self.path("json", name), json.dumps(payload, indent=indent, default=default))
        return self.add(path) if record else path

    def markdown(self, text: str, name: str | None = None) -> Path:
        return self.add(atomic_write_text(self.path("md", name), text + "\n"))

    def chart(self, plot: Callable[..., Path], *args, name: str | None = None, **kwargs) -> Path:
        """``plot(*args, path, **kwargs)`` into ``<stem>.png``."""
        return self.add(plot(*args, self.path("png", name), **kwargs))

    def wrote(self) -> str:
        names = [str(p) for p in dict.fromkeys(self.written)]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"wrote {listed}"


def log_outputs(logger: Logger | None, *, hyperparams: dict | None = None, metrics: dict | None = None,
                step: int | None = None, steps: Iterable[tuple[int, dict]] = (),
                tables: dict[str, tuple[list[str], list[list]]] | None = None,
                texts: dict[str, list[str]] | None = None, images: dict[str, Path] | None = None) -> None:
    """A command's figures to ``logger`` (None: nothing), then its run ended: hyperparameters, ``metrics``
    (at ``step``) and per-step ``steps``; tables (key: (columns, rows)), texts (key: lines, one ``finding``
    column) and images (key: PNG) where the logger takes them (W&B)."""
    if logger is None:
        return
    if hyperparams:
        logger.log_hyperparams(hyperparams)
    if metrics:
        logger.log_metrics(metrics, step=step)
    for at, values in steps:
        logger.log_metrics(values, step=at)
    if hasattr(logger, "log_table"):
        for key, (columns, rows) in (tables or {}).items():
            logger.log_table(key=key, columns=columns, data=rows)
    if hasattr(logger, "log_text"):
        for key, lines in (texts or {}).items():
            logger.log_text(key=key, columns=["finding"], data=[[line] for line in lines])
    if hasattr(logger, "log_image"):
        for key, image in (images or {}).items():
            logger.log_image(key=key, images=[str(image)])
    finish_logger(logger)


def row_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(columns, rows) of a list of dict rows, for ``log_outputs(tables=...)``: every key of any row, in the
    order first seen (a row without one gets None)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return columns, [[r.get(c) for c in columns] for r in rows]
