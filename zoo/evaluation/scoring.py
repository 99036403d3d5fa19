"""Sanitize generated code with evalplus and score it in evalplus's sandbox (source 000, section 3.1).

Sanitizing (tree-sitter parsing: keep the imports and the definitions the entry point reaches) is
pure parsing and runs here. Everything that executes code, the canonical solutions included, runs in
``sandbox_worker.py``: a fresh interpreter that imports only evalplus, where each check is a child
process under evalplus's ``reliability_guard`` and time limits. A solution that loops forever is
killed at its time limit; one that calls ``os.system`` finds it disabled; both count as failures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..core.errors import ZooError
from ..core.models import cache_root
from .problems import EVALPLUS_DATASETS, Problem, ProblemSet

WORKER = Path(__file__).with_name("sandbox_worker.py")
#: time limit of one base-tests check (all of a task's asserts): evalplus's 1 s floor times its
#: factor of 4 for the ground truth's run time, which the original tests do not record
BASE_TIME_LIMIT_S = 4.0


@dataclass(frozen=True)
class Limits:
    """evalplus's time limits: per test input max(min_time_limit, factor * canonical run time)."""

    min_time_limit: float = 1.0
    gt_time_limit_factor: float = 4.0
    base_time_limit: float = BASE_TIME_LIMIT_S


def sanitize_solution(problem: Problem, generation: str, style: str) -> str:
    """The program evalplus scores: the completion appended to the prompt (base models) or the chat
    answer alone, reduced by ``evalplus.sanitize`` to the code the entry point needs."""
    from evalplus.sanitize import sanitize

    code = problem.prompt + generation if style == "completion" else generation
    return sanitize(code, entrypoint=problem.entry_point)


def default_parallel() -> int:
    return max(1, (os.cpu_count() or 2) // 2)  # evalplus's default


def score(problem_set: ProblemSet, solutions: dict[str, str], limits: Limits = Limits(),
          parallel: int | None = None, progress: bool = True) -> dict[str, dict]:
    """task id -> ``{"base_status", "plus_status"}`` (``pass``/``fail``/``timeout``; plus is None
    for base tests) for each solution, from the sandboxed worker process."""
    if not solutions:
        return {}
    tasks = []
    for task_id, solution in solutions.items():
        problem = problem_set.problems[task_id]
        task = {"task_id": task_id, "solution": solution}
        if problem_set.tests == "base":
            task.update(prompt=problem.prompt, test=problem.test, entry_point=problem.entry_point)
        tasks.append(task)
    job = {"tests": problem_set.tests, "dataset": problem_set.dataset, "tasks": tasks,
           "parallel": parallel or default_parallel(), "min_time_limit": limits.min_time_limit,
           "gt_time_limit_factor": limits.gt_time_limit_factor, "base_time_limit": limits.base_time_limit}
    env = dict(os.environ)
    # evalplus reads exactly the file the problems came from, and caches its ground truth in the zoo cache
    env[EVALPLUS_DATASETS[problem_set.dataset][2]] = problem_set.path
    env["XDG_CACHE_HOME"] = str(cache_root())
    env["CUDA_VISIBLE_DEVICES"] = ""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="zoo-score-") as tmp:
        job_path, log_path = Path(tmp) / "job.json", Path(tmp) / "worker.log"
        job_path.write_text(json.dumps(job))
        with open(log_path, "w") as log, tqdm(total=len(tasks), desc="scoring", unit="task",
                                              disable=not progress) as bar:
            proc = subprocess.Popen([sys.executable, str(WORKER), str(job_path)], stdout=subprocess.PIPE,
                                    stderr=log, env=env, text=True, cwd=tmp)
            for line in proc.stdout:
                row = json.loads(line)
                results[row.pop("task_id")] = row
                bar.update(1)
            proc.wait()
        if proc.returncode != 0 or len(results) != len(tasks):
            tail = "\n".join(log_path.read_text().strip().splitlines()[-15:])
            raise ZooError(f"the evalplus scoring process failed (exit code {proc.returncode}, "
                           f"{len(results)}/{len(tasks)} tasks scored):\n{tail}")
    return results
