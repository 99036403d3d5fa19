"""``zoo ladder``: the scaling ladder of structured replacements (source 000, sections 4.5-4.9 and 7.3 C):
one layer, two, four and eight independent PHD layers, then eight coupled layers without shims, with
shims r=16 and r=32. Each rung is a ``zoo fit`` of a recipe config plus overrides, run in its own
process (a crash or a failed gate ends that rung, not the ladder) into ``OUTPUT_DIR/RUNG``; a rung whose
``metrics.json`` is complete is not run again, so an interrupted ladder resumes where it stopped.

Output: one table (stdout, ``ladder.md``, ``ladder.json``), a chart (``ladder.png``: heldout KL before and
after repair per rung), and the same to a W&B run (offline by default). With ``eval_subset`` each
repaired student (and the teacher, once) is also scored by ``zoo eval`` (greedy pass@1).

    zoo ladder --config configs/commands/ladder.yaml
    zoo ladder --config configs/commands/ladder.yaml --overrides '[--trainer.max_steps, "200"]' --eval_subset HE10
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo.core.errors import ZooError

from .command import command_logger
from .report import fmt, log_outputs, markdown_table, row_table
from .series import Item, Series, check_configs, check_unique, run_streaming

log = logging.getLogger("zoo.ladder")


@dataclass
class Rung:
    """One rung: a recipe config and the overrides that make it this rung.

    Args:
        name: the rung's name (its run directory under the ladder's output_dir).
        config: the recipe YAML (as for ``zoo fit --config``).
        method: what the table shows as the method.
        overrides: extra ``zoo fit`` options, e.g. ``['--model.init_args.parts.targets', 'model.layers.{14..17}.mlp.down_proj']``.
    """

    name: str
    config: str
    method: str = ""
    overrides: list[str] = field(default_factory=list)


def row_of(rung: Rung, metrics: dict | None, status: str) -> dict:
    summary = (metrics or {}).get("summary", {})
    final = (metrics or {}).get("final", {})
    return {"rung": rung.name, "method": rung.method or Path(rung.config).stem, "status": status,
            "layers": summary.get("targets"), "kl_before": summary.get("heldout_kl_before"),
            "kl_after": summary.get("heldout_kl_after"),
            "shim_dominance_max": summary.get("shim_dominance_max", final.get("shim_dominance_max")),
            "trainable_parameters": summary.get("trainable_parameters"), "pass@1": None}


def format_table(rows: list[dict], eval_label: str | None) -> str:
    head = ["rung", "layers", "method", "heldout KL before", "after", "max shim dominance", "trainable params"]
    if eval_label:
        head.append(f"pass@1 ({eval_label})")
    cells = [[r["rung"] + ("" if r["status"] == "ok" else f" ({r['status']})"), fmt(r["layers"], "d"), r["method"],
              fmt(r["kl_before"], ".4f"), fmt(r["kl_after"], ".4f"), fmt(r["shim_dominance_max"], ".3f"),
              fmt(r["trainable_parameters"], ",d"), *([fmt(r["pass@1"], ".1%")] if eval_label else [])] for r in rows]
    return markdown_table(head, cells)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["kl_after"] is not None]
    fig, ax = plt.subplots(figsize=(1.3 * max(len(done), 3) + 2, 4))
    xs = range(len(done))
    ax.bar([x - 0.2 for x in xs], [r["kl_before"] for r in done], 0.4, label="before repair", color="#bbb")
    ax.bar([x + 0.2 for x in xs], [r["kl_after"] for r in done], 0.4, label="after repair", color="#3a7")
    ax.set_xticks(list(xs), [r["rung"] for r in done], rotation=30, ha="right")
    ax.set_ylabel("heldout KL(teacher || student)")
    ax.set_yscale("log")
    ax.set_title("scaling ladder: structured replacements of MLP down-projections")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _eval(config: str, overrides: list[str], repair_state: Path | None, subset: str, dataset: str,
          output: Path, log_path: Path) -> float | None:
    if output.is_file():
        return json.loads(output.read_text())["pass_at_1"]
    args = [sys.executable, "-m", "recipes.cli", "eval", "--dataset", dataset, "--subset", subset,
            "--output", str(output)]
    if repair_state is not None:
        args += ["--recipe", config, "--repair_state", str(repair_state), "--overrides", json.dumps(overrides)]
    code, last = run_streaming(args, log_path)
    if code != 0:
        log.warning("evaluation failed (%s); see %s", last, log_path)
        return None
    return json.loads(output.read_text())["pass_at_1"]


class Ladder(Series):
    title, noun, summary_key = "ladder rung", "rung(s)", "heldout_kl_after"

    def __init__(self, rungs: list[Rung], overrides: list[str], output_dir: str, eval_subset: str | None,
                 eval_dataset: str, only: list[str] | None, rerun: bool, logger: bool):
        self.rungs = {r.name: r for r in rungs}
        self.overrides, self.eval_subset, self.eval_dataset = list(overrides), eval_subset, eval_dataset
        self.eval_label = f"{eval_dataset} {eval_subset}" if eval_subset else None
        self.teacher_pass = None
        items = [Item(r.name, config=r.config, overrides=[*overrides, *r.overrides]) for r in rungs]
        super().__init__(items, output_dir, "ladder", only, rerun, logger)

    def row(self, item: Item, metrics: dict | None, status: str, run_dir: Path) -> dict:
        row = row_of(self.rungs[item.name], metrics, status)
        if self.eval_subset and metrics is not None and status == "ok":
            row["pass@1"] = _eval(item.config, item.overrides, run_dir / "repair_state.safetensors", self.eval_subset,
                                  self.eval_dataset, run_dir / "eval.json", run_dir / "eval.log")
        return row

    def payload(self, rows: list[dict]) -> dict:
        return {"rungs": [asdict(r) for r in self.rungs.values()], "overrides": self.overrides, "rows": rows,
                "eval": self.eval_label, "teacher_pass@1": self.teacher_pass}


def run_ladder(
    rungs: list[Rung],
    overrides: list[str] = [],
    output_dir: str = "runs/ladder",
    eval_subset: str | None = None,
    eval_dataset: str = "humaneval",
    only: list[str] | None = None,
    rerun: bool = False,
    logger: bool = True,
) -> list[dict]:
    """Run every rung (skipping finished ones), then write the table, JSON and chart.

    Args:
        rungs: the ladder, in table order.
        overrides: ``zoo fit`` options given to every rung (before the rung's own), e.g. a step budget.
        output_dir: each rung runs in ``output_dir/<name>``; the table and chart go here.
        eval_subset: also score each student with ``zoo eval`` on this subset (e.g. ``HE10``,
            ``teacher-solved:5``); None: no evaluation.
        eval_dataset: ``humaneval`` or ``mbpp``.
        only: run only these rungs (by name); the table still shows every finished rung.
        rerun: run finished rungs again.
        logger: log every rung, and the table, to W&B (offline unless ``WANDB_MODE=online``).
    """
    if not rungs:
        raise ZooError("the ladder has no rungs")
    check_unique([r.name for r in rungs], "rung names")
    ladder = Ladder(rungs, overrides, output_dir, eval_subset, eval_dataset, only, rerun, logger)
    check_configs(ladder.items, "rung")
    rows = ladder.run()
    out = ladder.outputs
    if eval_subset:
        ladder.teacher_pass = _eval("", [], None, eval_subset, eval_dataset, out.dir / "teacher_eval.json",
                                    out.dir / "teacher_eval.log")
    table = format_table(rows, ladder.eval_label)
    if ladder.teacher_pass is not None:
        table += f"\n\nteacher pass@1 ({ladder.eval_label}): {ladder.teacher_pass:.1%}"
    print("\n" + table)
    out.markdown(table)
    out.add(ladder.save(rows))
    chart = out.chart(plot, rows)
    print(f"\n{out.wrote()}")
    log_outputs(command_logger(logger, "ladder", out.dir), tables={"ladder": row_table(rows)},
                images={"ladder_chart": chart})
    return rows
