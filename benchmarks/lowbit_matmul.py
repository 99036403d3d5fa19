"""A decoder linear at decode time: dense fp32 and bf16 against a 4-bit grid through torch's int4 weight-only CPU
kernel (what an exported ``zoo.Quantize`` student runs in bf16, ``zoo/export/modeling_zoo.py``), side by side in
one run, on the embedded teacher's shapes and Llama-3.2-1B's.

    python benchmarks/lowbit_matmul.py                        # batch 1 and 8, one thread
    python benchmarks/lowbit_matmul.py --threads 2 --json experiments/frontier-lowbit/matmul.json

The three are timed in turn, round after round, and each figure is the median of its rounds: a load that comes and
goes on the machine falls on all three alike. Ratios are the dense fp32 time over each one's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.export.modeling_zoo import int4_operands  # noqa: E402
from zoo.core.lowbit import Grid, grid_params, pack, quantize  # noqa: E402

#: (model, map, out, in)
SHAPES = [("embedded", "q/o", 576, 576), ("embedded", "k/v", 192, 576), ("embedded", "gate/up", 1536, 576),
          ("embedded", "down", 576, 1536), ("1b", "q/o", 2048, 2048), ("1b", "k/v", 512, 2048),
          ("1b", "gate/up", 8192, 2048), ("1b", "down", 2048, 8192)]


def operands(out: int, inn: int, group: int):
    W = torch.randn(out, inn, dtype=torch.float64, generator=torch.Generator().manual_seed(out * inn))
    grid = Grid(4, group, True)
    scales, zeros = grid_params(W, grid)
    codes = quantize(W, scales, zeros, grid)
    op = {"t": "w", "bits": 4, "group": group, "in": inn, "symmetric": True}
    stored = {"w_codes": pack(codes, 4), "w_scales": scales.half()}
    packed, scale_zeros = int4_operands(op, stored.__getitem__, torch.bfloat16)
    return W.float(), packed, scale_zeros


def rounds(fns: dict, n: int, reps: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(n):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            times[k].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for model, name, out, inn in SHAPES:
        W, packed, scale_zeros = operands(out, inn, args.group)
        W16 = W.bfloat16()
        for b in args.batch:
            x = torch.randn(b, inn)
            x16 = x.bfloat16()
            with torch.inference_mode():
                t = rounds({"fp32": lambda: torch.nn.functional.linear(x, W),
                            "bf16": lambda: torch.nn.functional.linear(x16, W16),
                            "int4": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed, args.group,
                                                                                        scale_zeros)},
                           args.rounds, args.reps)
            rows.append({"model": model, "map": name, "out": out, "in": inn, "batch": b,
                         **{f"{k}_us": v * 1e6 for k, v in t.items()},
                         "bf16_speedup": t["fp32"] / t["bf16"], "int4_speedup": t["fp32"] / t["int4"]})
    print(f"one decoder linear, {args.threads} thread(s), 4-bit symmetric groups of {args.group}; speed-up over dense fp32")
    print(f"{'model':<9}{'map':<9}{'out x in':>12}{'batch':>6}{'fp32 us':>10}{'bf16 us':>10}{'int4 us':>10}"
          f"{'bf16 x':>8}{'int4 x':>8}")
    for r in rows:
        print(f"{r['model']:<9}{r['map']:<9}{str(r['out']) + 'x' + str(r['in']):>12}{r['batch']:>6}{r['fp32_us']:>10.1f}"
              f"{r['bf16_us']:>10.1f}{r['int4_us']:>10.1f}{r['bf16_speedup']:>8.2f}{r['int4_speedup']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "torch": torch.__version__, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
