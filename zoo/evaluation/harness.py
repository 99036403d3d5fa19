"""Greedy pass@1 of a model on a code benchmark, and the teacher's cached scores (source 000, sections
3.1-3.2: "EvalPlus pass@1 ... non-zero pass@1 on smoke sets before long runs").

``evaluate`` = prompts -> batched greedy generation (in this process) -> evalplus sanitize -> scoring
in the sandboxed worker -> ``EvalResult``. ``teacher_outcomes`` evaluates the teacher (the student
model under ``teacher_view``) once per task and caches the outcome on disk, so a gate that runs at
every validation pays for the teacher once; ``teacher_solved`` is the first N tasks the teacher passes.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import time

from ..core.errors import ZooError
from ..core.models import cache_root
from ..core.surgery import teacher_view
from .generation import build_prompt, generate, resolve_style, stop_strings
from .problems import TEACHER_SOLVED, ProblemSet, load_problems, select
from .results import EvalResult, TaskResult
from .scoring import Limits, sanitize_solution, score

log = logging.getLogger(__name__)


def evaluate(model, tokenizer, dataset: str = "humaneval", subset: str = "HE10", *,
             problem_set: ProblemSet | None = None, task_ids: list[str] | None = None,
             prompt_style: str = "auto", max_new_tokens: int = 512, batch_size: int = 8,
             limits: Limits = Limits(), parallel: int | None = None, model_info: dict | None = None,
             progress: bool = True, journal: str | os.PathLike | None = None) -> EvalResult:
    """Greedy pass@1 of ``model`` on ``subset`` of ``dataset`` (or on explicit ``task_ids``, which
    ``subset`` then only names).

    The model generates in whatever view it is in (student, or teacher inside ``teacher_view``).
    ``journal``: a file that keeps finished generations, so an interrupted run resumes (``generate``).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ZooError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    problem_set = problem_set or load_problems(dataset)
    ids = list(task_ids) if task_ids is not None else select(problem_set, subset)
    style = resolve_style(tokenizer, prompt_style)
    stops = stop_strings(problem_set.dataset, style)
    problems = [problem_set.problems[t] for t in ids]
    prompts = [build_prompt(p.prompt, tokenizer, style) for p in problems]

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        generations = generate(model, tokenizer, prompts, stops, max_new_tokens, batch_size,
                               add_special_tokens=style == "completion", progress=progress, journal=journal)
    finally:
        model.train(was_training)
    generated = time.perf_counter()
    solutions = {p.task_id: sanitize_solution(p, g, style) for p, g in zip(problems, generations)}
    statuses = score(problem_set, solutions, limits, parallel, progress)
    scored = time.perf_counter()

    strict = problem_set.tests == "plus"
    tasks = []
    for p, g in zip(problems, generations):
        s = statuses[p.task_id]
        passed = s["base_status"] == "pass" and (not strict or s["plus_status"] == "pass")
        tasks.append(TaskResult(p.task_id, passed, s["base_status"], s["plus_status"], g, solutions[p.task_id]))
    parameter = next(model.parameters())
    return EvalResult(
        dataset=problem_set.describe(), subset=subset, model=dict(model_info or {}),
        generation={"greedy": True, "prompt_style": style, "max_new_tokens": max_new_tokens,
                    "batch_size": batch_size, "stop": stops, "dtype": str(parameter.dtype).removeprefix("torch."),
                    "device": str(parameter.device), "min_time_limit": limits.min_time_limit,
                    "gt_time_limit_factor": limits.gt_time_limit_factor},
        tasks=tasks, timing={"generate_s": round(generated - start, 2), "score_s": round(scored - generated, 2)},
        created=datetime.datetime.now().isoformat(timespec="seconds"),
    )


def parse_teacher_solved(subset: str) -> int | None:
    """N of ``teacher-solved:N`` (None for any other subset)."""
    if not subset.startswith(TEACHER_SOLVED):
        return None
    match = re.fullmatch(rf"{TEACHER_SOLVED}:(\d+)", subset)
    if not match or int(match.group(1)) < 1:
        raise ZooError(f"subset {subset!r}: expected {TEACHER_SOLVED}:N with N >= 1 (e.g. {TEACHER_SOLVED}:10)")
    return int(match.group(1))


class TeacherCache:
    """Per-task outcomes of one teacher under fixed generation settings, in one JSON file under the zoo cache."""

    def __init__(self, teacher: str, dtype: str, problem_set: ProblemSet, settings: dict):
        self.key = {"teacher": teacher, "dtype": dtype, "dataset": problem_set.label, "md5": problem_set.md5,
                    **settings}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_root() / "evalplus" / "teacher" / f"{digest}.json"
        self.outcomes: dict[str, bool] = {}
        if self.path.is_file():
            self.outcomes = json.loads(self.path.read_text())["outcomes"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": self.key, "outcomes": self.outcomes}, indent=1))
        os.replace(tmp, self.path)


def teacher_outcomes(model, tokenizer, problem_set: ProblemSet, task_ids: list[str], teacher: str, dtype: str,
                     prompt_style: str = "auto", max_new_tokens: int = 512, batch_size: int = 8,
                     limits: Limits = Limits(), parallel: int | None = None, progress: bool = True) -> dict[str, bool]:
    """task id -> did the teacher pass, for ``task_ids``; tasks not yet in the cache are evaluated now
    (under ``teacher_view``: with a student model this is the exact teacher, no second copy)."""
    settings = {"prompt_style": resolve_style(tokenizer, prompt_style), "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "min_time_limit": limits.min_time_limit,
                "gt_time_limit_factor": limits.gt_time_limit_factor}
    cache = TeacherCache(teacher, dtype, problem_set, settings)
    missing = [t for t in task_ids if t not in cache.outcomes]
    if missing:
        log.info("evaluating the teacher on %d task(s) of %s (cached in %s)", len(missing), problem_set.label,
                 cache.path)
        with teacher_view(model):
            result = evaluate(model, tokenizer, subset="teacher", problem_set=problem_set, task_ids=missing,
                              prompt_style=prompt_style, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              limits=limits, parallel=parallel, progress=progress)
        cache.outcomes.update(result.outcomes())
        cache.save()
    return {t: cache.outcomes[t] for t in task_ids}


def teacher_solved(model, tokenizer, problem_set: ProblemSet, n: int, teacher: str, dtype: str,
                   **settings) -> list[str]:
    """The first ``n`` tasks (dataset order) that the teacher passes.

    A small teacher may solve none of the first ten tasks, which makes a first-N smoke set vacuous:
    on this subset the teacher scores n/n, so a student regression is visible. The teacher is
    evaluated chunk by chunk in dataset order until n are found (each outcome cached).
    """
    ids = list(problem_set.problems)
    chunk = max(2 * n, 2 * settings.get("batch_size", 8))
    solved: list[str] = []
    for start in range(0, len(ids), chunk):
        outcomes = teacher_outcomes(model, tokenizer, problem_set, ids[start:start + chunk], teacher, dtype,
                                    **settings)
        solved += [t for t, ok in outcomes.items() if ok]
        if len(solved) >= n:
            return solved[:n]
    if not solved:
        raise ZooError(f"the teacher {teacher!r} passes none of the {len(ids)} tasks of {problem_set.label}; "
                       f"a teacher-solved subset needs a teacher that solves at least one")
    log.warning("the teacher passes only %d task(s) of %s; the %s:%d subset has %d", len(solved),
                problem_set.label, TEACHER_SOLVED, n, len(solved))
    return solved
