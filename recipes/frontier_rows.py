"""The frontier's records and rows (``zoo frontier``, issues 16, 25 and 27): an item's record (``item.json``),
name and recipe hash; one row per run of an item (a (method, value) pair under one seed) from what its stages
recorded, and one row per (method, value) over its seeds: the mean of every figure and, for the figures a seed
study compares, the spread (``<key>_std``: the sample standard deviation over the seeds that have the figure,
n - 1 in the denominator; None under one seed), with the per-seed figures kept (``per_seed``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from zoo.core.cache import cache_key

RESULT = "item.json"  #: an item's record in its run directory

#: figures averaged over seeds
MEAN_KEYS = ("kl_before", "kl_after", "ppl_before", "ppl_after", "teacher_ppl", "ppl_x_teacher_before",
             "ppl_x_teacher_after", "ppl_code_ratio", "ppl_prose_ratio", "prose_ppl_before", "prose_ppl_after",
             "teacher_prose_ppl", "prose_x_teacher_before", "prose_x_teacher_after", "hologram_kl_before",
             "hologram_kl_after", "mc_acc_before", "mc_acc_after", "mc_acc_teacher", "repair_steps",
             "repair_minutes", "decode_speedup", "decode_tokens_per_s")
#: figures whose spread over seeds each row carries (``<key>_std``)
SPREAD_KEYS = ("kl_before", "kl_after", "ppl_x_teacher_before", "ppl_x_teacher_after", "ppl_code_ratio",
               "ppl_prose_ratio", "prose_x_teacher_before", "prose_x_teacher_after", "hologram_kl_before",
               "hologram_kl_after", "mc_acc_before", "mc_acc_after", "repair_steps")


def heldout(metrics: dict) -> dict | None:
    """(heldout KL, ppl, teacher ppl) of a ``zoo validate`` run's ``metrics_validate.json`` (parsed)."""
    final = metrics.get("final", {})
    if "heldout_kl" not in final:
        return None
    return {"kl": final["heldout_kl"], "ppl": final.get("heldout_ppl"), "teacher_ppl": final.get("heldout_ppl_teacher")}


def built_summary(run_dir: Path) -> dict:
    """The unrepaired student's summary as its validate built it (``ranks/<type>/<stat>`` and
    ``low_rank_parameters`` from ``FisherSVD.report``; bytes and bits per weight from ``size_report``)."""
    path = run_dir / "before" / "metrics_validate.json"
    return json.loads(path.read_text()).get("summary", {}) if path.is_file() else {}


def config_sha256(config: str) -> str | None:
    """The recipe as parsed, hashed: an edited value runs the item again, an edited comment or layout does not
    (None where the file cannot be read or parsed: the item fails on it anyway)."""
    try:
        parsed = yaml.safe_load(Path(config).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cache_key(recipe=parsed)


def item_name(method: str, value: float, seed: int = 0) -> str:
    """``<method>@<value>``, and ``<method>@<value>#s<seed>`` for a seed other than 0."""
    return f"{method}@{value:g}" + (f"#s{seed}" if seed else "")


def finished_with(stage: dict, settings: dict) -> bool:
    """Whether a recorded stage finished (exit 0) under the same ``settings``: what keeps it."""
    return stage.get("exit_code") == 0 and all(stage.get(k) == v for k, v in settings.items())


def stage_elsewhere(out: Path, name: str, settings: dict) -> dict | None:
    """A finished stage ``name`` of any item recorded under ``out`` with the same ``settings``, marked
    ``kept_from`` that item's directory; None if there is none."""
    for path in sorted(out.glob(f"*/{RESULT}")):
        try:
            stage = json.loads(path.read_text()).get("stages", {}).get(name, {})
        except (OSError, ValueError):  # a record being written or a broken one: measure again
            continue
        if finished_with(stage, settings):
            return {**stage, "kept_from": stage.get("kept_from", path.parent.name)}
    return None


def count_parameters(config: str, overrides: list[str]) -> dict:
    """Parameters of the student and of its teacher, from shapes (the teacher on the meta device), with the
    teacher's source and dtype (what its own figures depend on)."""
    from zoo.core import plan as zp
    from zoo.core.models import parse_dtype

    from .recipe import load_recipe

    recipe = load_recipe(config, overrides, build=False, meta=True)
    module = recipe.module
    resolved = module.resolve_targets()
    plan = zp.plan_student(module.model, module.parts, resolved, parse_dtype(module.dtype_name))
    return {"parameters": plan.student_parameters, "teacher_parameters": plan.model_parameters,
            "replaced_parameters": plan.original, "targets": len(plan.targets),
            "teacher": recipe.config["model"]["init_args"]["teacher"], "dtype": module.dtype_name,
            "ranks": shape_ranks(module.model, module.parts, resolved)}


def shape_ranks(model, parts, resolved: list[list[str]]) -> dict[str, float]:
    """The mean rank per layer type that the parts' shapes give (a ``sigma`` of r entries: a rank-r map), as
    ``ranks/<type>/mean``; under a planned allocation the built student's own ranks replace these (they are
    the uniform rank of the budget, see ``Technique.footprint_note``)."""
    by_type: dict[str, list[int]] = {}
    for part, names in zip(parts, resolved):
        for name in names:
            sigma = part.footprint(name, model.get_submodule(name)).get("sigma")
            if sigma is not None:
                by_type.setdefault(name.rsplit(".", 1)[-1], []).append(sigma.shape[0])
    return {f"ranks/{t}/mean": sum(rs) / len(rs) for t, rs in sorted(by_type.items())}


def item_row(names: dict, record: dict, status: str, built: dict, ranks: dict) -> dict:
    """The row of one run: ``names`` (item, method, label, setting, value, seed) and its figures from the
    stages in ``record`` (``item.json``) and the ``built`` student's summary."""
    stages, count = record.get("stages", {}), record.get("count") or {}
    before, after = stages.get("before", {}), stages.get("after", {})
    teacher_ppl = before.get("teacher_ppl") or after.get("teacher_ppl")
    ratio_of = lambda ppl: ppl / teacher_ppl if ppl is not None and teacher_ppl else None  # noqa: E731
    teacher_params, parameters = count.get("teacher_parameters"), count.get("parameters")
    # the built maps' size: under a planned allocation the shapes' count is the uniform rank's
    exact = "low_rank_parameters" in built and count.get("replaced_parameters") is not None \
        and count.get("targets") == built.get("low_rank_maps")  # every target one of those maps
    if exact:
        parameters = teacher_params - count["replaced_parameters"] + built["low_rank_parameters"]
    prose_before, prose_after = stages.get("prose_before", {}), stages.get("prose_after", {})
    teacher_prose = prose_before.get("teacher_ppl") or prose_after.get("teacher_ppl")
    prose_of = lambda ppl: ppl / teacher_prose if ppl is not None and teacher_prose else None  # noqa: E731
    repair = stages.get("repair", {})
    curve = repair.get("curve") or []
    seconds = curve[-1].get("wall_s") if curve else repair.get("seconds")
    repaired = "kl" in after
    # the student as shipped: after repair where it was repaired
    code_ratio, prose_ratio = (ratio_of(after.get("ppl")), prose_of(prose_after.get("ppl"))) if repaired else \
        (ratio_of(before.get("ppl")), prose_of(prose_before.get("ppl")))
    speed = stages.get("speed", {})
    return names | {
        "ratio": names["value"] if names["setting"] == "rank" else None,
        "status": status, "bits_per_weight": built.get("bits_per_weight"), "bytes": built.get("student_bytes"),
        "teacher_bytes": built.get("teacher_bytes"),
        "bytes_fraction": built["student_bytes"] / built["teacher_bytes"] if built.get("teacher_bytes") else None,
        "ppl_code_ratio": code_ratio, "ppl_prose_ratio": prose_ratio,
        "repair_minutes": seconds / 60 if seconds is not None else None,
        "decode_speedup": speed.get("decode_speedup"), "decode_tokens_per_s": speed.get("decode_tokens_per_s"),
        "decode_dtype": speed.get("dtype"),
        "prose_ppl_before": prose_before.get("ppl"), "prose_ppl_after": prose_after.get("ppl"),
        "teacher_prose_ppl": teacher_prose, "prose_x_teacher_before": prose_of(prose_before.get("ppl")),
        "prose_x_teacher_after": prose_of(prose_after.get("ppl")),
        "hologram_kl_before": stages.get("hologram_before", {}).get("kl"),
        "hologram_kl_after": stages.get("hologram_after", {}).get("kl"),
        "mc_acc_before": stages.get("mc_before", {}).get("acc"), "mc_acc_after": stages.get("mc_after", {}).get("acc"),
        "mc_acc_teacher": stages.get("mc_teacher", {}).get("acc"),
        "parameters": parameters, "teacher_parameters": teacher_params, "parameters_built": exact,
        "parameter_fraction": parameters / teacher_params if teacher_params and parameters else None,
        "kl_before": before.get("kl"), "kl_after": after.get("kl"),
        "ppl_before": before.get("ppl"), "ppl_after": after.get("ppl"), "teacher_ppl": teacher_ppl,
        "ppl_x_teacher_before": ratio_of(before.get("ppl")), "ppl_x_teacher_after": ratio_of(after.get("ppl")),
        # the repaired student's step: the best validated or a gate's where the last step was worse
        "repair_steps": repair.get("steps"), "repair_state_step": repair.get("state_step"), "ranks": ranks,
        "seconds": {k: v.get("seconds") for k, v in stages.items()},
        "cuda_peak_gib": {k: v.get("cuda_peak_gib") for k, v in stages.items()}}


def spread(values: list[float]) -> float | None:
    """The sample standard deviation (n - 1); None under fewer than two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def counted(runs: list[dict]) -> list[dict]:
    """The runs a row's figures are over: the finished ones, or every run while none finished (a seed stopped
    between its stages would otherwise pair one set of seeds' before-figures with another's after)."""
    return [r for r in runs if r.get("status", "ok") == "ok"] or runs


def seed_rows(rows: list[dict]) -> list[dict]:
    """One row per (method, value) from its runs' rows (one per seed, in seed order): the first finished
    run's row (its bytes, parameters, ranks, seconds), each ``MEAN_KEYS`` figure the mean over the finished
    seeds that have it (over every seed while none finished), ``<key>_std`` its spread, ``seeds`` the seeds
    whose run finished, ``per_seed`` each run's figures, unfinished ones too."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["value"]), []).append(r)
    out = []
    for runs in groups.values():
        finished = [r for r in runs if r["status"] == "ok"]
        base = dict(finished[0] if finished else runs[0])
        base["item"] = base["item"].split("#")[0]
        failed = [r for r in runs if r["status"] not in ("ok", "not run")]
        if failed:
            base["status"] = failed[0]["status"] if len(runs) == 1 else f"seed {failed[0]['seed']}: {failed[0]['status']}"
        over = counted(runs)
        for key in MEAN_KEYS:
            values = [r[key] for r in over if r.get(key) is not None]
            base[key] = sum(values) / len(values) if values else None
            if key in SPREAD_KEYS:
                base[f"{key}_std"] = spread(values)
        base["seeds"] = [r["seed"] for r in finished]
        # a step is no figure to average: the row has one where it is over one run, each seed's in per_seed
        base["repair_state_step"] = over[0].get("repair_state_step") if len(over) == 1 else None
        base["per_seed"] = [{"seed": r["seed"], "item": r["item"], "status": r["status"]}
                            | {k: r.get(k) for k in (*MEAN_KEYS, "repair_state_step")} for r in runs]
        base.pop("seed", None)
        out.append(base)
    return out
