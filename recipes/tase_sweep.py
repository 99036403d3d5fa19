"""``zoo tase-sweep``: the TASE identity-deviation sweep over k (source 000, section 4.9, phase 51: k = 512,
1024, 4096, 8192 of m = 16384 gave d_id_mean 0.58, 0.44, 0.27, 0.17 on Llama-3.1-8B; source 000, the
note after the abstract). Each k is a ``zoo fit`` of the diagnostic config (``zoo.TASEDiagnostic`` with a
``callbacks.IdentityGate``) with ``--model.init_args.k K``, run in its own process into
``OUTPUT_DIR/k_<K>``; a k whose ``metrics.json`` carries the gate's verdict is finished and not run again, so
an interrupted sweep resumes where it stopped. A k that fails the gate is a result, not an error.

Output: one table (stdout, ``tase_sweep.md``, ``tase_sweep.json``), ``tase_sweep.png`` (d_id vs k/m, raw,
with the outlier dimensions set apart and after the RMSNorm, with the source's points for reference), and
the same to a W&B run (offline unless ``WANDB_MODE=online``).

    zoo tase-sweep --config configs/tase_sweep.yaml
    zoo tase-sweep --config configs/tase_sweep.yaml --overrides '[--model.init_args.init, identity]' \\
        --output_dir runs/tase_sweep_identity
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from zoo.core.errors import ZooError

from .command import (command_parser, finish_logger, finished_metrics, fit_args, fmt, run_command, run_streaming,
                      wandb_logger)

log = logging.getLogger("zoo.tase_sweep")

DEFAULT_KS = ["m", "m/2", "m/4", "m/8", "m/16", "m/32"]
#: the source's sweep (000, 4.9): k / m -> d_id_mean at m = 16384 on Llama-3.1-8B (k = m: 0.0339 by step 200)
SOURCE = {512 / 16384: 0.58, 1024 / 16384: 0.44, 4096 / 16384: 0.27, 8192 / 16384: 0.17, 1.0: 0.0339}
COLUMNS = ["d_id_mean", "d_id_max", "d_id_bulk_mean", "d_id_bulk_max", "d_id_norm_mean", "d_id_norm_max"]


def run_name(k: str) -> str:
    return "k_" + str(k).replace("/", "_").replace(" ", "")


def complete(run_dir: Path) -> dict | None:
    """The metrics of a finished k (its IdentityGate gave a verdict), else None."""
    return finished_metrics(run_dir, "identity_gate")


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
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k = f"{r['k']} = {r['k_value']}" if r["k_value"] is not None else r["k"]
        cells = [k + ("" if r["status"] == "ok" else f" ({r['status']})"), fmt(r["k_over_m"], ".4g"),
                 *(fmt(r[c], ".4f") for c in COLUMNS), fmt(r["active_features"], ".0f"), r["gate"] or "-",
                 fmt(r["passed_at_step"], "d"), fmt(r["steps"], "d")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def run_sweep(
    recipe: str = "configs/tase_diagnostic.yaml",
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
    if len(set(map(run_name, ks))) != len(ks):
        raise ZooError(f"k values must be distinct, got {ks}")
    unknown = sorted(set(map(str, only or [])) - set(ks))
    if unknown:
        raise ZooError(f"unknown k {unknown} in only; valid: {', '.join(ks)}")
    if not Path(recipe).is_file():
        raise ZooError(f"recipe {recipe!r} does not exist")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, k in enumerate(ks, 1):
        run_dir = out / run_name(k)
        metrics = complete(run_dir)
        selected = only is None or k in map(str, only)
        status = "ok"
        if selected and (metrics is None or rerun):
            run_dir.mkdir(parents=True, exist_ok=True)
            args = fit_args(recipe, [*overrides, "--model.init_args.k", str(k)], run_dir,
                            f"tase_sweep/{run_name(k)}" if logger else None)
            print(f"\n=== TASE sweep {i}/{len(ks)}: k = {k}\n$ {' '.join(args[1:])}", flush=True)
            code, last = run_streaming(args, run_dir / "fit.log")
            metrics = complete(run_dir)
            if metrics is None:
                status = f"failed: {last[:120]}"
            elif code != 0 and metrics["summary"].get("identity_gate") != "fail":
                status = f"exit {code}: {last[:120]}"
        elif metrics is None:
            status = "not run"
        else:
            print(f"=== TASE sweep {i}/{len(ks)}: k = {k}: finished earlier ({run_dir / 'metrics.json'})")
        rows.append(row_of(k, metrics, status))

    threshold = next((r["summary"].get("identity_gate_threshold") for r in
                      (complete(out / run_name(k)) for k in ks) if r), None)
    table = format_table(rows)
    notes = findings(rows)
    print("\n" + table + "\n\n" + "\n".join(notes))
    (out / "tase_sweep.md").write_text(table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    payload = {"recipe": recipe, "ks": ks, "overrides": list(overrides), "rows": rows, "findings": notes,
               "monotone_d_id_mean": monotone(rows), "source": {str(k): v for k, v in SOURCE.items()}}
    (out / "tase_sweep.json").write_text(json.dumps(payload, indent=2))
    chart = plot(rows, out / "tase_sweep.png", threshold)
    print(f"\nwrote {out / 'tase_sweep.md'}, {out / 'tase_sweep.json'} and {chart}")
    if logger:
        log_sweep(rows, notes, chart, out)
    return rows


def log_sweep(rows: list[dict], notes: list[str], chart: Path, out: Path) -> None:
    logger = wandb_logger("tase_sweep", out)
    columns = list(rows[0])
    logger.log_table(key="tase_sweep", columns=columns, data=[[r[c] for c in columns] for r in rows])
    logger.log_text(key="tase_sweep_findings", columns=["finding"], data=[[n] for n in notes])
    logger.log_image(key="tase_sweep_chart", images=[str(chart)])
    for r in rows:
        if r["k_value"] is not None and r["d_id_mean"] is not None:
            logger.log_metrics({f"tase_sweep/{c}": r[c] for c in COLUMNS if r[c] is not None}, step=int(r["k_value"]))
    finish_logger(logger)


def tase_sweep_main(argv: list[str]) -> list[dict]:
    """Entry point of ``zoo tase-sweep`` (see ``recipes.cli.COMMANDS``)."""
    parser = command_parser(run_sweep, "zoo tase-sweep", "zoo tase-sweep: TASE identity deviation over k "
                            "(source 000, 4.9, phase 51)")
    return run_command(run_sweep, parser, argv)
