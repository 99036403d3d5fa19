"""Repair step vs plain full fine-tune step, measured side by side in one process.

    python benchmarks/repair_step.py --model random:smollm2-135m-instruct --batch 8 --seq 2048

Both steps run on the same model object and the same batch: the repair step is the zoo's
(teacher forward without grad, student forward, chunked KL, backward into the trainable tensors,
AdamW); the fine-tune step trains every weight of the original model with next-token cross-entropy
and AdamW. Prints the time ratio and both peak memories. On CUDA, times come from CUDA events after
warm-up; on CPU only the ratio means anything. ``random:`` models have the real shapes and cost.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from zoo import FisherSVDRepair
from zoo.core.surgery import teacher_view

from common import peak_gib, timed


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
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="autocast to bf16 (default: on for CUDA)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    module = FisherSVDRepair(targets=args.targets, rank=args.rank, weighting="none", teacher=args.model,
                             kl_chunk=args.kl_chunk)
    module.build_student()
    module.to(device)
    model = module.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}

    repair_opt = torch.optim.AdamW(list(module.trainable_parameters().values()), lr=1e-3)

    def repair_step():
        with autocast():
            loss, _ = module.distillation_loss(batch)
        loss.backward()
        repair_opt.step()
        repair_opt.zero_grad(set_to_none=True)

    repair_time = timed(repair_step, args.steps, args.warmup, device)
    repair_peak = peak_gib(repair_step, device)
    trainable = sum(p.numel() for p in module.trainable_parameters().values())
    del repair_opt

    # plain fine-tune: the original model (teacher view), every weight trainable
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

        ft_time = timed(finetune_step, args.steps, args.warmup, device)
        ft_peak = peak_gib(finetune_step, device)
    for n, p in model.named_parameters():
        p.requires_grad_(frozen[n])

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; model {args.model}; batch {args.batch} x {args.seq}; bf16 autocast: {bf16}")
    print(f"targets {args.targets} rank {args.rank}: {trainable} trainable parameters in the repair step")
    print(f"repair step:    {repair_time * 1000:9.1f} ms" + (f", peak {repair_peak:.2f} GiB" if repair_peak else ""))
    print(f"fine-tune step: {ft_time * 1000:9.1f} ms" + (f", peak {ft_peak:.2f} GiB" if ft_peak else ""))
    print(f"ratio repair/fine-tune time: {repair_time / ft_time:.3f}")
    if repair_peak and ft_peak:
        print(f"ratio repair/fine-tune peak memory: {repair_peak / ft_peak:.3f}")


if __name__ == "__main__":
    main()
