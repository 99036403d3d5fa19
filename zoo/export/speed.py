"""Decode speed against the dense teacher (TINY_COMPRESS and ZOMBORG, source 000, section 2: a compressed student
is worth shipping when its bytes turn into speed; batch-1 decoding reads every weight once per token, so its
limit is the dense bytes over the student's).

``measure`` times models side by side in one process, interleaved so that load from other jobs falls on all of
them alike: in each round every model prefills in turn, then every model takes its decode steps in turn, one
step each. Prefill is the best round; decode the median step over all rounds (and the best), after one untimed
step per round. ``relate`` puts each row against the dense row of its model, dtype and batch: speedups, the
bytes ratio and the fraction of the bytes limit reached. ``benchmarks/export_speed.py`` and ``zoo speed`` (and
through it ``zoo frontier``) measure with them.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..core.compat import cache_kwargs, output_cache


def resident_bytes(model: torch.nn.Module) -> int:
    """The bytes of a model's tensors, each storage once (tied embeddings count once): what a decode step reads."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measure(models: dict, label: str, dtype: str, batches: list[int], rounds: int, prompt: int, new: int,
            log=print) -> list[dict]:
    """Rows of every model in ``models`` ({student: model}, "dense" among them), each batch size in turn."""
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(10, min(m.config.vocab_size for m in models.values()) - 10, (batch, prompt), generator=g)
        prefill, decode = {name: [] for name in models}, {name: [] for name in models}
        with torch.inference_mode():
            for _ in range(rounds):
                state = {}
                for name, model in models.items():
                    t0 = time.perf_counter()
                    out = model.eval()(input_ids=ids, use_cache=True)
                    prefill[name].append(time.perf_counter() - t0)
                    state[name] = (output_cache(out), out.logits[:, -1:].argmax(-1))
                for step in range(new + 1):
                    for name, model in models.items():
                        cache, token = state[name]
                        t0 = time.perf_counter()
                        out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
                        state[name] = (output_cache(out), out.logits[:, -1:].argmax(-1))
                        if step:
                            decode[name].append(time.perf_counter() - t0)
                del state
        for name, model in models.items():
            row = {"model": label, "dtype": dtype, "batch": batch, "student": name, "bytes": resident_bytes(model),
                   "prompt": prompt, "new": new, "rounds": rounds,
                   "prefill_tokens_per_s": batch * prompt / min(prefill[name]),
                   "decode_tokens_per_s": batch / statistics.median(decode[name]),
                   "decode_tokens_per_s_best": batch / min(decode[name])}
            if log:
                log(f"  {label} {dtype} batch {batch} {name}: {row['bytes'] / 2**20:.1f} MiB, prefill "
                    f"{row['prefill_tokens_per_s']:.1f} tok/s, decode {row['decode_tokens_per_s']:.2f} tok/s")
            rows.append(row)
    return rows


def relate(rows: list[dict]) -> list[dict]:
    """Each row against the dense row of its model, dtype, batch, kernel and group (where rows name them)."""
    key = lambda r: (r["model"], r["dtype"], r["batch"], r.get("kernel"), r.get("group"))  # noqa: E731
    for row in rows:
        dense = next(r for r in rows if r["student"] == "dense" and key(r) == key(row))
        ratio = row["bytes"] / dense["bytes"]
        row["bytes_ratio"], row["limit"] = ratio, 1 / ratio
        for kind in ("prefill", "decode"):
            row[f"{kind}_speedup"] = row[f"{kind}_tokens_per_s"] / dense[f"{kind}_tokens_per_s"]
            row[f"{kind}_of_limit"] = row[f"{kind}_speedup"] / row["limit"]
    return rows
