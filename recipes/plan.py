"""``zoo plan``: size a recipe on a model without loading its weights (issue 9, "zoo plan").

The recipe is parsed and instantiated as ``zoo fit`` does (``recipes.recipe.load_recipe``), with the
teacher replaced by ``meta:<model>``: the model is built from its config on the meta device, so an
8B model costs a second and no memory. Each technique sizes its replacements from shapes
(``Technique.footprint``); ``zoo.core.plan`` counts parameters and estimates the peak memory per GPU of
one repair step (its docstring gives the formula). Output: a table on stdout and a JSON.

    zoo plan --recipe configs/recipes/coupled_core.yaml --model meta-llama/Llama-3.1-8B --dtype bfloat16 \\
        --batch_size 4 --seq_len 2048 --strategy '[ddp, fsdp]' --devices '[1, 8]'
"""
from __future__ import annotations

import re
from pathlib import Path

from zoo.core.errors import ZooError


def plan_recipe(
    recipe: str,
    model: str | None = None,
    dtype: str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    precision: str = "bf16-mixed",
    strategy: str | list[str] = "ddp",
    devices: int | list[int] = 1,
    overrides: list[str] | None = None,
    output: str | None = None,
) -> dict:
    """Parameter counts, repair-state size and a per-GPU peak-memory estimate of a recipe on a model.

    Args:
        recipe: a recipe YAML (as for ``zoo fit``), any technique or ``zoo.Composite``.
        model: the model to size: an embedded alias, a ``config.json``, a directory with one, or a hub id
            (only its config is read). Default: the recipe's teacher.
        dtype: the dtype the weights are loaded in (``float32``, ``bfloat16``, ``float16``); default: the
            recipe's ``dtype``.
        batch_size: sequences per GPU per step; default: the recipe's data ``batch_size``.
        seq_len: tokens per sequence; default: the recipe's data ``seq_len``.
        precision: Lightning precision: ``bf16-mixed``, ``bf16-true``, ``16-mixed``, ``16-true``, ``32-true``.
        strategy: ``ddp`` or ``fsdp`` (one decoder layer per FSDP unit), or a list of them.
        devices: GPUs (one or a list): each (strategy, devices) pair gets a column.
        overrides: extra recipe options, e.g. ``['--model.init_args.parts.rank', '32']``.
        output: the JSON path (default: ``runs/plan/<recipe>-<model>.json``).
    """
    # here, not at the top: ``zoo plan --help`` reads only this signature, and these import torch
    from zoo.core import plan as zp
    from zoo.core.models import META_PREFIX, parse_dtype

    from .recipe import load_recipe
    from .report import Outputs

    extra = list(overrides or [])
    if model:
        extra += ["--model.init_args.teacher", model]
    if dtype:
        extra += ["--model.init_args.dtype", dtype]
    loaded = load_recipe(recipe, extra, build=False, meta=True)  # no trainer: an 8-GPU recipe plans on a laptop
    module, data = loaded.module, loaded.data
    load_dtype = parse_dtype(module.dtype_name)
    batch_size = batch_size or getattr(data, "batch_size", None)
    seq_len = seq_len or getattr(data, "seq_len", None)
    if not batch_size or not seq_len:
        raise ZooError("give --batch_size and --seq_len: the recipe's data module has no batch_size/seq_len")
    strategies = [strategy] if isinstance(strategy, str) else list(strategy)
    counts = [devices] if isinstance(devices, int) else list(devices)
    model_dtype = zp.precision_dtypes(precision, load_dtype)[0]

    resolved = module.resolve_targets()
    student = zp.plan_student(module.model, module.parts, resolved, model_dtype)
    memory = [zp.estimate_peak_memory(module.model, student, module.parts, resolved, load_dtype=load_dtype,
                                      batch_size=batch_size, seq_len=seq_len, precision=precision, strategy=s,
                                      devices=n, kl_chunk=module.kl_chunk,
                                      fused_head=module.fused_lm_head() is not None)
              for s in strategies for n in counts]
    tokens = getattr(data, "n_calibration", 0) * seq_len
    if module.calibration_tokens:
        tokens = min(tokens, module.calibration_tokens) if tokens else module.calibration_tokens
    calib = zp.estimate_calibration_memory(module.model, student, module.parts, resolved,
                                           module.student.calibration, tokens, batch_size, seq_len,
                                           module.student.full_cov_max, load_dtype)
    config = module.model.config
    result = {
        "recipe": str(recipe), "model": module.teacher.removeprefix(META_PREFIX), "technique": module.technique_name(),
        "parts": [p.describe() for p in module.parts],
        "architecture": {"model_type": getattr(config, "model_type", None), **zp.decoder_dims(config),
                         "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False))},
        "parameters": {
            "model": student.model_parameters, "replaced_original": student.original,
            "replacement": sum(t.replacement for t in student.targets), "trainable": student.trainable,
            "frozen_replacement": sum(t.frozen for t in student.targets),
            "merged": sum(t.merged for t in student.targets),
            "rebuilt_buffers": sum(t.buffer for t in student.targets), "student": student.student_parameters,
        },
        "bytes": {"model_dtype": str(model_dtype).removeprefix("torch."),
                  "model_weights": student.model_parameter_bytes, "repair_state": student.repair_state_bytes,
                  "frozen_factors": sum(t.frozen_bytes for t in student.targets),
                  "rebuilt_buffers": sum(t.buffer_bytes for t in student.targets)},
        "targets": [{**vars(t), "replacement": t.replacement} for t in student.targets],
        "memory": [m.to_dict() for m in memory],
        "calibration": calib.to_dict(),
        "notes": [*student.notes, ("memory figures are estimates (zoo.core.plan gives the formula), not "
                  "measurements; CUDA context and allocator fragmentation come on top")],
    }
    print(format_table(result))
    path = Path(output) if output else default_output(recipe, result["model"])
    outputs = Outputs(path.parent, path.stem)
    outputs.json(result, name=path.name)
    print(f"\n{outputs.wrote()}")
    return result


def default_output(recipe: str, model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{Path(recipe).stem}-{Path(model).name if model.endswith('.json') else model}")
    return Path("runs") / "plan" / f"{slug.strip('_')[:120]}.json"


def _n(x: int) -> str:
    return f"{x:,}"


def _b(x: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{int(x)} B"


def format_table(result: dict) -> str:
    a, p, b = result["architecture"], result["parameters"], result["bytes"]
    lines = [f"zoo plan: {result['recipe']} ({result['technique']}) on {result['model']}",
             (f"  {a['model_type']}: {a['layers']} layers, hidden {a['hidden']}, intermediate {a['intermediate']}, "
             f"heads {a['heads']}/{a['kv_heads']} kv, vocab {a['vocab']}; tensors sized in {b['model_dtype']}"),
             "", "parameters"]
    rows = [("model (teacher)", _n(p["model"]), _b(b["model_weights"])),
            (f"replaced originals ({len(result['targets'])} target{'s' * (len(result['targets']) != 1)})", _n(p["replaced_original"]), ""),
            ("replacements", _n(p["replacement"]), ""),
            ("  trainable", _n(p["trainable"]), _b(b["repair_state"]) + " (repair state)"),
            ("  frozen factors", _n(p["frozen_replacement"]), _b(b["frozen_factors"])),
            *([("  merged on export (factor LoRA)", "-" + _n(p["merged"]), "")] if p.get("merged") else []),
            ("rebuilt buffers (not saved)", _n(p["rebuilt_buffers"]), _b(b["rebuilt_buffers"])),
            ("student (exported)", _n(p["student"]), f"{p['student'] / p['model']:.4f} x model")]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {r[0]:<{width}}  {r[1]:>15}  {r[2]}" for r in rows]
    lines += ["", "per target"]
    head = ("target", "part", "original", "replacement", "trainable", "frozen", "buffers")
    groups: dict[tuple, list[str]] = {}
    for t in result["targets"]:
        key = (t["part"], t["original"], t["replacement"], t["trainable"], t["frozen"], t["buffer"])
        groups.setdefault(key, []).append(t["name"])
    table = [head]
    for key, names in groups.items():
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} (x{len(names)})"
        table.append((label, key[0], *map(_n, key[1:])))
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    for r in table:
        lines.append("  " + "  ".join(f"{v!s:<{widths[i]}}" if i < 2 else f"{v!s:>{widths[i]}}"
                                      for i, v in enumerate(r)))
    mem = result["memory"]
    s = mem[0]["settings"]
    lines += ["", (f"peak memory per GPU, one repair step (ESTIMATE): batch {s['batch_size']} x {s['seq_len']} "
              f"per GPU, {s['precision']} (weights {s['model_dtype']}, compute {s['compute_dtype']}), "
              f"KL chunk {s['kl_chunk']}, {s['recorded_layers']} recorded layers (from layer "
              f"{s['first_recorded_layer']})")]
    cols = [f"{m['settings']['strategy']} x{m['settings']['devices']}" for m in mem]
    terms = [("weights", "weights"), ("grads + AdamW", "training_state"), ("activations", "activations"),
             ("logits + KL", "logits"), ("peak", "peak")]
    width = max(len(t[0]) for t in terms)
    lines.append("  " + " " * width + "".join(f"{c:>13}" for c in cols))
    for label, key in terms:
        lines.append(f"  {label:<{width}}" + "".join(f"{_b(m[key]):>13}" for m in mem))
    c = result["calibration"]
    lines += ["", (f"calibration peak (ESTIMATE, {c['calibration']}, {c['tokens']:,} tokens): {_b(c['peak'])} = "
                   f"weights {_b(c['weights'])} + statistics {_b(c['statistics'])}"
                   f"{' (one layer)' if c['calibration'] == 'sequential' else ' (every target)'} + hidden states "
                   f"{_b(c['hidden_states'])} + one layer's forward {_b(c['forward'])}")]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
