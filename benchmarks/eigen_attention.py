"""EigenAttention vs the original attention: latency and KV-cache memory at long context, side by side.

    python benchmarks/eigen_attention.py                                   # GPU: Llama-3.1-8B attention shapes
    python benchmarks/eigen_attention.py --seqs 8192 16384 32768 --batch 4 --k-keys 64 --k-values 64
    python benchmarks/eigen_attention.py --shape smollm2 --seqs 256 512 --batch 2   # CPU-sized check

One attention layer of the chosen shapes (random weights: latency and memory depend on shapes, not
values), the library's own ``LlamaAttention`` (sdpa) against ``EigenAttentionLayer`` built on the same
layer with orthonormal projectors of the given k, both fed the same hidden states, rotary embeddings and
a ``DynamicCache``:

- prefill: the forward over ``batch x seq`` tokens into an empty cache;
- decode: one token appended to a cache already holding ``seq`` tokens (the cache is cropped back after
  each step so every step sees the same length);
- KV cache: bytes the cache holds after the prefill (measured from its tensors), and peak memory of a
  prefill on CUDA.

Prints each measurement and the ratio EigenAttention / original. On CUDA: bf16, CUDA-event timings after
warm-up. On CPU: fp32 and small sizes; only the ratios mean anything there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import peak_gib, timed, write_json  # noqa: E402

from zoo.eigen_attention import EigenAttentionLayer, cache_bytes  # noqa: E402

SHAPES = {
    # hidden, query heads, KV heads, head_dim
    "llama3-8b": (4096, 32, 8, 128),
    "smollm2": (576, 9, 3, 64),
}


def build_layers(shape: str, k_keys: int, k_values: int, dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    hidden, heads, kv_heads, head_dim = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, intermediate_size=4 * hidden, num_hidden_layers=1,
                         max_position_embeddings=1 << 17, rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    original = LlamaAttention(config, layer_idx=0).to(device, dtype).eval()
    g = torch.Generator().manual_seed(0)

    def projector(k):
        return torch.linalg.qr(torch.randn(kv_heads, head_dim, head_dim, generator=g, dtype=torch.float64))[0][..., :k]

    eigen = EigenAttentionLayer(original, projector(k_keys).to(device, dtype), projector(k_values).to(device, dtype),
                                trainable=False).eval()
    rotary = LlamaRotaryEmbedding(config).to(device)
    return config, original, eigen, rotary


@torch.no_grad()
def measure(layer, config, rotary, batch: int, seq: int, steps: int, warmup: int, dtype, device) -> dict:
    from transformers import DynamicCache

    from zoo.core.compat import cache_kwargs

    g = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(batch, seq, config.hidden_size, generator=g) * 0.5).to(device, dtype)
    x1 = (torch.randn(batch, 1, config.hidden_size, generator=g) * 0.5).to(device, dtype)
    positions = torch.arange(seq, device=device)[None].expand(batch, -1)
    pos_emb = rotary(x, positions)
    pos_emb1 = rotary(x1, torch.full((batch, 1), seq, device=device))

    def prefill():
        cache = DynamicCache(config=config)
        layer(x, position_embeddings=pos_emb, attention_mask=None, **cache_kwargs(layer, cache))
        return cache

    prefill_time = timed(prefill, steps, warmup, device)
    prefill_peak = peak_gib(prefill, device)
    cache = prefill()
    kv_bytes = cache_bytes(cache)

    def decode():
        layer(x1, position_embeddings=pos_emb1, attention_mask=None, **cache_kwargs(layer, cache))
        cache.crop(-1)  # back to seq tokens: every step sees the same cache length

    decode_time = timed(decode, steps * 10, warmup * 10, device)
    return {"prefill_s": prefill_time, "decode_s": decode_time, "kv_bytes": kv_bytes, "prefill_peak_gib": prefill_peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default=None,
                    help="attention shapes (default: llama3-8b on CUDA, smollm2 on CPU)")
    ap.add_argument("--seqs", type=int, nargs="+", default=None,
                    help="context lengths (default: 8192 16384 32768 on CUDA, 256 512 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 on CUDA, 2 on CPU")
    ap.add_argument("--k-keys", type=int, default=None, help="k_K (default: head_dim / 2)")
    ap.add_argument("--k-values", type=int, default=None, help="k_V (default: head_dim / 2)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--json", default=None, help="also write the measurements to this JSON file, after each seq")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    shape = args.shape or ("llama3-8b" if cuda else "smollm2")
    seqs = args.seqs or ([8192, 16384, 32768] if cuda else [256, 512])
    batch = args.batch or (4 if cuda else 2)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    head_dim = SHAPES[shape][3]
    k_keys, k_values = args.k_keys or head_dim // 2, args.k_values or head_dim // 2
    for name, k in (("--k-keys", k_keys), ("--k-values", k_values)):
        if not 1 <= k <= head_dim:
            ap.error(f"{name} {k} is out of range: it must be between 1 and head_dim = {head_dim}")
    config, original, eigen, rotary = build_layers(shape, k_keys, k_values, dtype, device)

    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name}; {dtype}; attention shapes {shape} (hidden, heads, KV heads, head_dim) = {SHAPES[shape]}; "
          f"batch {batch}; k_K {k_keys}, k_V {k_values} of head_dim {head_dim}")
    header = (f"{'seq':>7} | {'prefill ms orig':>15} {'eigen':>9} {'ratio':>6} | {'decode ms orig':>14} {'eigen':>8} "
              f"{'ratio':>6} | {'KV MiB orig':>11} {'eigen':>8} {'ratio':>6} | {'peak GiB ratio':>14}")
    print(header)
    print("-" * len(header))
    out = {"device": name, "dtype": str(dtype), "shape": shape, "batch": batch, "k_keys": k_keys,
           "k_values": k_values, "head_dim": head_dim, "seqs": []}
    for seq in seqs:
        a = measure(original, config, rotary, batch, seq, args.steps, args.warmup, dtype, device)
        b = measure(eigen, config, rotary, batch, seq, args.steps, args.warmup, dtype, device)
        out["seqs"].append({"seq": seq, "original": a, "eigen": b})
        write_json(args.json, out)
        peak = f"{b['prefill_peak_gib'] / a['prefill_peak_gib']:.3f}" if a["prefill_peak_gib"] else "n/a (cpu)"
        print(f"{seq:>7} | {a['prefill_s'] * 1e3:>15.2f} {b['prefill_s'] * 1e3:>9.2f} {b['prefill_s'] / a['prefill_s']:>6.3f} | "
              f"{a['decode_s'] * 1e3:>14.3f} {b['decode_s'] * 1e3:>8.3f} {b['decode_s'] / a['decode_s']:>6.3f} | "
              f"{a['kv_bytes'] / 2**20:>11.1f} {b['kv_bytes'] / 2**20:>8.1f} {b['kv_bytes'] / a['kv_bytes']:>6.3f} | "
              f"{peak:>14}")
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
