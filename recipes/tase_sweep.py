"""``zoo tase-sweep``: the TASE identity-deviation sweep over k (source 000, section 4.9, phase 51: k = 512,
1024, 4096, 8192 of m = 16384 gave d_id_mean 0.58, 0.44, 0.27, 0.17 on Llama-3.1-8B; source 000, the
note after the abstract). Each k is a ``zoo fit`` of the diagnostic config (``zoo.TASEDiagnostic`` with a
``callbacks.IdentityGate``) with ``--model.init_args.k K``, run in its own process into
``OUTPUT_DIR/k_<K>``; a k whose ``metrics.json`` carries the gate's verdict is finished and not run again, so
an interrupted sweep resumes where it stopped. A k that fails the gate is a result, not an error.

Output: one table (stdout, ``tase_sweep.md``, ``tase_sweep.json``), ``tase_sweep.png`` (d_id vs k/m, raw,
with the outlier dimensions set apart and after the RMSNorm, with the source's points for reference), and
the same to a W&B run (offline unless ``WANDB_MODE=online``).

    zoo tase-sweep --config configs/commands/tase_sweep.yaml
    zoo tase-sweep --config configs/commands/tase_sweep.yaml --overrides '[--model.init_args.init, identity]' \\
        --output_dir runs/tase_sweep_identity
"""
from __future__ import annotations

import logging
from pathlib import Path

from zoo.core.errors import ZooError

from .command import command_logger
from .report import fmt, log_outputs, markdown_table, row_table
from .series import Item, Series, check_unique

log = logging.getLogger("zoo.tase_sweep")

DEFAULT_KS = ["m", "m/2", "m/4", "m/8", "m/16", "m/32"]
#: the source's sweep (000, 4.9): k / m -> d_id_mean at m = 16384 on Llama-3.1-8B (k = m: 0.0339 by step 200)
SOURCE = {512 / 16384: 0.58, 1024 / 16384: 0.44, 4096 / 16384: 0.27, 8192 / 16384: 0.17, 1.0: 0.0339}
COLUMNS = ["d_id_mean", "d_id_max", "d_id_bulk_mean", "d_id_bulk_max", "d_id_norm_mean", "d_id_norm_max"]


def run_name(k: str) -> str:
    return "k_" + str(k).replace("/", "_").replace(" ", "")


def row_of(k: str, metrics: dict | None, status: str) -> dict:
    summary = (metrics or {}).get("summary", {})
    last = ((metrics or {}).get("validations") or [{}])[-1]
    row = {"k": k, "status": status, "k_value": summary.get("k"), "m": summary.get("m"),
           "k_over_m": summary["k"] / summary["m"] if "k" in summary and "m" in summary else None,
           **{c: summary.get(c) for c in COLUMNS}, "active_features": last.get("active_features"),
           "gate": summary.get("identity_gate"), "passed_at_step": summary.get("identity_gate_passed_at_step"),
           "steps": (metrics or {}).get("global_step"), "init": summary.get("init")}
    return row


def format_table(rows: list[dict]) -> str:
    head = ["k", "k / m", "d_id mean", "d_id max", "outliers apart: mean", "max", "post-RMSNorm: mean", "max",
            "active / token", "gate", "passed at step", "steps"]
    cells = []
    for r in rows:
        k = f"{r['k']} = {r['k_value']}" if r["k_value"] is not None else r["k"]
        cells.append([k + ("" if r["status"] == "ok" else f" ({r['status']})"), fmt(r["k_over_m"], ".4g"),
                      *(fmt(r[c], ".4f") for c in COLUMNS), fmt(r["active_features"], ".0f"), r["gate"] or "-",
                      fmt(r["passed_at_step"], "d"), fmt(r["steps"], "d")])
    return markdown_table(head, cells)


def monotone(rows: list[dict], column: str = "d_id_mean") -> bool | None:
    """Whether ``column`` falls (weakly) as k grows over the finished rows (None with fewer than two)."""
    done = sorted((r for r in rows if r[column] is not None and r["k_value"]), key=lambda r: r["k_value"])
    if len(done) < 2:
        return None
    values = [r[column] for r in done]
    return all(b <= a for a, b in zip(values, values[1:]))


def findings(rows: list[dict]) -> list[str]:
    lines = []
    for column, label in (("d_id_mean", "raw"), ("d_id_bulk_mean", "outlier dimensions set apart"),
                          ("d_id_norm_mean", "after the RMSNorm")):
        verdict = monotone(rows, column)
        if verdict is not None:
            lines.append(f"d_id_mean ({label}) {'falls' if verdict else 'does NOT fall'} monotonically as k grows")
    passing = [r["k"] for r in rows if r["gate"] == "pass"]
    lines.append(f"k passing the gate: {', '.join(passing) if passing else 'none'}")
    return lines


def plot(rows: list[dict], path: Path, threshold: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((r for r in rows if r["d_id_mean"] is not None), key=lambda r: r["k_over_m"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["k_over_m"] for r in done]
    for column, label, color in (("d_id", "raw", "#1f77b4"), ("d_id_bulk", "outlier dims set apart", "#d62728"),
                                 ("d_id_norm", "after RMSNorm", "#2ca02c")):
        ax.plot(xs, [r[f"{column}_mean"] for r in done], "o-", color=color, label=f"mean, {label}")
        ax.plot(xs, [r[f"{column}_max"] for r in done], "x:", color=color, alpha=0.6, label=f"max, {label}")
    src = sorted(SOURCE.items())
    ax.plot([k for k, _ in src], [v for _, v in src], "s--", color="#888", label="source: Llama-3.1-8B, m=16384")
    if threshold is not None:
        ax.axhline(threshold, color="k", lw=0.8, ls="--", label=f"gate {threshold}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("k / m (active features / width)")
    ax.set_ylabel("identity deviation ||x_hat - x|| / ||x||")
    m = done[0]["m"] if done else None
    ax.set_title(f"TASE near-identity sweep{f' (m = {m})' if m else ''}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class Sweep(Series):
    title, noun, summary_key = "TASE sweep", "k", "identity_gate"

    def __init__(self, recipe: str, ks: list[str], overrides: list[str], output_dir: str, only: list[str] | None,
                 rerun: bool, logger: bool):
        self.recipe, self.ks, self.overrides = recipe, ks, list(overrides)
        items = [Item(k, run_name(k), recipe, [*overrides, "--model.init_args.k", k]) for k in ks]
        super().__init__(items, output_dir, "tase_sweep", only, rerun, logger)

    def label(self, item: Item) -> str:
        return f"k = {item.name}"

    def status(self, code: int, last: str, metrics: dict | None) -> str:
        # a k that fails the gate is a result, not an error
        if metrics is None:
            return f"failed: {last[:120]}"
        if code != 0 and metrics["summary"].get("identity_gate") != "fail":
            return f"exit {code}: {last[:120]}"
        return "ok"

    def row(self, item: Item, metrics: dict | None, status: str, run_dir: Path) -> dict:
        return row_of(item.name, metrics, status)

    def payload(self, rows: list[dict]) -> dict:
        return {"recipe": self.recipe, "ks": self.ks, "overrides": self.overrides, "rows": rows,
                "findings": findings(rows), "monotone_d_id_mean": monotone(rows),
                "source": {str(k): v for k, v in SOURCE.items()}}

    def threshold(self) -> float | None:
        """The gate's threshold, from the first finished k."""
        return next((r["summary"].get("identity_gate_threshold") for r in
                     (self.done(i, self.out / i.dir_name) for i in self.items) if r), None)


def run_sweep(
    recipe: str = "configs/recipes/tase_diagnostic.yaml",
    ks: list[int | str] = DEFAULT_KS,
    overrides: list[str] = [],
    output_dir: str = "runs/tase_sweep",
    only: list[str] | None = None,
    rerun: bool = False,
    logger: bool = True,
) -> list[dict]:
    """Run the diagnostic for every k (skipping finished ones), then write the table, JSON and chart.

    Args:
        recipe: the diagnostic recipe (``zoo.TASEDiagnostic`` + ``callbacks.IdentityGate``), as for ``zoo fit``.
        ks: the k values: ints or ``"m"`` / ``"m/<N>"`` (m = the config's width, 4 x the residual width by default).
        overrides: ``zoo fit`` options given to every k, e.g. ``[--model.init_args.init, identity]``.
        output_dir: each k runs in ``output_dir/k_<K>``; the table and chart go here.
        only: run only these k (the table still shows every finished k).
        rerun: run finished k again.
        logger: log every run, and the table, to W&B (offline unless ``WANDB_MODE=online``).
    """
    ks = [str(k) for k in ks]
    if not ks:
        raise ZooError("the sweep has no k values")
    check_unique(list(map(run_name, ks)), "k values")
    sweep = Sweep(recipe, ks, overrides, output_dir, only, rerun, logger)
    if not Path(recipe).is_file():
        raise ZooError(f"recipe {recipe!r} does not exist")
    rows = sweep.run()
    table, notes = format_table(rows), findings(rows)
    print("\n" + table + "\n\n" + "\n".join(notes))
    out = sweep.outputs
    out.markdown(table + "\n\n" + "\n".join(f"- {n}" for n in notes))
    out.add(sweep.save(rows))
    chart = out.chart(plot, rows, threshold=sweep.threshold())
    print(f"\n{out.wrote()}")
    steps = [(int(r["k_value"]), {f"tase_sweep/{c}": r[c] for c in COLUMNS if r[c] is not None})
             for r in rows if r["k_value"] is not None and r["d_id_mean"] is not None]
    log_outputs(command_logger(logger, "tase_sweep", out.dir), tables={"tase_sweep": row_table(rows)},
                texts={"tase_sweep_findings": notes}, images={"tase_sweep_chart": chart}, steps=steps)
    return rows
