"""Forward time of ``BlockwisePHDLinear`` vs the dense ``nn.Linear`` it replaces, side by side in one run.

    python benchmarks/phd_forward.py                     # GPU: bf16, 16k tokens; CPU: fp32, 2k tokens
    python benchmarks/phd_forward.py --tokens 16384 --dtype bfloat16

Shapes: the embedded teacher's down_proj (1536 -> 576) and Llama-3.1-8B's (14336 -> 4096), rank 64,
block 512. Variants of the PHD layer: ``rows`` (frame rows as dense [r, n] buffers: 2 n r multiply-adds
per token), ``transform`` (block-Hadamard as a batched matmul + gather/scatter: ~n b per token) and
``butterfly`` (the O(n log b) FWHT), and ``kernel`` (the block-Hadamard through the CUDA kernel of
``fast-hadamard-transform``, where it is installed). Prints each variant's time over the dense layer's
(ratio < 1: the structured layer is faster), the variant ``compute="auto"`` takes, and then the
block-Hadamard transform alone at each frame's width, per method, with the fastest one picked per
shape. On CUDA, times come from CUDA events after warm-up; on CPU only ratios mean anything.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from zoo.core.hadamard import PHDFrame, block_hadamard, fit_block, kernel_unavailable
from zoo.phd import BlockwisePHDLinear, Subframe, resolve_compute

from common import timed, write_json

SHAPES = {"smollm2-135m down_proj": (1536, 576), "llama-3.1-8b down_proj": (14336, 4096)}


def phd_layer(n_in: int, n_out: int, rank: int, block: int, compute: str, method: str = "auto") -> BlockwisePHDLinear:
    g = torch.Generator().manual_seed(0)
    sides = []
    for n, seed in ((n_in, 1), (n_out, 2)):
        frame = PHDFrame(n, block, seed, method=method)
        index = torch.sort(torch.randperm(frame.n_pad, generator=g)[:rank]).values
        sides.append(Subframe(frame.rows(index), frame, index, compute))
    return BlockwisePHDLinear(sides[0], torch.randn(rank, rank, generator=g) / rank**0.5, sides[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--tokens", type=int, default=16384 if cuda else 2048)
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20 if cuda else 5)
    ap.add_argument("--warmup", type=int, default=5 if cuda else 1)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE",
                    help=f"down_proj shapes to time (default: all of {', '.join(map(repr, SHAPES))})")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file, after each row")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    no_kernel = kernel_unavailable() if device.type == "cuda" else "not a CUDA run"
    variants = [("rows", "rows", "auto"), ("transform", "transform", "matmul"), ("butterfly", "transform", "butterfly")]
    if no_kernel is None:
        variants.append(("kernel", "transform", "kernel"))
    out = {"device": name, "tokens": args.tokens, "dtype": args.dtype, "rank": args.rank, "block": args.block,
           "auto": resolve_compute("auto", args.rank, args.block), "kernel_unavailable": no_kernel,
           "rows": [], "hadamard": []}
    print(f"device {name}, {args.tokens} tokens, {args.dtype}, rank {args.rank}, block {args.block}; "
          f"compute='auto' takes {out['auto']}; Hadamard kernel: {no_kernel or 'available'}")
    print(f"{'shape':<26} {'variant':<10} {'time (ms)':>10} {'vs dense':>9}")
    for label in args.shapes:
        n_in, n_out = SHAPES[label]
        x = torch.randn(args.tokens, n_in, device=device, dtype=dtype)
        dense = nn.Linear(n_in, n_out, bias=False).to(device, dtype)
        with torch.no_grad():  # forward only, as at inference
            base = timed(lambda: dense(x), args.steps, args.warmup, device)
            print(f"{label:<26} {'dense':<10} {base * 1e3:>10.3f} {1.0:>9.3f}")
            for variant, compute, method in variants:
                layer = phd_layer(n_in, n_out, args.rank, args.block, compute, method).to(device, dtype)
                t = timed(lambda: layer(x), args.steps, args.warmup, device)
                print(f"{label:<26} {variant:<10} {t * 1e3:>10.3f} {t / base:>9.3f}")
                out["rows"].append({"shape": label, "variant": variant, "seconds": t, "dense_seconds": base,
                                    "ratio": t / base})
                write_json(args.json, out)
        del x, dense
    hadamard_picks(args, variants, device, dtype, out)


def hadamard_picks(args, variants, device, dtype, out):
    """The block-Hadamard transform alone at every frame width of the shapes, per method: which to use."""
    methods = [m for _, compute, m in variants if compute == "transform"]
    print(f"\n{'frame width':>11} {'block':>6} " + " ".join(f"{m + ' (ms)':>15}" for m in methods) + "  fastest")
    widths = sorted({n for label in args.shapes for n in SHAPES[label]})
    with torch.no_grad():
        for n in widths:
            block, n_pad = fit_block(n, args.block)
            y = torch.randn(args.tokens, n_pad, device=device, dtype=dtype)
            times = {m: timed(lambda: block_hadamard(y, block, m), args.steps, args.warmup, device) for m in methods}
            pick = min(times, key=times.get)
            out["hadamard"].append({"width": n, "block": block, "seconds": times, "pick": pick})
            write_json(args.json, out)
            print(f"{n:>11} {block:>6} " + " ".join(f"{times[m] * 1e3:>15.3f}" for m in methods) + f"  {pick}")
            del y


if __name__ == "__main__":
    main()
