"""lm-eval-harness (EleutherAI, ``lm-eval`` 0.4.x) on an in-memory model: a teacher, or a zoo student in
either view, wrapped in lm-eval's own ``HFLM``, evaluated by ``lm_eval.simple_evaluate`` and saved by its
``EvaluationTracker`` exactly as ``lm_eval --output_path`` saves them (``results_<time>.json`` and, with
``log_samples``, ``samples_<task>_<time>.jsonl`` under ``<output_path>/<model name>/``).

Nothing is re-implemented: prompts, metrics, seeds (lm-eval's defaults 0/1234/1234/1234) and bootstrap
errors are lm-eval's. The zoo adds task checking before the model is touched (an unknown name is one line
naming the closest tasks), local task YAML files as task names, and a one-line summary per task.
Per-sample outcomes (``--log_samples``) are read back by ``lm_eval_samples`` as an ``EvalResult`` so that
``zoo compare`` pairs two models example by example with the exact McNemar test.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ..core.errors import ZooError, choices_hint
from .results import EvalResult, TaskResult

#: lm-eval metrics that are a per-sample 0/1 outcome (what a paired test can use)
BINARY_METRICS = ("acc", "acc_norm", "exact_match", "pass@1", "mc1")


def split_tasks(tasks: list[str] | str, include_path: list[str] | str | None) -> tuple[list[str], list[str]]:
    """(task names, include paths): a task given as a YAML file becomes the name its ``task:`` key declares,
    its folder an include path, as lm-eval's ``--include_path`` would take it."""
    import yaml

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ZooError("no task given; name lm-eval tasks (e.g. arc_easy,piqa) or local task YAML files")
    paths = [str(p) for p in (include_path.split(",") if isinstance(include_path, str) else include_path or [])]
    for path in paths:
        if not Path(path).exists():
            raise ZooError(f"include path {path!r} does not exist")
    out = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            path = Path(name)
            if not path.is_file():
                raise ZooError(f"task file {name!r} does not exist")
            spec = yaml.safe_load(path.read_text()) or {}
            if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
                raise ZooError(f"task file {name!r} has no `task:` name (an lm-eval task YAML declares one)")
            out.append(spec["task"])
            if str(path.parent) not in paths:
                paths.append(str(path.parent))
        else:
            out.append(name)
    return out, paths


def task_manager(names: list[str], include_path: list[str]):
    """lm-eval's ``TaskManager`` knowing ``names``; raises a ZooError naming the closest tasks otherwise.

    Local tasks are indexed first on their own (a second, not the ~10 s of lm-eval's 14k built-in YAML
    files); the built-in index is built only when a name is not local.
    """
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = TaskManager(include_path=include_path or None)
    known = manager.all_tasks
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ZooError(f"unknown lm-eval task {unknown[0]!r}{choices_hint(unknown[0], known)} "
                       f"(list them all with: lm-eval ls tasks; or give a task YAML file / --include_path)")
    return manager


def hf_lm(model, tokenizer, batch_size: int = 1, max_length: int | None = None):
    """lm-eval's ``HFLM`` around an in-memory model: the same object, no copy (a student stays a student,
    and inside ``teacher_view`` it is the exact teacher)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def run_lm_eval(model, tokenizer, tasks: list[str], manager, *, model_name: str,
                num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 1,
                max_length: int | None = None, log_samples: bool = False, output_path: str | None = None,
                apply_chat_template: bool = False) -> tuple[dict, Path | None]:
    """(lm-eval's results dict, the results file written) of ``model`` on ``tasks`` (``manager``: from
    ``task_manager``, checked before the model was loaded)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            results = simple_evaluate(
                model=hf_lm(model, tokenizer, batch_size, max_length), tasks=tasks, task_manager=manager,
                num_fewshot=num_fewshot, limit=limit, log_samples=log_samples, evaluation_tracker=tracker,
                apply_chat_template=apply_chat_template,
                # only names the output folder and the results' config, as `--model_args pretrained=...` does
                model_args={"pretrained": re.sub(r"[,=\s]+", "_", model_name)})
    finally:
        model.train(was_training)
    if tracker is None:
        return results, None
    samples = results.pop("samples", None) if log_samples else None
    tracker.save_results_aggregated(results=results, samples=samples)
    if samples is not None:
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        results["samples"] = samples
    written = sorted(Path(tracker.output_path).glob(f"**/results_{tracker.date_id}.json"))
    return results, written[0] if written else None


def summary_lines(results: dict) -> list[str]:
    """One line per task: every metric with its standard error and the number of examples."""
    lines = []
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        parts = []
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr," in key or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            err = f" ± {stderr:.4f}" if isinstance(stderr, int | float) else ""
            parts.append(f"{metric} = {value:.4f}{err}" + (f" [{filt}]" if filt not in ("", "none") else ""))
        lines.append(f"{task}: " + ", ".join(parts) + (f" (n = {n})" if n is not None else ""))
    return lines


def flat_metrics(results: dict) -> dict[str, float]:
    """``lm_eval/<task>/<metric>`` -> value, for a logger."""
    return {f"lm_eval/{task}/{key.partition(',')[0]}": float(value)
            for task, metrics in results["results"].items() for key, value in metrics.items()
            if key != "alias" and isinstance(value, int | float)}


def is_lm_eval_file(path: str | Path) -> bool:
    """An lm-eval per-sample file (by its name), or an lm-eval results file (a JSON with "results" and
    "configs", which a ``zoo eval`` result never has)."""
    path = Path(path)
    if path.name.startswith("samples_") and path.suffix == ".jsonl":
        return True
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "results" in data and "configs" in data


def _samples_files(path: Path) -> list[Path]:
    if path.name.startswith("samples_"):
        return [path]
    stamp = path.stem.removeprefix("results_")
    files = sorted(path.parent.glob(f"samples_*_{stamp}.jsonl"))
    if not files:
        raise ZooError(f"{str(path)!r} has no per-sample file next to it (samples_<task>_{stamp}.jsonl); "
                       f"run lm-eval / zoo lm-eval with --log_samples for a paired comparison")
    return files


def lm_eval_samples(path: str | Path, metric: str = "acc") -> EvalResult:
    """An lm-eval per-sample file (``samples_<task>_<time>.jsonl``), or a results file whose per-sample files
    lie next to it, as an ``EvalResult``: one 0/1 outcome (``metric``) per example, the example's id being
    ``<task>/<doc_id>``. The "md5" identifies the examples (their lm-eval doc hashes), so two runs pair
    only on the same data."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"results file {str(path)!r} does not exist")
    tasks, hashes, names = [], [], []
    for file in _samples_files(path):
        task = re.sub(r"_\d{4}-\d\d-\d\dT[\d\-.]+$", "", file.stem.removeprefix("samples_"))
        names.append(task)
        for number, line in enumerate(file.read_text().splitlines(), 1):
            row = json.loads(line)
            if metric not in row:
                have = [m for m in row.get("metrics", []) if m in row] or [k for k in BINARY_METRICS if k in row]
                raise ZooError(f"{file}:{number} has no per-sample {metric!r}; use --metric with one of: "
                               f"{', '.join(have) or 'none (no per-sample metric)'}")
            value = float(row[metric])
            if value not in (0.0, 1.0):
                raise ZooError(f"{file}: metric {metric!r} is {value} for an example, not 0/1; a McNemar test "
                               f"needs a pass/fail metric (e.g. acc, acc_norm, exact_match)")
            task_id = f"{task}/{row['doc_id']}"
            hashes.append(f"{task_id}:{row.get('doc_hash', '')}")
            tasks.append(TaskResult(task_id, value == 1.0, "pass" if value else "fail", None,
                                    json.dumps(row.get("filtered_resps", ""))[:200], ""))
    order = sorted(range(len(tasks)), key=lambda i: hashes[i])
    digest = hashlib.md5("\n".join(hashes[i] for i in order).encode()).hexdigest()
    model = {"name": path.parent.name, "source": str(path)}
    dataset = {"key": "lm-eval", "name": f"lm-eval {'+'.join(names)}", "version": metric,
               "tests": "lm-eval", "path": str(path), "md5": digest}
    return EvalResult(dataset=dataset, subset="all", model=model, generation={"metric": metric}, tasks=tasks)


def dense_copy(model):
    """A plain HF model equal to ``model`` in its current view: every ``Replaced`` linear map becomes an
    ``nn.Linear`` whose weight (and bias) are the replacement's affine map, read off by applying it to the
    identity. What ``save_pretrained`` needs so that lm-eval's own CLI can load the student from disk."""
    import copy

    from torch import nn

    from ..core.surgery import replaced_modules, set_module

    dense = copy.deepcopy(model)
    for name, wrapper in replaced_modules(dense).items():
        if not isinstance(wrapper.original, nn.Linear):
            raise ZooError(f"{name} replaces a {type(wrapper.original).__name__}, not a linear map: this student "
                           f"has no dense Hugging Face form to save; evaluate it in memory with zoo lm-eval")
        module = wrapper.original if wrapper.use_original else wrapper.replacement
        original = wrapper.original
        if module is not original:
            param = original.weight
            eye = torch.eye(original.in_features, dtype=torch.float64, device=param.device)
            with torch.no_grad():
                out = module.double()(torch.cat([torch.zeros_like(eye[:1]), eye]))
            bias = out[0]
            linear = nn.Linear(original.in_features, original.out_features, bias=original.bias is not None
                               or bool(bias.abs().max() > 0), dtype=param.dtype, device=param.device)
            linear.weight.data.copy_((out[1:] - bias).T.to(param.dtype))
            if linear.bias is not None:
                linear.bias.data.copy_(bias.to(param.dtype))
            module = linear
        set_module(dense, name, module)
    return dense
