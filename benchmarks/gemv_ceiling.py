"""The decode speedup a low-rank student could reach if a step were nothing but its weight reads (issue 26): the
matmuls of one batch-1 decode step of a model with Llama-3.2-1B's shapes, dense against SVD-LLM factors of rank
``ratio * in * out / (in + out)`` (sigma folded in: two matmuls per map), the tied lm_head kept dense in both,
timed side by side in one process, cache-cold (16 layers of distinct random tensors), one thread, per kernel:

- ``stock``: ``F.linear`` on ``[out, in]`` weights, as transformers runs a dense model; in fp32 a factor with fewer
  inputs than outputs is stored ``[in, out]`` and run as ``x @ T``, as a fused export runs it (``fuse_zoo``);
- ``onednn``: oneDNN's linear on weights reordered once (``zoo.export.modeling_zoo.pack_model``'s kernel).

The rest of a real step (attention over the cache, norms, rotary, Python) costs the dense model and the student
alike, so a whole model's decode speedup stays below this ceiling; ``benchmarks/export_speed.py`` measures that.

    python benchmarks/gemv_ceiling.py                 # bf16 and fp32, ratios 0.8 and 0.5
    python benchmarks/gemv_ceiling.py --quick         # tiny shapes, seconds (a CPU dry run; tested)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.nn import functional as F

KERNELS = ("stock", "onednn")
#: Llama-3.2-1B: hidden 2048, intermediate 8192, 512-wide K/V, 16 layers, vocab 128256 (tied)
SHAPES = dict(hidden=2048, intermediate=8192, kv=512, layers=16, vocab=128256)
QUICK = dict(hidden=64, intermediate=256, kv=32, layers=2, vocab=512)


def maps(s: dict) -> list[tuple[int, int]]:
    """(in, out) of one layer's seven linear maps."""
    h, i, kv = s["hidden"], s["intermediate"], s["kv"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def step(weights: list[list[list[tuple]]], head: torch.Tensor, x: dict, linear) -> None:
    """One decode step's matmuls: every layer's maps (one weight, or two factors, each a (tensor, inputs, stored
    ``[out, in]``) triple), then the head."""
    for layer in weights:
        for chain in layer:
            y = x[chain[0][1]]
            for w, _, out_in in chain:
                y = linear(y, w, out_in)
    linear(x[head.shape[-1]], head, True)


def run(dtype: torch.dtype, ratios: list[float], s: dict, rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(dtype)  # noqa: E731

    def factor(i: int, o: int, student: bool) -> tuple:
        out_in = not (student and dtype == torch.float32 and i < o)  # the fused export's layout (fuse_zoo)
        return (randn(o, i) if out_in else randn(i, o), i, out_in)

    models = {"dense": [[[factor(i, o, False)] for i, o in maps(s)] for _ in range(s["layers"])]}
    for ratio in ratios:
        rank = lambda i, o: max(1, int(ratio * i * o / (i + o)))  # noqa: E731
        models[f"svdllm-{ratio:g}"] = [[[factor(i, rank(i, o), True), factor(rank(i, o), o, True)] for i, o in maps(s)]
                                      for _ in range(s["layers"])]
    head = randn(s["vocab"], s["hidden"])
    x = {n: randn(1, n) for n in {s["hidden"], s["intermediate"]}}
    numbers = {name: sum(w.numel() for layer in m for c in layer for w, _, _ in c) + head.numel()
               for name, m in models.items()}
    rows, size = [], head.element_size()
    for kernel in KERNELS:
        if kernel == "onednn":
            if not torch.backends.mkldnn.is_available():
                continue
            pack = lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None)  # noqa: E731
            linear = lambda y, w, _: torch.ops.mkldnn._linear_pointwise(y, w, None, "none", [], "")  # noqa: E731
            for m in models.values():  # in place (stock ran first): one copy of the weights in memory
                for layer in m:
                    for chain in layer:
                        chain[:] = [(pack(w if out_in else w.T.contiguous()), i, True) for w, i, out_in in chain]
            head = pack(head)
        else:
            linear = lambda y, w, out_in: F.linear(y, w) if out_in else y @ w  # noqa: E731
        times = {name: [] for name in models}
        with torch.inference_mode():
            for _ in range(rounds):  # interleaved: load from other jobs falls on every model alike
                for name, weights in models.items():
                    t0 = time.perf_counter()
                    step(weights, head, x, linear)
                    times[name].append(time.perf_counter() - t0)
        dense = statistics.median(times["dense"])
        for name, t in times.items():
            median = statistics.median(t)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "kernel": kernel, "student": name,
                         "bytes_ratio": numbers[name] / numbers["dense"], "step_ms": median * 1e3,
                         "gb_per_s": numbers[name] * size / median / 1e9,
                         "ceiling_speedup": dense / median})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.5])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a dry run in seconds")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtypes:
        rows += run(getattr(torch, dtype), args.ratios, QUICK if args.quick else SHAPES, 2 if args.quick else args.rounds)
    print("| dtype | kernel | student | bytes ratio | limit | step ms | GB/s | ceiling x dense |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dtype']} | {r['kernel']} | {r['student']} | {r['bytes_ratio']:.3f} | {1 / r['bytes_ratio']:.2f} | "
              f"{r['step_ms']:.1f} | {r['gb_per_s']:.1f} | {r['ceiling_speedup']:.2f} |")
    if args.output:
        with open(args.output, "w") as f:
            command = " ".join(argv if argv is not None else sys.argv[1:])
            json.dump({"command": f"python benchmarks/gemv_ceiling.py {command}", "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
