"""Dense teacher vs exported students, side by side in one run (issue 15): parameters, bytes on disk, load
time, peak memory, greedy-generation throughput (prefill and decode separately).

    python benchmarks/export.py                                          # SVD-LLM at 0.8 and 0.5, one PHD recipe
    python benchmarks/export.py --device cuda --dtype bfloat16 --batch 8 --prompt 512 --new 128
    python benchmarks/export.py --tiny                                   # CPU dry run: a tiny random teacher
    python benchmarks/export.py --students int4-g64 int3-g64 --dtype bfloat16 --fp32-reference   # low-bit grids

Each student is built from its recipe (``recipes.recipe.load_recipe``: calibration from the recipe's data, cached; no
repair: repair changes values, not size or speed), written by ``zoo.export.export_model`` in ``--dtype``,
then every directory - the dense teacher saved in the same dtype, and each export - is loaded from disk
with ``zoo.from_pretrained`` and measured the same way:

- load: wall time of ``from_pretrained`` + moving to the device;
- peak memory: CUDA ``max_memory_allocated`` over load + generation (on CPU: the bytes of the loaded
  tensors, since a process-wide RSS peak cannot be split between models measured in one process);
- prefill: one forward over ``batch x prompt`` tokens into an empty KV cache, tokens/s;
- decode: ``new`` greedy tokens one at a time from that cache, tokens/s (batch x new / time).

Prints a table with each student's ratio to the dense teacher (in the same dtype; with ``--fp32-reference`` also
the dense fp32 teacher, measured in the same run); ``--json`` writes the numbers. The low-bit students are
rounded to nearest: rounding decides values, not size or speed.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import timed  # noqa: E402

from zoo.core.compat import cache_kwargs, output_cache  # noqa: E402
from zoo.core.models import load_tokenizer, parse_dtype  # noqa: E402
from zoo.export import export_model, from_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SVDLLM, PHD = str(ROOT / "configs/recipes/compress_svdllm.yaml"), str(ROOT / "configs/recipes/compress_phd.yaml")
INT4 = str(ROOT / "configs/recipes/compress_int4.yaml")
NEAREST = ["--model.init_args.parts.rounding", "nearest", "--model.init_args.calibration", "once"]
#: name -> (recipe, overrides)
STUDENTS = {
    "svdllm-0.8": (SVDLLM, ["--model.init_args.parts.rank", "0.8"]),
    "svdllm-0.5": (SVDLLM, ["--model.init_args.parts.rank", "0.5"]),
    # every MLP map of every layer, blockwise PHD rank 128 (configs/recipes/phd_repair.yaml's
    # one layer is too little to measure)
    "phd-mlp": (PHD, []),
    # every decoder linear on a symmetric grid of 64 (4.25 / 3.25 bits per weight)
    "int4-g64": (INT4, NEAREST),
    "int3-g64": (INT4, [*NEAREST, "--model.init_args.parts.bits", "3"]),
}
def tiny_teacher(root: Path) -> str:
    """A 2-layer random Llama with the embedded teacher's tokenizer (so the recipes' data loads unchanged)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = root / "tiny-teacher"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_exports(args, root: Path) -> dict[str, Path]:
    from recipes.recipe import load_recipe

    dirs = {}
    extra = (["--model.init_args.teacher", args.teacher] if args.teacher else [])
    if args.tiny:
        extra += ["--data.init_args.n_calibration", "2", "--data.init_args.seq_len", "32"]
    for name in args.students:
        recipe, overrides = STUDENTS[name]
        if args.tiny and name.startswith("phd"):
            overrides = [*overrides, "--model.init_args.parts.rank", "16", "--model.init_args.parts.block", "64"]
        t0 = time.perf_counter()
        module = load_recipe(recipe, [*overrides, *extra], device=args.build_device).module
        if name == args.students[0]:
            dirs["dense"] = save_dense(module, root / "dense", args.dtype)
            if args.fp32_reference and args.dtype != "float32":
                dirs["dense-float32"] = save_dense(module, root / "dense-float32", "float32")
        dirs[name] = export_model(module, root / name, dtype=args.dtype)
        print(f"built and exported {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        del module
        gc.collect()
    return dirs


def save_dense(module, path: Path, dtype: str) -> Path:
    """The teacher in ``dtype`` as a plain checkpoint: the student's model object in teacher view, originals only."""
    import copy

    from zoo.core.surgery import replaced_modules, set_module

    model = copy.deepcopy(module.model)
    for name, wrapper in replaced_modules(model).items():
        set_module(model, name, wrapper.original)
    model.config.use_cache = True
    model.to(parse_dtype(dtype)).save_pretrained(path)
    module.tokenizer.save_pretrained(path)
    del model
    return path


def measure(path: Path, args, dtype: str | None = None) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = from_pretrained(path, dtype=dtype or args.dtype).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size - 10, (args.batch, args.prompt), generator=g).to(device)

    def prefill():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=True)

    def decode():
        with torch.inference_mode():
            out = prefill()
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
            for _ in range(args.new):
                out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
                cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)

    prefill_s = timed(prefill, args.steps, 1, device)
    total_s = timed(decode, args.steps, 1, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resident
    return {"parameters": params, "disk_bytes": disk, "load_s": load_s, "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "tensor bytes (CPU)",
            "prefill_tokens_per_s": args.batch * args.prompt / prefill_s,
            "decode_tokens_per_s": args.batch * args.new / max(total_s - prefill_s, 1e-9)}


COLUMNS = [("parameters", "parameters", "{:,.0f}"), ("disk_bytes", "disk MiB", "{:.1f}"), ("load_s", "load s", "{:.2f}"),
           ("peak_memory_bytes", "peak MiB", "{:.1f}"), ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
           ("decode_tokens_per_s", "decode tok/s", "{:.1f}")]


def table(results: dict[str, dict], reference: str = "dense") -> str:
    dense = results[reference]
    head = ["model"] + [label for _, label, _ in COLUMNS]
    rows = [head]
    for name, r in results.items():
        cells = [name]
        for key, _, fmt in COLUMNS:
            value = r[key] / 2**20 if key.endswith("bytes") else r[key]
            ratio = "" if name == reference else f" ({r[key] / dense[key]:.3f}x)"
            cells.append(fmt.format(value) + ratio)
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--build-device", default=None, help="device for calibration (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--teacher", default=None, help="override the recipes' teacher")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--fp32-reference", action="store_true",
                        help="also measure the dense teacher in fp32, and print the ratios to it")
    parser.add_argument("--tiny", action="store_true", help="a tiny random teacher and small sizes (CPU dry run)")
    parser.add_argument("--keep", default=None, help="write the exports here instead of a temp dir")
    parser.add_argument("--json", default=None, help="write the measurements to this JSON file")
    args = parser.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="zoo-export-bench-"))
    if args.keep:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.teacher = args.teacher or tiny_teacher(root)
        args.prompt, args.new, args.steps = min(args.prompt, 16), min(args.new, 4), 1
    try:
        dirs = build_exports(args, root)
        results = {}
        for name, path in dirs.items():
            results[name] = measure(path, args, "float32" if name == "dense-float32" else None)
            gc.collect()  # the model measured last is gone before the next loads
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.device}, {args.dtype}, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens "
          f"(ratios: student / dense)")
    print(table(results))
    if "dense-float32" in results:
        print("\nratios to the dense fp32 teacher")
        print(table(results, "dense-float32"))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
