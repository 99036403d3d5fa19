"""Sanitize generated code with evalplus and score it in a sandbox (source 000, section 3.1).

Sanitizing (tree-sitter parsing: keep the imports and the definitions the entry point reaches) is
pure parsing and runs here. Everything that executes code runs in ``sandbox_worker.py``: a fresh
interpreter that imports only evalplus, where each check is a child process under evalplus's
``reliability_guard`` and time limits (a solution that loops forever is killed at its limit; one that
calls ``os.system`` finds it disabled; both count as failures).

evalplus says its guard is not a security sandbox, so the worker itself is contained: it starts with a
scrubbed environment (nothing of the parent's), in a throw-away working directory, under file-size,
open-file and process limits, and — where bubblewrap (``bwrap``, Debian's ``bubblewrap``) works — in
its own network namespace (no network at all, and not the host's loopback) with every file system
read-only but that directory. Where bwrap is missing or the kernel refuses namespaces, a loud warning
says generated code runs uncontained (``ZOO_REQUIRE_SANDBOX=1`` makes that an error). The canonical
solutions of evalplus's ground truth are trusted code: they run once, uncontained, into evalplus's cache.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..core.errors import ZooError
from ..core.models import cache_root
from .problems import EVALPLUS_DATASETS, Problem, ProblemSet

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("sandbox_worker.py")
#: what a solution's process may use: bytes per written file, open files, processes beyond the user's
#: current ones (the process limit counts every process of the user); evalplus adds a memory limit
RLIMITS = {"RLIMIT_FSIZE": 16 << 20, "RLIMIT_NOFILE": 256}
EXTRA_PROCESSES = 256


@functools.cache
def bwrap_problem() -> str | None:
    """None if bubblewrap can contain a process here, else why not."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (Debian: apt-get install bubblewrap)"
    probe = subprocess.run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--unshare-net", "--unshare-pid",
                            "--die-with-parent", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"bwrap cannot create namespaces here: {probe.stderr.strip()[:200]}"
    return None


def contained(argv: list[str], workdir: str, env: dict[str, str]) -> list[str]:
    """``argv`` run in the sandbox described in the module docstring (or, without bwrap, as it is, after
    a loud warning)."""
    problem = bwrap_problem()
    if problem is not None:
        if os.environ.get("ZOO_REQUIRE_SANDBOX") == "1":
            raise ZooError(f"no sandbox for generated code: {problem}")
        log.warning("WARNING: generated code runs WITHOUT a sandbox (%s): it can reach the network and write "
                    "files; only evalplus's guard and a scrubbed environment stand in its way", problem)
        return argv
    wrap = [shutil.which("bwrap"), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--bind", workdir, workdir, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--new-session", "--clearenv", "--chdir", workdir]
    for key, value in env.items():
        wrap += ["--setenv", key, value]
    return [*wrap, *argv]


def _resource_limits() -> dict[str, int]:
    uid = os.getuid()
    running = sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owner(p) == uid)
    return {**RLIMITS, "RLIMIT_NPROC": running + EXTRA_PROCESSES}


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:  # the process ended meanwhile
        return None


def _limiter(limits: dict[str, int]):
    def apply():  # in the worker's process before it runs anything; its children inherit the limits
        import resource

        for name, value in limits.items():
            resource.setrlimit(getattr(resource, name), (value, value))
    return apply
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
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="zoo-score-") as tmp:
        # nothing of the parent's environment: only what Python and evalplus need, pointing into tmp
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "CUDA_VISIBLE_DEVICES": "",
               # evalplus reads exactly the file the problems came from; its ground truth is cached in the
               # zoo cache (computed there by a trusted run first, read-only to the contained one)
               EVALPLUS_DATASETS[problem_set.dataset][2]: problem_set.path, "XDG_CACHE_HOME": str(cache_root())}
        job_path, log_path = Path(tmp) / "job.json", Path(tmp) / "worker.log"
        if problem_set.tests == "plus":
            _run_worker([sys.executable, str(WORKER), "--groundtruth", str(job_path)], {**job, "tasks": []},
                        job_path, log_path, env, tmp, lambda row: None)
        bar = tqdm(total=len(tasks), desc="scoring", unit="task", disable=not progress)

        def collect(row):
            results[row.pop("task_id")] = row
            bar.update(1)

        with bar:
            code = _run_worker(contained([sys.executable, str(WORKER), str(job_path)], tmp, env), job,
                               job_path, log_path, env, tmp, collect, limits=True)
        if code != 0 or len(results) != len(tasks):
            tail = "\n".join(log_path.read_text().strip().splitlines()[-15:])
            raise ZooError(f"the evalplus scoring process failed (exit code {code}, "
                           f"{len(results)}/{len(tasks)} tasks scored):\n{tail}")
    return results


def _run_worker(argv, job, job_path, log_path, env, cwd, on_row, limits: bool = False) -> int:
    """Run the scoring worker on ``job``; each JSON line it prints goes to ``on_row``. Its exit code."""
    job_path.write_text(json.dumps(job))
    with open(log_path, "a") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env, text=True, cwd=cwd,
                                preexec_fn=_limiter(_resource_limits()) if limits else None)
        for line in proc.stdout:
            on_row(json.loads(line))
        return proc.wait()
