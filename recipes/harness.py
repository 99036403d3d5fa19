"""``zoo lm-eval``: lm-eval-harness tasks (EleutherAI ``lm-eval`` 0.4.x; the zero-shot suite of compression
papers: arc_easy, arc_challenge, hellaswag, piqa, winogrande, openbookqa) on a teacher, on a saved model
directory, or on a recipe's student rebuilt from its repair state, through lm-eval's ``HFLM`` wrapping the
model in memory (``zoo.evaluation.lm_harness``). ``--view teacher`` evaluates the originals inside the
student: one model in memory.

    zoo lm-eval --model smollm2-135m-instruct --tasks arc_easy,piqa
    zoo lm-eval --recipe configs/recipes/compress_svdllm.yaml --tasks my_task.yaml --log_samples true
    zoo compare runs/lm_eval/A/results_<time>.json runs/lm_eval/B/results_<time>.json   # paired, McNemar
"""
from __future__ import annotations

import contextlib

from lightning.pytorch.loggers import Logger

from zoo.core.errors import ZooError, check_choice
from zoo.core.surgery import teacher_view
from zoo.evaluation.lm_harness import (dense_copy, flat_metrics, run_lm_eval, split_tasks, summary_lines,
                                       task_manager)

from .evaluate import VIEWS, _device, load_subject
from .report import log_outputs


def lm_eval_model(
    tasks: str,
    model: str | None = None,
    recipe: str | None = None,
    repair_state: str | None = None,
    overrides: list[str] = [],
    view: str = "student",
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    dtype: str | None = None,
    device: str = "auto",
    output_dir: str = "runs/lm_eval",
    save_model: str | None = None,
    logger: Logger | None = None,
) -> dict:
    """lm-eval-harness tasks on a teacher, a model directory, or a recipe's student (lm-eval's own metrics).

    Args:
        tasks: comma-separated lm-eval task (or group) names, or local task YAML files (their folder becomes
            an include path), e.g. ``arc_easy,piqa`` or ``my_tasks/mc.yaml``.
        model: the teacher / model: embedded alias, .gguf file, local directory or hub id (default
            smollm2-135m-instruct; with ``recipe``: overrides the recipe's teacher).
        recipe: a recipe YAML (as for ``zoo fit``): evaluate its student.
        repair_state: the repair state (safetensors) loaded into the recipe's student.
        overrides: extra recipe options, e.g. ``['--model.init_args.parts.rank', '0.6']``.
        view: with ``recipe``: ``student`` (the replacements) or ``teacher`` (the originals).
        include_path: folders of extra task YAML files, comma-separated (lm-eval's ``--include_path``).
        num_fewshot: few-shot examples (default: each task's own, else 0).
        limit: at most this many examples per task (a fraction if < 1), as lm-eval's ``--limit``.
        batch_size: lm-eval's batch size (an int; results can differ by batch size in the last bits).
        max_length: lm-eval's maximum context (default: the model's).
        log_samples: also write lm-eval's per-sample file of each task (what ``zoo compare`` pairs).
        apply_chat_template: lm-eval's ``--apply_chat_template`` (off, as in the papers' zero-shot numbers).
        dtype: weight dtype (float32, bfloat16, float16); default float32, or the recipe's.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ...
        output_dir: lm-eval's ``--output_path``: results go to ``<output_dir>/<model name>/results_<time>.json``.
        save_model: also save the evaluated model (a student as dense linear maps) and its tokenizer with
            ``save_pretrained`` here, so that ``lm_eval --model hf --model_args pretrained=<dir>`` can rerun it.
        logger: a Lightning logger for the metrics (true: W&B offline in output_dir; null: none).
    """
    check_choice("view", view, VIEWS)
    if view == "teacher" and not recipe:
        raise ZooError("--view teacher needs --recipe; to evaluate a plain teacher give --model alone")
    names, include = split_tasks(tasks, include_path)
    manager = task_manager(names, include)  # an unknown task fails here, before the model is loaded
    lm, tokenizer, teacher, dtype, name = load_subject(model, recipe, repair_state, overrides, dtype, _device(device),
                                                       view)
    with teacher_view(lm) if view == "teacher" else contextlib.nullcontext():
        if save_model:
            dense_copy(lm).save_pretrained(save_model)
            tokenizer.save_pretrained(save_model)
            print(f"saved the evaluated model to {save_model}")
        results, path = run_lm_eval(lm, tokenizer, names, manager, model_name=name, num_fewshot=num_fewshot,
                                    limit=limit, batch_size=batch_size, max_length=max_length,
                                    log_samples=log_samples, output_path=output_dir,
                                    apply_chat_template=apply_chat_template)
    print(f"lm-eval {results.get('lm_eval_version', '')} on {name} ({dtype}):")
    for line in summary_lines(results):
        print("  " + line)
    print(f"wrote {path}" + (" and the per-sample files next to it" if log_samples else ""))
    log_outputs(logger, hyperparams={"name": name, "teacher": teacher, "dtype": dtype, "recipe": recipe,
                                     "repair_state": repair_state, "view": view if recipe else "teacher",
                                     "tasks": ",".join(names), "num_fewshot": num_fewshot, "limit": limit},
                metrics=flat_metrics(results))
    results["zoo"] = {"results_file": str(path) if path else None, "name": name}
    return results
