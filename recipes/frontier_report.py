"""The frontier's table and chart (``zoo frontier``, issues 16, 25 and 27): one row per (method, value), heldout
code and prose perplexity against the teacher's, hologram KL and multiple-choice accuracy, before and after
repair, against the bytes the student stores; a figure over several seeds is their mean, shown ``± std``
(``frontier_rows``) and as error bars in the chart."""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path

from .frontier_rows import counted
from .report import fmt, markdown_table

#: the order of a decoder layer's maps, for the rank cell (other names follow, sorted)
LAYER_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGES = ("before", "repair", "after", "prose_before", "prose_after", "hologram_before", "hologram_after",
          "mc_before", "mc_teacher", "mc_after", "speed")


def rank_cell(ranks: dict[str, float]) -> str:
    """``q 230 · k 115 · ...``: the mean rank of each layer type in a decoder layer's order, named without
    ``_proj``."""
    means = {k.split("/")[1]: v for k, v in ranks.items() if k.endswith("/mean")}
    order = sorted(means, key=lambda t: (LAYER_ORDER.index(t) if t in LAYER_ORDER else len(LAYER_ORDER), t))
    return " · ".join(f"{t.removesuffix('_proj')} {means[t]:.0f}" for t in order) or "-"


def ppl_cell(ppl: float | None) -> str:
    """A perplexity: 2 decimals, or a whole number with separators from 1,000 (a ruined student's 18,298,298)."""
    return fmt(ppl, ",.0f" if ppl is not None and ppl >= 1000 else ".2f")


def ratio_cell(ratio: float | None) -> str:
    """A multiple of the teacher's perplexity: 3 decimals near 1, fewer for a ruined student."""
    return ppl_cell(ratio) if ratio is None or ratio >= 10 else fmt(ratio, ".3f")


def spread_cell(row: dict, key: str, cell) -> str:
    """``cell`` of the row's figure, ``± std`` after it where the row has a spread over seeds."""
    std = row.get(f"{key}_std")
    return cell(row.get(key)) + (f" ± {cell(std)}" if std is not None and row.get(key) is not None else "")


def steps_cell(row: dict) -> str:
    """The repair's steps, and which seed's student is an earlier state than its last step."""
    runs = counted(row.get("per_seed") or [row])
    kept = [(f"s{r['seed']} " if len(runs) > 1 else "") + f"kept step {r['repair_state_step']}" for r in runs
            if r.get("repair_state_step") is not None and r.get("repair_steps") is not None
            and r["repair_state_step"] != r["repair_steps"]]
    return spread_cell(row, "repair_steps", lambda v: fmt(v, ".0f")) + (f" ({', '.join(kept)})" if kept else "")


def hardware() -> dict:
    import torch

    info = {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_table(rows: list[dict]) -> str:
    head = ["method", "setting", "bits / weight", "MB (16-bit)", "parameters", "KL before", "KL after",
            "code ppl before", "after", "code x teacher before", "after", "prose x teacher before", "after",
            "hologram KL before", "after", "mc acc before", "after", "decode x dense", "seeds", "repair steps",
            "repair min", "s before", "s repair", "mean rank per layer type"]
    kl, acc = (lambda v: fmt(v, ".4f")), (lambda v: fmt(v, ".3f"))  # noqa: E731
    cells = []
    for r in rows:
        s = r["seconds"]
        cells.append([r["label"] + ("" if r["status"] == "ok" else f" ({r['status']})"),
                      f"{r['setting']} {r['value']:g}", fmt(r.get("bits_per_weight"), ".2f"),
                      fmt(r["bytes"] / 1e6 if r.get("bytes") else None, ".1f"), fmt(r["parameters"], ",d"),
                      *(spread_cell(r, k, kl) for k in ("kl_before", "kl_after")), ppl_cell(r["ppl_before"]),
                      ppl_cell(r["ppl_after"]),
                      *(spread_cell(r, f"{k}_{w}", ratio_cell) for k in ("ppl_x_teacher", "prose_x_teacher")
                        for w in ("before", "after")),
                      *(spread_cell(r, f"hologram_kl_{w}", kl) for w in ("before", "after")),
                      *(spread_cell(r, f"mc_acc_{w}", acc) for w in ("before", "after")),
                      ratio_cell(r.get("decode_speedup")), ",".join(map(str, r.get("seeds") or [])) or "-",
                      steps_cell(r), fmt(r.get("repair_minutes"), ".1f"),
                      fmt(s.get("before"), ".0f"), fmt(s.get("repair"), ".0f"), rank_cell(r.get("ranks") or {})])
    if any(v is not None for r in rows for v in r.get("cuda_peak_gib", {}).values()):  # measured on a GPU
        head = [*head, "peak GiB before / repair / after"]
        for r, row in zip(rows, cells):
            row.append(" / ".join(fmt(r["cuda_peak_gib"].get(k), ".2f") for k in ("before", "repair", "after")))
    table = markdown_table(head, cells)
    teacher = next((r for r in rows if r["teacher_ppl"]), None)
    if teacher is not None:
        params = fmt(teacher["teacher_parameters"], ",d")
        size = f", {teacher['teacher_bytes'] / 1e6:.1f} MB at 16 bits" if teacher.get("teacher_bytes") else ""
        prose = next((r["teacher_prose_ppl"] for r in rows if r.get("teacher_prose_ppl")), None)
        mc = next((r["mc_acc_teacher"] for r in rows if r.get("mc_acc_teacher") is not None), None)
        table += (f"\n\nteacher: {params} parameters{size}, heldout code ppl {teacher['teacher_ppl']:.2f}"
                  + (f", prose ppl {prose:.2f}" if prose else "") + (f", mc acc {mc:.3f}" if mc is not None else ""))
    if any(len(r.get("seeds") or []) > 1 for r in rows):
        table += "\n\na figure over several seeds: their mean ± the sample standard deviation (n - 1)"
    return table


def plot(rows: list[dict], path: Path) -> Path:
    """Code and prose perplexity over the teacher's against the student's bytes (log y), a line per method,
    unrepaired solid and repaired dashed; a mean over seeds with its standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=True)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    teacher_mb = next((r["teacher_bytes"] / 1e6 for r in rows if r.get("teacher_bytes")), None)
    for ax, corpus, key in ((axes[0], "heldout code", "ppl_x_teacher"), (axes[1], "prose (pydoc topics)", "prose_x_teacher")):
        for i, label in enumerate(labels):
            mine = sorted((r for r in rows if r["label"] == label and r.get("bytes")), key=lambda r: r["bytes"])
            for when, style, suffix in (("before", "-o", ""), ("after", "--s", ", repaired")):
                points = [(r["bytes"] / 1e6, r[f"{key}_{when}"], r.get(f"{key}_{when}_std") or 0.0) for r in mine
                          if r.get(f"{key}_{when}") is not None and math.isfinite(r[f"{key}_{when}"])]
                if points:
                    ax.errorbar([x for x, _, _ in points], [y for _, y, _ in points],
                                yerr=[e for _, _, e in points], fmt=style, color=f"C{i % 10}", capsize=3,
                                label=label + suffix)
        ax.axhline(1.0, color="k", lw=1, ls=":", label="teacher")
        if teacher_mb:
            ax.axvline(teacher_mb, color="grey", lw=1, ls=":")
        ax.set_xlabel("student size (MB, floating tensors at 16 bits)")
        ax.set_title(f"{corpus}: ppl / teacher's vs bytes")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity / teacher's")
    handles, names = axes[0].get_legend_handles_labels()
    if handles:  # below the axes: inside, it covered the curves
        fig.legend(handles, names, fontsize=8, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
