"""``zoo speed``: does the student decode faster than its teacher? (TINY_COMPRESS; ZOMBORG, source 000, section 2:
the bytes a compressed student saves are worth shipping when they turn into speed.)

The recipe's student (with its repair state) is exported as ``zoo export`` writes it, loaded back as a user loads
it (``zoo.from_pretrained``, programs fused), and timed against its dense teacher loaded in the same dtype, side by
side in one process (``zoo.export.speed.measure``: interleaved, so load from other jobs falls on both alike):
prefill and greedy-decode tokens/s, the speedups, the bytes ratio and the fraction of the bytes limit reached.

    zoo speed --recipe configs/recipes/compress_int4.yaml --repair_state runs/compress_int4/repair_state.safetensors
    zoo speed --recipe configs/recipes/compress_svdllm.yaml --dtype bfloat16 --new 64
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

from zoo.core.errors import ZooError, check_at_least, check_choice

DTYPES = ("float32", "bfloat16")
KERNELS = ("stock", "onednn")


def speed(
    recipe: str,
    repair_state: str | None = None,
    overrides: list[str] = [],
    dtype: str = "float32",
    batch: int = 1,
    prompt: int = 32,
    new: int = 32,
    rounds: int = 3,
    threads: int | None = None,
    kernel: str = "stock",
    output_dir: str = "runs/speed",
    output: str | None = None,
) -> dict:
    """Prefill and decode tokens/s of a recipe's exported student against its dense teacher.

    Args:
        recipe: the recipe YAML that built the student (a run's ``config.yaml`` too).
        repair_state: the repair state loaded into the student (none: the unrepaired student; speed is the same).
        overrides: extra recipe options, e.g. ``['--model.init_args.parts.bits', '3']``.
        dtype: the dtype both models are loaded and run in: ``float32`` or ``bfloat16``.
        batch: sequences decoded at once.
        prompt: prompt tokens (prefilled into an empty cache).
        new: greedy tokens each model decodes per round.
        rounds: interleaved rounds (prefill: the best; decode: the median step over all).
        threads: torch threads (default: torch's; 1 keeps a shared CPU's figures steadier).
        kernel: ``stock`` (``F.linear``, as transformers runs the teacher) or ``onednn``: both models run oneDNN's
            linear on weights reordered once (``zoo.export.modeling_zoo.pack_model``; CPU inference only).
        output_dir: where the results JSON goes.
        output: the results JSON (default: ``<output_dir>/<recipe>-<dtype>.json``).
    """
    check_choice("dtype", dtype, DTYPES)
    check_choice("kernel", kernel, KERNELS)
    if kernel == "onednn":
        import torch

        from zoo.export.modeling_zoo import onednn_available

        if not onednn_available(getattr(torch, dtype)):
            raise ZooError(f"kernel='onednn': this torch or CPU has no oneDNN {dtype} linear; use kernel='stock'")
    check_at_least(1, batch=batch, prompt=prompt, new=new, rounds=rounds, threads=threads)
    from zoo.core.cache import check_writable

    path = Path(output) if output else Path(output_dir) / f"{Path(recipe).stem}-{dtype}.json"
    check_writable(path.parent, "output directory")
    import torch

    from zoo.core.models import load_causal_lm
    from zoo.export import export_model, from_pretrained
    from zoo.export.modeling_zoo import pack_model
    from zoo.export.speed import measure, relate

    from .frontier_report import hardware
    from .lightning_cli import git_commit
    from .recipe import load_recipe
    from .report import Outputs

    if threads:
        torch.set_num_threads(threads)
    module = load_recipe(recipe, list(overrides), repair_state).module
    teacher = module.teacher
    with tempfile.TemporaryDirectory(prefix="zoo-speed-") as tmp:
        student = from_pretrained(export_model(module, Path(tmp) / "student", dtype=dtype))
    del module  # the training-side student: only the shipped one is timed
    dense = load_causal_lm(teacher, dtype)[0].eval()
    if kernel == "onednn":
        pack_model(student)
        pack_model(dense)
    rows = relate(measure({"dense": dense, "student": student}, Path(recipe).stem, dtype, [batch], rounds, prompt, new))
    row = rows[-1]
    result = {"format": "zoo.speed/1", "recipe": recipe, "repair_state": repair_state, "overrides": list(overrides),
              "teacher": teacher, "dtype": dtype, "kernel": kernel, "threads": torch.get_num_threads(), "commit": git_commit(),
              "hardware": hardware(), "rows": rows,
              **{k: row[k] for k in ("decode_speedup", "prefill_speedup", "bytes_ratio", "decode_of_limit",
                                      "decode_tokens_per_s")},
              "dense_decode_tokens_per_s": rows[0]["decode_tokens_per_s"]}
    print(f"zoo speed: {row['bytes_ratio']:.3f} x the teacher's bytes; decode {row['decode_tokens_per_s']:.1f} tok/s "
          f"vs {rows[0]['decode_tokens_per_s']:.1f} dense ({row['decode_speedup']:.2f}x, {row['decode_of_limit']:.2f} "
          f"of the bytes limit), prefill {row['prefill_speedup']:.2f}x ({dtype}, batch {batch}, "
          f"{result['threads']} thread(s), {kernel} kernels)")
    outputs = Outputs(path.parent, re.sub(r"\.json$", "", path.name))
    outputs.json(result, name=path.name)
    print(outputs.wrote())
    return result
