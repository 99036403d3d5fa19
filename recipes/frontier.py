"""``zoo frontier``: whole-model compression methods against parameter ratios (issue 16). Every item is a
(method, ratio) pair: a method is a recipe config plus overrides (``svd``, ``asvd``, ``fwsvd``, ``svdllm``,
the zoo's best pipeline), the ratio the fraction of each replaced map's parameters kept
(``--model.init_args.parts.rank <ratio>``). Each item runs in stages, each in its own process into
``OUTPUT_DIR/<method>@<ratio>/<stage>``:

- ``before``: ``zoo validate`` of the recipe: the unrepaired student is built (calibration, cached, and
  projection) and scored on the heldout split; its ``metrics_validate.json`` gives heldout KL and ppl (and
  the teacher's ppl). A validate, not a ``zoo fit --trainer.max_steps 0``: a fit that takes no step never
  reaches ``on_train_start``, so the gate's ``heldout_kl_before`` is not written, nor any validation.
- ``repair`` (only with ``repair_steps`` or ``repair_minutes``): ``zoo fit`` of the recipe with
  ``--trainer.max_steps`` (and ``--trainer.max_time``, Lightning's wall-clock limit); its repair state is the
  best validated one. With ``callbacks.RepairCurve`` in the recipe, the stage's entry holds its points
  (``curve``: step, wall seconds, heldout KL and ppl at train start and each validation).
- ``after``: ``zoo validate --ckpt_path <repair state>``: the repaired student scored exactly as ``before``.

Parameters are the built student's where every target is a low-rank map (``low_rank_parameters`` of
``FisherSVD.report``: exact under a rank allocation), else counted from shapes (``zoo.core.plan.plan_student``
on the teacher's architecture on the meta device, as ``zoo plan`` does); ``parameters_built`` says which.
Each stage's wall time (and, on a GPU, CUDA peak) is recorded. A finished item (``item.json`` complete, with
the same repair settings, or any repair when this invocation repairs none: a repaired item holds the
unrepaired numbers too) is not run again, nor a finished stage of an interrupted item; a failed item is a
row. Output: ``frontier.md``, ``frontier.json`` (with the command, commit and hardware)
and ``frontier.png`` (heldout ppl vs parameters, log y, a line per method, the teacher's ppl as a line).

    zoo frontier --config configs/commands/frontier.yaml
    zoo frontier --config configs/commands/frontier.yaml --only '[svdllm@0.8, zoo@0.8]' --repair_steps 100
"""
from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo.core.cache import atomic_write_text
from zoo.core.errors import ZooError

from .command import command_logger
from .report import fmt, log_outputs, markdown_table, row_table
from .series import Item, Series, check_configs, check_unique, run_streaming, zoo_args

DEFAULT_RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5]
RESULT = "item.json"
STAGES = ("before", "repair", "after")


@dataclass
class Method:
    """One compression method of the frontier: a recipe config and the overrides that make it this method.

    Args:
        name: the method's name (items are called ``<name>@<ratio>``).
        config: the recipe YAML (as for ``zoo fit --config``); its rank is set to each ratio.
        label: what the table and the chart call it (default: ``name``).
        overrides: extra recipe options, e.g. ``['--model.init_args.parts.weighting', 'asvd']``.
    """

    name: str
    config: str
    label: str = ""
    overrides: list[str] = field(default_factory=list)


def item_name(method: str, ratio: float) -> str:
    return f"{method}@{ratio:g}"


def max_time(minutes: float) -> str:
    """Lightning's ``max_time`` (``DD:HH:MM:SS``) of a number of minutes."""
    s = max(int(round(minutes * 60)), 1)
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def heldout(metrics: dict) -> dict | None:
    """(heldout KL, ppl, teacher ppl) of a ``zoo validate`` run's ``metrics_validate.json`` (parsed)."""
    final = metrics.get("final", {})
    if "heldout_kl" not in final:
        return None
    return {"kl": final["heldout_kl"], "ppl": final.get("heldout_ppl"), "teacher_ppl": final.get("heldout_ppl_teacher")}


def count_parameters(config: str, overrides: list[str]) -> dict:
    """Parameters of the student and of its teacher, from shapes (the teacher on the meta device)."""
    from zoo.core import plan as zp
    from zoo.core.models import parse_dtype

    from .command import load_recipe

    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
           "--trainer.precision", "32-true", "--trainer.logger", "false"]
    module, _, _ = load_recipe(config, [*overrides, *cpu], build=False, meta=True)
    resolved = module.resolve_targets()
    plan = zp.plan_student(module.model, module.parts, resolved, parse_dtype(module.dtype_name))
    return {"parameters": plan.student_parameters, "teacher_parameters": plan.model_parameters,
            "replaced_parameters": plan.original, "targets": len(plan.targets),
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


def built_summary(run_dir: Path) -> dict:
    """The unrepaired student's summary as its validate built it (``ranks/<type>/<stat>`` and
    ``low_rank_parameters`` from ``FisherSVD.report``)."""
    path = run_dir / "before" / "metrics_validate.json"
    return json.loads(path.read_text()).get("summary", {}) if path.is_file() else {}


#: the order of a decoder layer's maps, for the rank cell (other names follow, sorted)
LAYER_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rank_cell(ranks: dict[str, float]) -> str:
    """``q 230 · k 115 · ...``: the mean rank of each layer type in a decoder layer's order, named without
    ``_proj``."""
    means = {k.split("/")[1]: v for k, v in ranks.items() if k.endswith("/mean")}
    order = sorted(means, key=lambda t: (LAYER_ORDER.index(t) if t in LAYER_ORDER else len(LAYER_ORDER), t))
    return " · ".join(f"{t.removesuffix('_proj')} {means[t]:.0f}" for t in order) or "-"


def ppl_cell(ppl: float | None) -> str:
    """A perplexity: 2 decimals, or a whole number with separators from 1,000 (a ruined student's 18,298,298)."""
    return fmt(ppl, ",.0f" if ppl is not None and ppl >= 1000 else ".2f")


def one_line(exc: Exception) -> str:
    """The reason of a recipe that does not parse (jsonargparse's union error names it on a ``- `` line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    reasons = [line[2:] for line in lines if line.startswith("- ") and "NoneType" not in line]
    return (reasons[0] if reasons else lines[0] if lines else type(exc).__name__)[:160]


class Frontier(Series):
    title, noun = "frontier item", "item(s)"

    def __init__(self, methods: list[Method], ratios: list[float], overrides: list[str], repair_steps: int,
                 repair_minutes: float | None, output_dir: str, only: list[str] | None, rerun: bool, logger: bool):
        self.methods = {m.name: m for m in methods}
        self.ratios, self.overrides = list(ratios), list(overrides)
        self.repair = {"steps": repair_steps, "minutes": repair_minutes}
        self.pairs: dict[str, tuple[Method, float]] = {}
        items = []
        for m in methods:
            for r in ratios:
                name = item_name(m.name, r)
                self.pairs[name] = (m, r)
                items.append(Item(name, config=m.config,
                                  overrides=[*overrides, *m.overrides, "--model.init_args.parts.rank", f"{r:g}"]))
        super().__init__(items, output_dir, "frontier", only, rerun, logger)

    @property
    def repairs(self) -> bool:
        return self.repair["steps"] > 0 or self.repair["minutes"] is not None

    def record(self, run_dir: Path) -> dict:
        path = run_dir / RESULT
        return json.loads(path.read_text()) if path.is_file() else {}

    def record_of(self, item: Item, run_dir: Path) -> dict:
        """What an earlier run of ``item`` left, if it ran the same recipe (config and overrides), else {}."""
        record = self.record(run_dir)
        same = record.get("config") == item.config and record.get("overrides") == item.overrides
        return record if same else {}

    def done(self, item: Item, run_dir: Path) -> dict | None:
        record = self.record_of(item, run_dir)
        stages = record.get("stages", {})
        whole = all(stages.get(k, {}).get("full_heldout") for k in ("before", "after") if k in stages)
        # a repaired item also holds the unrepaired student's numbers: an invocation without repair keeps it
        same_repair = record.get("repair") == self.repair or not self.repairs
        return record if record.get("complete") and same_repair and whole else None

    def kept(self, item: Item, run_dir: Path) -> str:
        return f"finished earlier ({run_dir / RESULT})"

    def stage(self, name: str, subcommand: str, item: Item, run_dir: Path, overrides: list[str],
              record: dict) -> str | None:
        """Run one stage (a ``zoo validate`` or ``zoo fit`` into ``run_dir/name``), its seconds and numbers
        into ``record``; None, or why it failed."""
        stage_dir = run_dir / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        logger_name = f"frontier/{item.dir_name}/{name}" if self.logger and subcommand == "fit" else None
        if subcommand == "validate":  # the whole heldout split, whatever the recipe validates on while training
            overrides = [*overrides, "--trainer.limit_val_batches", "1.0"]
        args = zoo_args(subcommand, item.config, [*item.overrides, *overrides], stage_dir, logger_name)
        print(f"$ {shlex.join(['zoo', *args[3:]])}", flush=True)
        curve = stage_dir / "repair_curve.json"  # callbacks.RepairCurve's, if the recipe has it
        for left in (curve, stage_dir / "metrics.json", stage_dir / "metrics_validate.json"):
            left.unlink(missing_ok=True)  # an earlier attempt's files must not pass for this run's
        start = time.monotonic()
        code, last = run_streaming(args, stage_dir / f"{subcommand}.log")
        entry = {"seconds": round(time.monotonic() - start, 1), "exit_code": code}
        metrics = stage_dir / ("metrics_validate.json" if subcommand == "validate" else "metrics.json")
        written = json.loads(metrics.read_text()) if metrics.is_file() else {}
        entry["cuda_peak_gib"] = written.get("cuda_peak_gib")  # the stage's process's peak (None off CUDA)
        if subcommand == "validate":
            entry.update(heldout(written) or {}, full_heldout=True)
        else:
            fit = written
            summary, steps = fit.get("summary", {}), fit.get("global_step")
            # steps taken; the state kept is the best validated one (an earlier step, where it was better)
            entry.update(steps=steps, state_step=summary.get("repair_state_step", steps),
                         kl_gate_after=summary.get("heldout_kl_after"))
            if curve.is_file():
                entry["curve"] = json.loads(curve.read_text())["points"]
        record.setdefault("stages", {})[name] = entry
        if code != 0:
            return f"{name} failed (exit {code}): {last[:120]}"
        if subcommand == "validate" and "kl" not in entry:
            return f"{name} failed: no heldout metrics in {stage_dir / 'metrics_validate.json'}"
        return None

    def execute(self, item: Item, run_dir: Path) -> str:
        path = run_dir / RESULT
        old = {} if self.rerun else self.record_of(item, run_dir)
        method, ratio = self.pairs[item.name]
        record = {"method": method.name, "ratio": ratio, "config": item.config, "overrides": item.overrides,
                  "repair": self.repair, "complete": False, "stages": {}}
        save = lambda: atomic_write_text(path, json.dumps(record, indent=2))  # noqa: E731
        try:
            record["count"] = old.get("count") or count_parameters(item.config, item.overrides)
        except Exception as exc:  # the recipe does not parse or does not fit: a row, not the end of the series
            record["status"] = f"failed: {one_line(exc)}"
            save()
            return record["status"]
        failure = None
        before = old.get("stages", {}).get("before")
        if before and before.get("exit_code") == 0 and "kl" in before and before.get("full_heldout"):
            record["stages"]["before"] = before
        else:
            failure = self.stage("before", "validate", item, run_dir, [], record)
        save()
        if failure is None and self.repairs:
            old_stages = old.get("stages", {})
            kept = old.get("repair") == self.repair and old_stages.get("repair", {}).get("exit_code") == 0
            if kept:  # the same repair finished earlier: its state is there
                record["stages"]["repair"] = old_stages["repair"]
            else:
                steps, minutes = self.repair["steps"], self.repair["minutes"]
                extra = ["--trainer.max_steps", str(steps if steps > 0 else -1)]
                if minutes is not None:
                    extra += ["--trainer.max_time", max_time(minutes)]
                failure = self.stage("repair", "fit", item, run_dir, extra, record)
            save()
            state = run_dir / "repair" / "repair_state.safetensors"
            if failure is None:
                after = old_stages.get("after")
                if kept and after and after.get("exit_code") == 0 and "kl" in after and after.get("full_heldout"):
                    record["stages"]["after"] = after
                else:
                    failure = self.stage("after", "validate", item, run_dir, ["--ckpt_path", str(state)], record)
        record["status"] = failure or "ok"
        record["complete"] = failure is None
        save()
        return record["status"]

    def row(self, item: Item, result: dict | None, status: str, run_dir: Path) -> dict:
        method, ratio = self.pairs[item.name]
        record = result or self.record(run_dir)
        stages, count = record.get("stages", {}), record.get("count") or {}
        before, after = stages.get("before", {}), stages.get("after", {})
        teacher_ppl = before.get("teacher_ppl") or after.get("teacher_ppl")
        ratio_of = lambda ppl: ppl / teacher_ppl if ppl is not None and teacher_ppl else None  # noqa: E731
        teacher_params = count.get("teacher_parameters")
        built = built_summary(run_dir)
        ranks = {k: v for k, v in built.items() if k.startswith("ranks/")}
        if not ranks and result and result.get("complete") and "ranks" not in count:  # recorded before ranks were
            try:  # counted: from shapes, once; a recipe that no longer loads leaves the cell empty
                count["ranks"] = count_parameters(item.config, item.overrides)["ranks"]
                atomic_write_text(run_dir / RESULT, json.dumps(record, indent=2))
            except Exception as exc:  # noqa: BLE001 - the table must still be written
                print(f"{item.name}: no ranks ({one_line(exc)})")
        ranks = ranks or count.get("ranks", {})
        parameters = count.get("parameters")
        # the built maps' size: under a planned allocation the shapes' count is the uniform rank's
        exact = "low_rank_parameters" in built and count.get("replaced_parameters") is not None \
            and count.get("targets") == built.get("low_rank_maps")  # every target one of those maps
        if exact:
            parameters = teacher_params - count["replaced_parameters"] + built["low_rank_parameters"]
        return {"item": item.name, "method": method.name, "label": method.label or method.name, "ratio": ratio,
                "status": status,
                "parameters": parameters, "teacher_parameters": teacher_params, "parameters_built": exact,
                "parameter_fraction": parameters / teacher_params if teacher_params and parameters else None,
                "kl_before": before.get("kl"), "kl_after": after.get("kl"),
                "ppl_before": before.get("ppl"), "ppl_after": after.get("ppl"), "teacher_ppl": teacher_ppl,
                "ppl_x_teacher_before": ratio_of(before.get("ppl")), "ppl_x_teacher_after": ratio_of(after.get("ppl")),
                "repair_steps": stages.get("repair", {}).get("steps"), "ranks": ranks,
                "seconds": {k: v.get("seconds") for k, v in stages.items()},
                "cuda_peak_gib": {k: v.get("cuda_peak_gib") for k, v in stages.items()}}

    def payload(self, rows: list[dict]) -> dict:
        from .lightning_cli import git_commit

        teacher = next((r["teacher_ppl"] for r in rows if r["teacher_ppl"]), None)
        return {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "commit": git_commit(), "hardware": hardware(),
                "methods": [asdict(m) for m in self.methods.values()], "ratios": self.ratios,
                "overrides": self.overrides, "repair": self.repair, "teacher_ppl": teacher, "rows": rows}


def hardware() -> dict:
    import os

    import torch

    info = {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_table(rows: list[dict]) -> str:
    head = ["method", "ratio", "parameters", "KL before", "KL after", "ppl before", "ppl after",
            "ppl / teacher before", "after", "repair steps", "s before", "s repair", "s after",
            "mean rank per layer type"]
    cells = []
    for r in rows:
        s = r["seconds"]
        cells.append([r["label"] + ("" if r["status"] == "ok" else f" ({r['status']})"), f"{r['ratio']:g}",
                      fmt(r["parameters"], ",d"), fmt(r["kl_before"], ".4f"), fmt(r["kl_after"], ".4f"),
                      ppl_cell(r["ppl_before"]), ppl_cell(r["ppl_after"]), ppl_cell(r["ppl_x_teacher_before"]),
                      ppl_cell(r["ppl_x_teacher_after"]), fmt(r["repair_steps"], "d"), fmt(s.get("before"), ".0f"),
                      fmt(s.get("repair"), ".0f"), fmt(s.get("after"), ".0f"), rank_cell(r.get("ranks") or {})])
    if any(v is not None for r in rows for v in r.get("cuda_peak_gib", {}).values()):  # measured on a GPU
        head = [*head, "peak GiB before / repair / after"]
        for r, row in zip(rows, cells):
            row.append(" / ".join(fmt(r["cuda_peak_gib"].get(k), ".2f") for k in STAGES))
    table = markdown_table(head, cells)
    teacher = next((r for r in rows if r["teacher_ppl"]), None)
    if teacher is not None:
        params = fmt(teacher["teacher_parameters"], ",d")
        table += f"\n\nteacher: {params} parameters, heldout ppl {teacher['teacher_ppl']:.2f}"
    return table


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for i, label in enumerate(labels):
        color = f"C{i}"
        mine = sorted((r for r in rows if r["label"] == label and r["parameters"]), key=lambda r: r["parameters"])
        for key, style, suffix in (("ppl_before", "-o", ""), ("ppl_after", "--s", ", repaired")):
            points = [(r["parameters"], r[key]) for r in mine if r[key] is not None and math.isfinite(r[key])]
            if points:
                ax.plot([p / 1e6 for p, _ in points], [y for _, y in points], style, color=color,
                        label=label + suffix)
    teacher = next((r["teacher_ppl"] for r in rows if r["teacher_ppl"]), None)
    if teacher:
        ax.axhline(teacher, color="k", lw=1, ls=":", label=f"teacher ({teacher:.2f})")
    ax.set_xlabel("student parameters (millions)")
    ax.set_ylabel("heldout perplexity")
    ax.set_yscale("log")
    ax.set_title("compression frontier: heldout ppl vs parameters")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # below the axes: inside, it covered the curves
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def run_frontier(
    methods: list[Method],
    ratios: list[float] = DEFAULT_RATIOS,
    overrides: list[str] = [],
    repair_steps: int = 0,
    repair_minutes: float | None = None,
    output_dir: str = "runs/frontier",
    only: list[str] | None = None,
    rerun: bool = False,
    logger: bool = True,
) -> list[dict]:
    """Run every (method, ratio) item not finished, then write the table, JSON and chart.

    Each item: heldout KL and ppl before and after repair, the student's parameters, the seconds of each stage.

    Args:
        methods: the compression methods, in table order.
        ratios: parameter ratios kept per replaced map (each method's ``--model.init_args.parts.rank``).
        overrides: recipe options given to every item (before the method's own), e.g. a heldout size.
        repair_steps: repair steps per item (``zoo fit --trainer.max_steps``); 0 with no ``repair_minutes``:
            no repair, the unrepaired student only.
        repair_minutes: a wall-clock limit of each repair (``--trainer.max_time``); None: none.
        output_dir: each item runs in ``output_dir/<method>@<ratio>``; the table, JSON and chart go here.
        only: run only these items (``<method>@<ratio>``, e.g. ``svdllm@0.8``); the table shows every finished one.
        rerun: run finished items (and their finished stages) again.
        logger: log each repair, and the table, to W&B (offline unless ``WANDB_MODE=online``).
    """
    if not methods:
        raise ZooError("the frontier has no methods")
    if not ratios:
        raise ZooError("the frontier has no ratios")
    if repair_steps < 0 or (repair_minutes is not None and repair_minutes <= 0):
        raise ZooError(f"repair_steps must be >= 0 and repair_minutes > 0, got {repair_steps}, {repair_minutes}")
    check_unique([m.name for m in methods], "method names")
    check_unique([f"{r:g}" for r in ratios], "ratios")
    frontier = Frontier(methods, ratios, overrides, repair_steps, repair_minutes, output_dir, only, rerun, logger)
    check_configs(frontier.items, "method")
    rows = frontier.run()
    out = frontier.outputs
    table = format_table(rows)
    print("\n" + table)
    out.markdown(table)
    out.add(frontier.save(rows))
    chart = out.chart(plot, rows)
    print(f"\n{out.wrote()}")
    flat = [{k: v for k, v in r.items() if k not in ("seconds", "ranks", "cuda_peak_gib")} | (r.get("ranks") or {})
            | {f"seconds_{k}": r["seconds"].get(k) for k in STAGES}
            | {f"cuda_peak_gib_{k}": r["cuda_peak_gib"].get(k) for k in STAGES} for r in rows]
    log_outputs(command_logger(logger, "frontier", out.dir), tables={"frontier": row_table(flat)},
                images={"frontier_chart": chart})
    return rows
