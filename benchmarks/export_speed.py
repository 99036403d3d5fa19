"""Exported students at the bytes limit (issue 26): the dense teacher against SVD-LLM students at ratios 0.8, 0.6
and 0.5, whole-MLP blockwise PHD and EigenAttention, side by side in one run, on the embedded teacher
(SmolLM2-135M) and on a random model with Llama-3.2-1B's shapes, in fp32 and bf16, at batch 1 and 8, prefill and
decode; every speed also as a fraction of the bytes limit.

    python benchmarks/export_speed.py                        # writes experiments/export-speed/results.json
    python benchmarks/export_speed.py --quick --teacher DIR  # seconds: tiny models, prints only (a CPU dry run; tested)

Students, as the recipes build them (``configs/recipes/compress_svdllm.yaml`` with ``rank`` 0.8 / 0.6 / 0.5,
``compress_phd.yaml``, ``eigen_attention.yaml``):

- ``embedded``: each student built by the zoo on the embedded teacher (calibration on 8 windows of 128 tokens of
  the standard library's source; no repair: repair changes values, not size or speed), written by
  ``zoo.export.export_model`` and loaded back by ``zoo.from_pretrained`` (fused, as transformers loads it);
- ``1b``: a random ``LlamaForCausalLM`` with Llama-3.2-1B's config (no weights are needed to measure speed) and
  each student's replacements made by the techniques' own classes with random tensors of the ranks the recipe
  gives (SVD-LLM: ``ratio * in * out / (in + out)``; PHD: rank 128, frames of blocks of 512, rows; EigenAttention:
  ``--eigen-k`` of 64 dimensions per head), described by their ``export_spec``, assembled as the export writer
  assembles them into ``modeling_zoo``'s ``ZooForCausalLM`` and fused by ``fuse_model`` as a load does: the same
  modeling code, without writing 5 GB to disk.

Measured per model, dtype and batch in one process (``--threads`` torch threads) with every model of a dtype
loaded at once and interleaved (``measure``), so load from other jobs falls on all of them alike: prefill, one
forward over ``batch x prompt`` tokens into an empty cache (the best of ``--rounds``), and decode, ``--new``
greedy steps from that cache, each model one step in turn (the median step over all rounds). ``bytes`` are the loaded
model's tensors, each storage once (tied embeddings count once), after fusing: what a decode step reads. The
limit of a student is dense bytes / its bytes (at batch 1 decode reads every weight once per token);
``*_of_limit`` is its speedup over that limit.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo import BlockwisePHD, DistillationModule, EigenAttention, FisherSVD, export_model, from_pretrained  # noqa: E402
from zoo.core.ranks import resolve_rank  # noqa: E402
from zoo.core.surgery import replaced_modules  # noqa: E402
from zoo.export import speed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ["model.layers.*.self_attn.{q,k,v,o}_proj", "model.layers.*.mlp.{gate,up,down}_proj"]
MLP, ATTENTION = "model.layers.*.mlp.{gate,up,down}_proj", "model.layers.*.self_attn"
SVDLLM = {"svdllm-0.8": 0.8, "svdllm-0.6": 0.6, "svdllm-0.5": 0.5}
STUDENTS = [*SVDLLM, "phd-mlp", "eigen-attention"]
#: matmul kernels: torch's ``F.linear`` as transformers runs it, and oneDNN's on weights reordered once
KERNELS = ["stock", "onednn"]
#: Llama-3.2-1B's shapes (meta-llama/Llama-3.2-1B config.json)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY_1B = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True)


def spec(name: str, quick: bool):
    """The technique spec of student ``name``, as its recipe sets it (small frames under ``--quick``)."""
    if name in SVDLLM:
        return FisherSVD(targets=LINEARS, rank=SVDLLM[name], weighting="covariance")
    if name == "phd-mlp":
        return BlockwisePHD(targets=MLP, rank=8 if quick else 128, block=16 if quick else 512, fit="divide",
                            core_init="lstsq")
    return EigenAttention(targets=ATTENTION, variance=0.95, key_basis="queries_keys")


def calibration(tokenizer, n: int, seq_len: int, vocab: int) -> list[dict]:
    """``n`` windows of ``seq_len`` tokens of the standard library's source (random ids without a tokenizer)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (n, seq_len), generator=g)
    else:
        import json as json_module
        import textwrap

        text = "\n".join(Path(m.__file__).read_text() for m in (json_module.decoder, textwrap, argparse))
        flat = torch.tensor(tokenizer(text)["input_ids"][: n * seq_len])
        ids = flat.reshape(n, seq_len)
    ones = torch.ones_like(ids)
    return [{"input_ids": ids[i:i + 2], "attention_mask": ones[i:i + 2], "loss_mask": ones[i:i + 2]}
            for i in range(0, n, 2)]


# ---- measuring ------------------------------------------------------------------------------------

def measure(models: dict, label: str, dtype: str, args, prompt: int, new: int) -> list[dict]:
    """Rows of ``models`` under each of ``args.kernels`` in turn: ``stock`` as loaded, then ``onednn`` with every
    model, the dense one too, packed by ``modeling_zoo.pack_model``. The packed copies sit beside the weights: where
    those of every model do not fit in memory at once, the dense model and one student at a time, each student
    against the dense row of its own group (``group``); a group that does not fit is skipped, and says so."""
    from zoo.export import modeling_zoo

    rows = []
    for kernel in [k for k in KERNELS if k in args.kernels]:
        if kernel == "onednn" and not modeling_zoo.onednn_available(getattr(torch, dtype)):
            print(f"onednn: {label} {dtype} skipped: this torch or CPU has no oneDNN {dtype} linear", flush=True)
            continue
        groups = [models]
        if kernel == "onednn" and sum(map(speed.resident_bytes, models.values())) > 0.9 * available_bytes():
            groups = [{"dense": models["dense"], name: model} for name, model in models.items() if name != "dense"]
        for group in groups:
            if kernel == "onednn":
                need, free = sum(map(speed.resident_bytes, group.values())), available_bytes()
                if need > 0.9 * free:
                    print(f"onednn: {label} {dtype} {', '.join(group)} skipped: the packed copies ({need / 2**30:.1f} "
                          f"GiB) would not fit in the {free / 2**30:.1f} GiB available", flush=True)
                    continue
                for model in group.values():
                    modeling_zoo.pack_model(model)
            try:
                measured = speed.measure(group, label, dtype, args.batches, args.rounds, prompt, new,
                                         log=lambda line: print(f"{kernel}: {line}", flush=True))
            finally:
                for model in group.values():
                    modeling_zoo.unpack_model(model)  # as loaded: the dense fp32 model is copied to bf16 next
            tag = {"group": list(group)[-1]} if len(groups) > 1 else {}
            rows += [row | {"kernel": kernel} | tag for row in measured]
    return rows


def available_bytes() -> int:
    """Memory the system can still give (Linux: MemAvailable; elsewhere: free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---- the embedded teacher: students built, exported and loaded -----------------------------------

def embedded_rows(args, root: Path) -> list[dict]:
    from zoo.core.models import load_causal_lm

    teacher, tokenizer = load_causal_lm(args.teacher)
    batches = calibration(tokenizer, 2 if args.quick else 8, 32 if args.quick else 128, teacher.config.vocab_size)
    dirs = {}
    for name in STUDENTS:
        t0 = time.perf_counter()
        module = DistillationModule(parts=[spec(name, args.quick)], teacher=args.teacher)
        module.build_student(batches, data_fingerprint="export-speed")
        dirs[name] = export_model(module, root / name, dtype="float32")
        print(f"built and exported {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        del module
        gc.collect()
    dense = load_causal_lm(args.teacher)[0]
    dense.config.use_cache = True
    rows = []
    for dtype in args.dtypes:
        models = {"dense": copy.deepcopy(dense).to(getattr(torch, dtype))}
        models |= {name: from_pretrained(path, dtype=dtype) for name, path in dirs.items()}
        rows += measure(models, "embedded", dtype, args, args.prompt, args.new)
        del models
        gc.collect()
    return rows


# ---- the 1B shape: random tensors of the students' ranks, through the export's modeling code ----------

def random_replacements(dense, name: str, quick: bool, eigen_k: int, g: torch.Generator) -> dict:
    """{target: replacement} of student ``name`` on ``dense``, with random tensors of the recipe's ranks."""
    from zoo.eigen_attention import EigenAttentionLayer
    from zoo.fisher_svd import FisherSVDLinear
    from zoo.phd import BlockwisePHDLinear, Subframe

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    out = {}
    for layer in dense.model.layers:
        prefix = f"model.layers.{layer.self_attn.layer_idx}"
        if name == "eigen-attention":
            a = layer.self_attn
            kv, d = dense.config.num_key_value_heads, a.head_dim
            U_k, U_v = (torch.linalg.qr(randn(kv, d, eigen_k)).Q for _ in range(2))
            out[f"{prefix}.self_attn"] = EigenAttentionLayer(a, U_k, U_v, trainable=False)
            continue
        maps = {f"mlp.{p}_proj": getattr(layer.mlp, f"{p}_proj") for p in ("gate", "up", "down")}
        if name != "phd-mlp":
            maps |= {f"self_attn.{p}_proj": getattr(layer.self_attn, f"{p}_proj") for p in ("q", "k", "v", "o")}
        for target, lin in maps.items():
            o, i = lin.out_features, lin.in_features
            if name == "phd-mlp":
                r = 8 if quick else 128
                rows_in, rows_out = (torch.linalg.qr(randn(n, r)).Q.T.contiguous() for n in (i, o))
                out[f"{prefix}.{target}"] = BlockwisePHDLinear(Subframe(rows_in), randn(r, r, std=0.02 * (i / r) ** 0.5),
                                                               Subframe(rows_out))
            else:
                r = resolve_rank(SVDLLM[name], o, i)
                std = (0.02 ** 2 / r) ** 0.25  # the entries of U V^T as large as the dense init's
                out[f"{prefix}.{target}"] = FisherSVDLinear(randn(o, r, std=std), torch.ones(r), randn(i, r, std=std))
    return out


def assembled(dense, replacements: dict, dtype: torch.dtype):
    """``modeling_zoo``'s ``ZooForCausalLM`` holding ``replacements`` and the rest of ``dense``, fused as a load
    fuses it (the writer's own assembly: ``zoo.export.writer``)."""
    from zoo.export import modeling_zoo
    from zoo.export.spec import describe
    from zoo.export.writer import _assemble, _cast, _under

    entries, state = {}, {}
    for name, replacement in replacements.items():
        entries[name], tensors = describe(name, replacement)
        state |= {f"{name}.{t}": v for t, v in tensors.items()}
    state |= {k: v for k, v in dense.state_dict().items() if not _under(k, replacements)}
    config = copy.deepcopy(dense.config)
    config.zoo = {"format": modeling_zoo.FORMAT, "base": type(dense).__name__, "modules": entries}
    model = _assemble(modeling_zoo.zoo_causal_lm(type(dense)), config, _cast(state, entries, dtype))
    buffers = dict(dense.named_buffers())
    for name, buffer in model.named_buffers():  # not in a state dict (the rotary frequencies): the dense model's
        if buffer.is_meta:
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_buffer(leaf, buffers[name], persistent=False)
    return modeling_zoo.fuse_model(model.eval())


def shaped_rows(args) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(TINY_1B if args.quick else LLAMA_1B))
    config.use_cache = True
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        dense32 = LlamaForCausalLM(config).eval()
    print(f"random 1B-shaped model in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    prompt, new = args.prompt_1b, args.new_1b
    for dtype in args.dtypes:
        # the students share the dense model's tensors they do not replace (embeddings, norms): all fit at once
        models = {"dense": dense32 if dtype == "float32" else copy.deepcopy(dense32).to(getattr(torch, dtype))}
        for name in STUDENTS:
            g = torch.Generator().manual_seed(STUDENTS.index(name))
            with torch.no_grad():
                models[name] = assembled(models["dense"], random_replacements(models["dense"], name, args.quick,
                                                                              args.eigen_k, g), getattr(torch, dtype))
            gc.collect()
        rows += measure(models, "1b", dtype, args, args.prompt_1b, args.new_1b)
        del models
        gc.collect()
    return rows


# ---- report ---------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ("| model | dtype | batch | kernel | student | MiB | bytes ratio | limit | prefill tok/s | prefill x | "
            "decode tok/s | decode x | decode of limit | decode x stock dense |")
    lines, seen = [head, "|" + " --- |" * (head.count("|") - 1)], set()
    for r in rows:
        key = (r["model"], r["dtype"], r["batch"], r["kernel"], r["student"])
        if key in seen:  # a later group's own dense run: each student is related to its own, the table shows one
            continue
        seen.add(key)
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['kernel']} | {r['student']} | "
                     f"{r['bytes'] / 2**20:.1f} | {r['bytes_ratio']:.3f} | {r['limit']:.2f} | "
                     f"{r['prefill_tokens_per_s']:.1f} | {r['prefill_speedup']:.2f} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['decode_speedup']:.2f} | {r['decode_of_limit']:.2f} | {r['decode_vs_stock_dense']:.2f} |")
    return "\n".join(lines)


def hardware() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        found = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        return f"{found.get('Model name', platform.processor())}, {found.get('CPU(s)', os.cpu_count())} CPUs"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["embedded", "1b"], choices=["embedded", "1b"])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (embedded)")
    parser.add_argument("--new", type=int, default=8, help="timed decode steps per round (embedded)")
    parser.add_argument("--prompt-1b", type=int, default=8)
    parser.add_argument("--new-1b", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all models")
    parser.add_argument("--eigen-k", type=int, default=32, help="EigenAttention's k_K = k_V on the 1B shape")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS,
                        help="measure every model with each (onednn: zoo.export.modeling_zoo.pack_model, dense too)")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes: a dry run in seconds")
    parser.add_argument("--output", default=None, help="results JSON (default: experiments/export-speed/results.json; "
                                                         "none under --quick, which must not overwrite the figures)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.new, args.prompt_1b, args.new_1b, args.eigen_k, args.rounds = 8, 2, 8, 2, 8, 1
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="zoo-export-speed-"))
    t0 = time.perf_counter()
    try:
        rows = (embedded_rows(args, root) if "embedded" in args.models else []) + \
               (shaped_rows(args) if "1b" in args.models else [])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = speed.relate(rows)
    for row in rows:  # what a user of the dense model as transformers runs it would see
        stock = next((r for r in rows if r["student"] == "dense" and r["kernel"] == "stock" and
                      (r["model"], r["dtype"], r["batch"]) == (row["model"], row["dtype"], row["batch"])), None)
        row["decode_vs_stock_dense"] = row["decode_tokens_per_s"] / stock["decode_tokens_per_s"] if stock else float("nan")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": "python benchmarks/export_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": commit, "hardware": hardware(), "torch": torch.__version__, "threads": args.threads,
              "wall_s": time.perf_counter() - t0, "rows": rows}
    output = args.output or (None if args.quick else str(ROOT / "experiments/export-speed/results.json"))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1))
    print(table(rows))
    return result


if __name__ == "__main__":
    main()
