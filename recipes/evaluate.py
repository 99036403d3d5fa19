"""``zoo eval`` and ``zoo compare``: greedy pass@1 on HumanEval+/MBPP+ and paired McNemar tests
(source 000, section 3: EvalPlus pass@1 on the HE10/MBPP20 smoke sets gates expensive runs; source 001,
phases 11-14: paired per-task comparison with the exact McNemar test). The machinery is
``zoo.evaluation``; this file is the commands.

    zoo eval --model smollm2-135m-instruct --dataset humaneval --subset HE10
    zoo eval --recipe configs/recipes/fisher_svd_repair.yaml --repair_state runs/fisher_svd_repair/repair_state.safetensors
    zoo compare runs/eval/teacher.json runs/eval/student.json
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path


from zoo.core.errors import ZooError, check_choice
from zoo.core.models import DEFAULT_TEACHER, load_causal_lm
from zoo.core.surgery import teacher_view
from zoo.evaluation import (PROMPT_STYLES, EvalResult, Limits, compare, evaluate, load_problems, load_result,
                            parse_teacher_solved, samples_path, select, teacher_solved)

from .recipe import load_recipe

log = logging.getLogger("zoo.eval")
VIEWS = ("student", "teacher")


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def eval_model(
    model: str | None = None,
    dataset: str = "humaneval",
    subset: str = "HE10",
    recipe: str | None = None,
    repair_state: str | None = None,
    overrides: list[str] = [],
    view: str = "student",
    dtype: str | None = None,
    device: str = "auto",
    prompt_style: str = "auto",
    max_new_tokens: int = 512,
    batch_size: int = 8,
    parallel: int | None = None,
    min_time_limit: float = 1.0,
    gt_time_limit_factor: float = 4.0,
    output: str | None = None,
) -> EvalResult:
    """Greedy pass@1 of a teacher, or of a student rebuilt from a recipe and a repair state.

    Args:
        model: the teacher: embedded alias, .gguf file, local directory or hub id (default
            smollm2-135m-instruct; with ``recipe``: overrides the recipe's teacher).
        dataset: ``humaneval`` (HumanEval+; offline: HumanEval with its base tests) or ``mbpp`` (MBPP+).
        subset: ``full``, ``HE10``, ``MBPP20``, ``first:N``, ``teacher-solved:N`` (the first N tasks the
            teacher passes), or comma-separated task ids (``HumanEval/0,HumanEval/7`` or ``0,7``).
        recipe: a recipe YAML (as for ``zoo fit``): evaluate its student.
        repair_state: the repair state (safetensors) loaded into the recipe's student.
        overrides: extra recipe options, e.g. ``['--model.init_args.parts.rank', '32']``.
        view: with ``recipe``: ``student`` (the replacements) or ``teacher`` (the originals).
        dtype: weight dtype (float32, bfloat16, float16); default float32, or the recipe's.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``, ...
        prompt_style: ``auto`` (chat template if the tokenizer has one), ``chat`` or ``completion``.
        max_new_tokens: generation budget per task.
        batch_size: prompts generated together (results can differ by batch size in the last bits).
        parallel: sandboxed test processes at once (default: half the CPU cores, as evalplus).
        min_time_limit: evalplus's floor on a test's time limit, in seconds.
        gt_time_limit_factor: evalplus's time limit as a multiple of the canonical solution's time.
        output: results JSON (default: runs/eval/<model>-<dataset>-<subset>.json). Until it is written,
            finished generations are kept in ``<output>.partial.jsonl``: an interrupted run, rerun with the
            same command, resumes from them.
    """
    check_choice("view", view, VIEWS)
    if repair_state and not recipe:
        raise ZooError("--repair_state needs --recipe (the recipe that built the student it belongs to)")
    if view == "teacher" and not recipe:
        raise ZooError("--view teacher needs --recipe; to evaluate a plain teacher give --model alone")
    check_choice("prompt style", prompt_style, PROMPT_STYLES)
    # bad subsets fail here, before minutes of model loading
    problem_set = load_problems(dataset)
    n_solved = parse_teacher_solved(subset)
    task_ids = None if n_solved else select(problem_set, subset)
    device = _device(device)
    lm, tokenizer, teacher, dtype, name = load_subject(model, recipe, repair_state, overrides, dtype, device,
                                                       view)
    limits = Limits(min_time_limit, gt_time_limit_factor)
    settings = dict(prompt_style=prompt_style, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    limits=limits, parallel=parallel)
    if n_solved:
        task_ids = teacher_solved(lm, tokenizer, problem_set, n_solved, teacher, dtype, **settings)
    info = {"name": name, "source": teacher, "dtype": dtype, "recipe": recipe, "repair_state": repair_state,
            "view": view if recipe else "teacher", "overrides": list(overrides)}
    path = Path(output or default_output(name, dataset, subset))
    journal = path.with_name(path.name + ".partial.jsonl")  # an interrupted run resumes from it
    with teacher_view(lm) if view == "teacher" else contextlib.nullcontext():
        result = evaluate(lm, tokenizer, subset=subset, problem_set=problem_set, task_ids=task_ids,
                          model_info=info, journal=journal, **settings)
    result.save(path)
    samples = result.save_samples(samples_path(path))
    journal.unlink(missing_ok=True)
    print(result.summary())
    print(f"generation {result.timing['generate_s']:.0f} s, scoring {result.timing['score_s']:.0f} s; wrote {path} "
          f"and {samples} (evalplus.evaluate --samples)")
    return result


def load_subject(model: str | None, recipe: str | None, repair_state: str | None, overrides: list[str],
                 dtype: str | None, device: str, view: str = "student"):
    """(model, tokenizer, teacher source, dtype, name) of what an evaluation command measures: a teacher
    (``model`` alone) or the student of ``recipe`` with ``repair_state`` loaded, on ``device``.

    Shared by ``zoo eval``, ``zoo lm-eval`` and ``zoo ppl``: one model in memory, the teacher of a student
    being the same object under ``teacher_view``.
    """
    if repair_state and not recipe:
        raise ZooError("--repair_state needs --recipe (the recipe that built the student it belongs to)")
    if recipe:
        extra = list(overrides)
        if model:
            extra += ["--model.init_args.teacher", model]
        if dtype:
            extra += ["--model.init_args.dtype", dtype]
        module = load_recipe(recipe, extra, repair_state, device=device).module
        lm, tokenizer, teacher, dtype = module.model, module.tokenizer, module.teacher, module.dtype_name
        name = Path(recipe).stem + (f"+{Path(repair_state).stem}" if repair_state else "") + f":{view}"
    else:
        teacher, dtype = model or DEFAULT_TEACHER, dtype or "float32"
        lm, tokenizer = load_causal_lm(teacher, dtype)
        name = teacher
    lm.to(device)
    return lm, tokenizer, teacher, dtype, name


def default_output(name: str, dataset: str, subset: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{name}-{dataset}-{subset}").strip("_")
    return Path("runs") / "eval" / f"{slug[:120]}.json"


def compare_results(a: str, b: str, metric: str = "acc") -> None:
    """Paired comparison of two ``zoo eval`` results on the same dataset, or of two lm-eval runs on the same
    examples (``results_<time>.json`` with its ``--log_samples`` files, or one ``samples_<task>_<time>.jsonl``):
    the 2x2 table and the exact two-sided McNemar p-value (binomial test on the items only one of them passes).

    Args:
        a: results file of model A.
        b: results file of model B.
        metric: for lm-eval files, the per-sample 0/1 metric to pair (acc, acc_norm, exact_match, ...).
    """
    from zoo.evaluation.lm_harness import is_lm_eval_file, lm_eval_samples

    def load(path: str) -> EvalResult:
        return lm_eval_samples(path, metric) if is_lm_eval_file(path) else load_result(path)

    result_a, result_b = load(a), load(b)
    paired = compare(result_a, result_b)
    for path, result in ((a, result_a), (b, result_b)):
        if len(paired.task_ids) < result.n_tasks:
            print(f"note: {path} has {result.n_tasks - len(paired.task_ids)} task(s) the other lacks; "
                  "they are left out of the pairing")
    print(paired.table(a, b))
    return paired
