"""``zoo spectrum``: per-layer eigen-spectra of a teacher's activations and weights (source 004,
"Experimental Results" 1-2; the massive-activation caveat in docs/techniques/eigen-attention.md).

For every attention layer, over the real tokens of a recipe DataModule's calibration split
(``zoo.core.calibration.collect`` with taps, cached under ``~/.cache/zoo/spectrum``):

- ``hidden``: the residual stream entering the layer (raw); with the outlier (massive-activation)
  dimensions set apart (``hidden_dims_apart``: mean square above ``outlier_ratio`` x the median);
  without the tokens at position 0 (``hidden_nosink``: the attention-sink token, whose activation is
  large along a direction spread over many coordinates); with both set apart (``hidden_apart``: on the
  embedded teacher each alone leaves Df ~ 1-2 in the middle layers, only both remove the artifact);
  and the RMSNorm output the q/k/v projections consume (``hidden_normed``);
- ``Q``, ``K`` (after RoPE: what EigenAttention projects and caches), ``K_pre_rope`` and ``V``, per
  KV-head group (each query head of a group is a sample of the group's distribution);
- the weight spectra of the same projections per group (squared singular values of the group's rows
  of ``q_proj``/``k_proj``/``v_proj``), for contrast.

Each spectrum gives Df = (sum l)^2 / sum l^2 and k for the ``variance`` target (table: mean over the
KV groups). Spectra are of centered covariances (``centered: false``: uncentered second moments, as
EigenAttention's projectors use). Outputs: a markdown table on stdout and in ``spectrum.md``,
``spectrum.json`` (every number per layer and group), ``spectrum.safetensors`` (every eigenvalue),
``spectrum.png`` (Df and k per layer; cumulative variance curves), and the same to the logger.

    zoo spectrum --config configs/commands/spectrum.yaml [--variance 0.9] [--layers '[0, 15, 29]']
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger

from zoo.core import calibration as calib
from zoo.core import spectrum as sp
from zoo.core.cache import Entry, atomic_save
from zoo.core.errors import ZooError
from zoo.core.models import DEFAULT_TEACHER, load_causal_lm
from zoo.core.targets import find_targets
from zoo.eigen_attention import attention_streams, check_supported

from .data import TokenDataModule
from .report import Outputs, log_outputs

log = logging.getLogger("zoo.spectrum")

#: activation streams per layer, in table order; "per_group" ones are split by KV-head group
HIDDEN = ("hidden", "hidden_dims_apart", "hidden_nosink", "hidden_apart", "hidden_normed")
PER_GROUP = ("Q", "K", "K_pre_rope", "V")
WEIGHTS = ("W_q", "W_k", "W_v")
TAP_VERSION = "spectrum/2"


def spectrum_tap(module, args, kwargs, output) -> dict[str, torch.Tensor]:
    """What q/k/v consume (the normed hidden state) and the queries, keys (pre and post RoPE) and values."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    positions = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
    return {"hidden_normed": hidden, **attention_streams(module, hidden, positions)}


def residual_tap(module, args, kwargs, output) -> dict:
    """The residual stream entering a decoder layer: all tokens, and without the position-0 tokens."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    return {"hidden": hidden, "hidden_nosink": (hidden, positions > 0)}


def _matrix(stats: calib.ActivationStats, centered: bool) -> torch.Tensor:
    return stats.covariance() if centered else stats.second_moment


def layer_spectra(attn_name: str, attn, stats: dict[str, calib.ActivationStats], centered: bool,
                  outlier_ratio: float) -> tuple[dict[str, list[torch.Tensor]], dict]:
    """({stream: [eigenvalues per group]}, extras) of one layer (hidden streams have one 'group')."""
    layer_name = attn_name.rpartition(".")[0]
    eigs: dict[str, list[torch.Tensor]] = {}
    hidden = stats[f"{layer_name}:hidden"]
    C = _matrix(hidden, centered)
    eigs["hidden"] = [sp.eigenvalues(C)]
    outliers = sp.outlier_dims(hidden.diag, outlier_ratio)
    eigs["hidden_dims_apart"] = [sp.eigenvalues(sp.drop_dims(C, outliers))]
    C_nosink = _matrix(stats[f"{layer_name}:hidden_nosink"], centered)
    eigs["hidden_nosink"] = [sp.eigenvalues(C_nosink)]
    eigs["hidden_apart"] = [sp.eigenvalues(sp.drop_dims(C_nosink, outliers))]
    eigs["hidden_normed"] = [sp.eigenvalues(_matrix(stats[f"{attn_name}:hidden_normed"], centered))]
    d = attn.head_dim
    n_kv = attn.k_proj.out_features // d
    for stream, key in (("Q", "queries"), ("K", "keys"), ("K_pre_rope", "keys_pre_rope"), ("V", "values")):
        eigs[stream] = [sp.eigenvalues(b) for b in sp.block_diagonal(_matrix(stats[f"{attn_name}:{key}"], centered),
                                                                     n_kv)]
    n_rep = attn.q_proj.out_features // (d * n_kv)
    for stream, proj, rows in (("W_q", attn.q_proj, n_rep * d), ("W_k", attn.k_proj, d), ("W_v", attn.v_proj, d)):
        W = proj.weight.detach().double()
        eigs[stream] = [torch.linalg.svdvals(W[g * rows:(g + 1) * rows]).pow(2) for g in range(n_kv)]
    energy = hidden.diag.double()
    extras = {"outlier_dims": outliers.tolist(),
              "outlier_energy_share": float(energy[outliers].sum() / energy.sum().clamp_min(1e-300)),
              "head_dim": d, "kv_groups": n_kv}
    return eigs, extras


def spectrum_report(
    data: TokenDataModule,
    teacher: str = DEFAULT_TEACHER,
    dtype: str = "float32",
    layers: str | list[int] | None = None,
    variance: float = 0.95,
    outlier_ratio: float = 100.0,
    centered: bool = True,
    calibration_tokens: int | None = None,
    output_dir: str = "runs/spectrum",
    device: str | None = None,
    logger: Logger | None = None,
) -> dict:
    """Per-layer eigen-spectra of hidden states, queries, keys and values (and their weights).

    Args:
        data: a recipe DataModule; its calibration split is the data the covariances are taken over.
        teacher: the model (embedded alias, .gguf, directory or hub id); linked to ``data``.
        dtype: the teacher's weight dtype.
        layers: attention modules to analyze: a pattern (``model.layers.{0..5}.self_attn``) or a list of
            layer indices; default every layer.
        variance: the variance target of the k column (k = smallest number of eigenvalues holding it).
        outlier_ratio: a residual dimension whose mean square exceeds this times the median's is an
            outlier (massive activation), set apart in ``hidden_dims_apart`` and ``hidden_apart``.
        centered: covariances (true) or uncentered second moments (false).
        calibration_tokens: cap on calibration tokens (None: the whole calibration split).
        output_dir: where spectrum.{md,json,safetensors,png} go.
        device: where the teacher runs to collect activations (e.g. ``cuda``); spectra run on the CPU in fp64.
        logger: a Lightning logger for the table, chart and metrics (null: none).
    """
    if not 0 < variance <= 1:
        raise ZooError(f"variance must be in (0, 1], got {variance}")
    model, _ = load_causal_lm(teacher, dtype)
    if layers is None:
        pattern = "**"
    elif isinstance(layers, str):
        pattern = layers
    else:
        all_attn = find_targets(model, "**", "attention")
        bad = [i for i in layers if not 0 <= i < len(all_attn)]
        if bad:
            raise ZooError(f"layer indices {bad} are out of range; the model has {len(all_attn)} layers (0..{len(all_attn) - 1})")
        pattern = [all_attn[i] for i in layers]
    names = find_targets(model, pattern, "attention")
    attns = {n: check_supported(n, model.get_submodule(n)) for n in names}
    data.setup("fit")
    entry = Entry("spectrum", version=TAP_VERSION, teacher=teacher, dtype=dtype, layers=names,
                  data=data.fingerprint("calibration"), tokens=calibration_tokens)

    def collect():
        if device is not None:
            model.to(device)
        taps = {n: spectrum_tap for n in names}
        taps.update({n.rpartition(".")[0]: residual_tap for n in names})
        stats = calib.collect(model, data.calibration_dataloader(), [], full_cov_max=1 << 30,
                              max_tokens=calibration_tokens, device=device, progress=sys.stderr.isatty(), taps=taps)
        model.to("cpu")
        return stats

    stats = calib.cached_stats(entry, collect)

    result = {"config": {"teacher": teacher, "dtype": dtype, "variance": variance, "outlier_ratio": outlier_ratio,
                         "centered": centered, "tokens": stats[f"{names[0]}:keys"].count,
                         "data": type(data).__name__},
              "layers": {}}
    eigenvalue_tensors = {}
    for name in names:
        eigs, extras = layer_spectra(name, attns[name], stats, centered, outlier_ratio)
        entry = {**extras, "streams": {}}
        for stream, groups in eigs.items():
            summaries = [sp.summarize(e, variance) for e in groups]
            entry["streams"][stream] = {
                "df": sum(s["df"] for s in summaries) / len(summaries),
                "k": sum(s["k"] for s in summaries) / len(summaries),
                "dim": summaries[0]["dim"], "groups": summaries}
            for g, e in enumerate(groups):
                eigenvalue_tensors[f"{name}.{stream}.{g}"] = e.contiguous()
        result["layers"][name] = entry

    outputs = Outputs(output_dir, "spectrum")
    table = format_table(result)
    print(table)
    outputs.json(result)
    outputs.markdown(table)
    outputs.add(atomic_save(eigenvalue_tensors, outputs.path("safetensors"), {"zoo_format": "spectrum/1"}))
    chart = outputs.chart(plot, result, eigenvalue_tensors)
    print(f"\n{outputs.wrote()}")
    log_result(logger, result, chart)
    return result


def _layer_index(name: str) -> str:
    parts = [p for p in name.split(".") if p.isdigit()]
    return parts[-1] if parts else name


def table_rows(result: dict) -> tuple[list[str], list[list]]:
    """(columns, rows): per layer Df and k of every stream (per-group streams: mean over groups)."""
    target = result["config"]["variance"]
    pct = f"{100 * target:g}"
    streams = [*HIDDEN, *PER_GROUP, *WEIGHTS]
    columns = ["layer", *[c for s in streams for c in (f"{s} Df", f"{s} k{pct}")], "outliers"]
    rows = []
    for name, entry in result["layers"].items():
        cells = [_layer_index(name)]
        for s in streams:
            cells += [entry["streams"][s]["df"], entry["streams"][s]["k"]]
        cells.append(f"{len(entry['outlier_dims'])} ({100 * entry['outlier_energy_share']:.0f}%)")
        rows.append(cells)
    return columns, rows


def format_table(result: dict) -> str:
    columns, rows = table_rows(result)
    c = result["config"]
    first = next(iter(result["layers"].values()))
    lines = [f"eigen-spectra of {c['teacher']} over {c['tokens']} calibration tokens "
             f"({'covariance' if c['centered'] else 'second moment'}): Df = (sum l)^2 / sum l^2 and k for "
             f"{100 * c['variance']:g}% of the variance; hidden (dim {first['streams']['hidden']['dim']}): the residual "
             f"stream, hidden_dims_apart: without the outlier dims (mean square > {c['outlier_ratio']:g}x the "
             "median; 'outliers' = how many and their share of E||x||^2), hidden_nosink: without the tokens at "
             "position 0 (attention sinks), hidden_apart: without both, hidden_normed: the RMSNorm output q/k/v consume; "
             f"Q, K (after RoPE), K_pre_rope, V: per KV-head group (dim {first['head_dim']}, mean over "
             f"{first['kv_groups']} groups); W_*: squared singular values of each group's rows of the projection",
             "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for cells in rows:
        lines.append("| " + " | ".join(x if isinstance(x, str) else (f"{x:.1f}" if isinstance(x, float) else str(x))
                                       for x in cells) + " |")
    return "\n".join(lines)


def plot(result: dict, eigs: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Df and k per layer (log scale) for every stream; cumulative variance curves, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["layers"])
    x = [int(_layer_index(n)) if _layer_index(n).isdigit() else i for i, n in enumerate(names)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, field, label in ((axes[0, 0], "df", "participation ratio Df"),
                             (axes[0, 1], "k", f"k for {100 * result['config']['variance']:g}% variance")):
        for i, stream in enumerate((*HIDDEN, *PER_GROUP, *WEIGHTS)):
            style = "--" if stream.startswith("W_") else "-"
            ax.plot(x, [result["layers"][n]["streams"][stream][field] for n in names], style, marker=".",
                    label=stream, color=plt.get_cmap("tab20")(i))
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    cmap = plt.get_cmap("viridis")
    for ax, stream in zip([axes[0, 2], *axes[1]], ("hidden_normed", "Q", "K", "V")):
        for i, n in enumerate(names):
            curve = sp.cumulative_variance(eigs[f"{n}.{stream}.0"])
            ax.plot(range(1, len(curve) + 1), curve.numpy(), color=cmap(i / max(len(names) - 1, 1)), lw=0.8)
        ax.axhline(result["config"]["variance"], color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_title(f"cumulative variance: {stream}" + ("" if stream.startswith("hidden") else " (group 0)"),
                     fontsize=9)
        ax.set_xlabel("k (color: layer, dark = first)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"eigen-spectra of {result['config']['teacher']}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_result(logger: Logger | None, result: dict, chart: Path) -> None:
    """Metrics per layer to any Lightning logger (None: nothing); the table and the chart too where it takes
    them (W&B)."""
    steps = [(step, {f"spectrum/{s}/{f}": v[f] for s, v in entry["streams"].items() for f in ("df", "k")})
             for step, entry in enumerate(result["layers"].values())]
    log_outputs(logger, hyperparams=result["config"], steps=steps, tables={"spectrum": table_rows(result)},
                images={"spectrum_chart": chart})
