"""Repair step vs plain full fine-tune step, and calibration vs a plain forward pass, measured side by
side in one process (issue 9, "Speed").

    python benchmarks/repair_step.py --model random:smollm2-135m-instruct --batch 8 --seq 2048

All steps run on the same model object and the same batch. The repair step is the zoo's (teacher
forward without grad, student forward, chunked KL, backward into the trainable tensors, AdamW),
timed with each speed lever of ``DistillationModule`` off and on:

- ``plain``: both levers off (the teacher and the student each run every layer; full logits + ``token_kl``);
- ``+shared_prefix``: the layers below the first replaced one run once, for both (``zoo.core.prefix``);
- ``+fused_head``: the KL from the final hidden states through the LM head chunk by chunk, no full logits;
- ``both``: the default.

The fine-tune step trains every weight of the original model with next-token cross-entropy and AdamW.
Calibration (``zoo.core.calibration.collect`` over the targets' inputs, on the unreplaced model) is
timed against a plain no-grad forward pass on the same batch, with its levers off and on: the sums on
the host instead of the device (``host sums``; the same as on a CPU run) and the full logits instead
of the last position's (``full logits``). Prints times, peak memories (CUDA) and the ratios. On CUDA
times come from CUDA events after warm-up; on CPU only the ratios mean anything. ``random:`` models
have the real shapes and cost.
"""
from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

from zoo import DistillationModule, FisherSVD
from zoo.core import calibration as calib
from zoo.core.surgery import teacher_view

from common import peak_gib, timed, write_json

LEVERS = {"plain": (False, False), "+shared_prefix": (True, False), "+fused_head": (False, True), "both": (True, True)}
TARGETS = {"repair step": "<= 0.8x the fine-tune step", "peak": "<= 8 GiB", "calibration": ">= 0.8x a forward pass"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:smollm2-135m-instruct")
    ap.add_argument("--targets", default="model.layers.15.mlp.down_proj")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--kl-chunk", type=int, default=256)
    ap.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS),
                    help="repair-step lever settings to time (default: all four)")
    ap.add_argument("--calibration", action=argparse.BooleanOptionalAction, default=True,
                    help="also time calibration against a plain forward pass")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="autocast to bf16 (default: on for CUDA)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file, after each one")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    module = DistillationModule(parts=[FisherSVD(args.targets, rank=args.rank, weighting="none")], teacher=args.model,
                                kl_chunk=args.kl_chunk)
    model = module.model.to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; model {args.model}; batch {args.batch} x {args.seq}; bf16 autocast: {bf16}")
    rows = []  # (label, seconds, peak GiB or None)

    def add(label, seconds, peak):
        rows.append((label, seconds, peak))
        write_json(args.json, {"device": name, "model": args.model, "batch": args.batch, "seq": args.seq,
                               "bf16": bf16, "rows": [{"label": r[0], "seconds": r[1], "peak_gib": r[2]}
                                                      for r in rows]})

    # ---- calibration vs a plain forward (the unreplaced model, as build_student calibrates it) ----
    if args.calibration:
        targets = module.parts[0].resolve(model)

        def forward():
            with torch.no_grad(), autocast():
                model(input_ids=ids, attention_mask=batch["attention_mask"])

        def calibrate():
            with autocast():
                calib.collect(model, [batch], targets, progress=False)

        full_logits = mock.patch.object(calib, "_head_skippable", lambda *a: False)
        host_sums = mock.patch.object(calib, "_device_room", lambda *a: 0.0)
        calib_rows = [("forward pass", forward, None), ("calibration", calibrate, None),
                      ("calibration, full logits", calibrate, full_logits)]
        if device.type == "cuda":  # on a CPU the sums are on the host anyway
            calib_rows.append(("calibration, host sums", calibrate, host_sums))
        for label, fn, lever_off in calib_rows:
            with lever_off or contextlib.nullcontext():
                add(label, timed(fn, args.steps, args.warmup, device), peak_gib(fn, device))

    # ---- repair steps, each lever setting ----
    module.build_student()
    module.to(device)
    trainable = sum(p.numel() for p in module.trainable_parameters().values())
    repair_opt = torch.optim.AdamW(list(module.trainable_parameters().values()), lr=1e-3)

    def repair_step():
        with autocast():
            loss, _ = module.distillation_loss(batch)
        loss.backward()
        repair_opt.step()
        repair_opt.zero_grad(set_to_none=True)

    for label in args.levers:
        module.shared_prefix, module.fused_head = LEVERS[label]
        add(f"repair step, {label}", timed(repair_step, args.steps, args.warmup, device),
            peak_gib(repair_step, device))
    module.shared_prefix, module.fused_head = True, True
    del repair_opt

    # ---- plain fine-tune: the original model (teacher view), every weight trainable ----
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    with teacher_view(model):
        full = [p for n, p in model.named_parameters() if ".replacement." not in n]
        for p in full:
            p.requires_grad_(True)
        ft_opt = torch.optim.AdamW(full, lr=1e-5)

        def finetune_step():
            with autocast():
                logits = model(input_ids=ids).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            ft_opt.step()
            ft_opt.zero_grad(set_to_none=True)

        add("fine-tune step", timed(finetune_step, args.steps, args.warmup, device), peak_gib(finetune_step, device))
        del ft_opt
    for n, p in model.named_parameters():
        p.requires_grad_(frozen[n])
        p.grad = None

    report(rows, args, trainable)


def report(rows, args, trainable):
    times = {label: t for label, t, _ in rows}
    print(f"targets {args.targets} rank {args.rank}: {trainable} trainable parameters in the repair step")
    tokens = args.batch * args.seq
    print(f"{'':34s} {'ms':>9s} {'tok/s':>10s} {'peak GiB':>9s} {'ratio':>7s}")
    for label, t, peak in rows:
        base = times["forward pass"] if label.startswith("calibration") else times.get("fine-tune step")
        ratio = (base / t if label.startswith("calibration") else t / base) if base and label not in (
            "forward pass", "fine-tune step") else None
        print(f"{label:34s} {t * 1000:9.1f} {tokens / t:10.0f} {peak if peak is not None else float('nan'):9.2f} "
              + (f"{ratio:7.3f}" if ratio is not None else f"{'':7s}"))
    print("ratio: repair step time / fine-tune step time (target " + TARGETS["repair step"] + "); "
          "calibration throughput / forward-pass throughput (target " + TARGETS["calibration"] + "); "
          "peak memory target " + TARGETS["peak"])


if __name__ == "__main__":
    main()
