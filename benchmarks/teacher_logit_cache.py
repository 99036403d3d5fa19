"""Error of the teacher-logit cache's KL (top-k + rest bucket, ``zoo.core.losses.cached_token_kl``) against
the exact KL, on a recipe's heldout split with its freshly built student (issue 9, "Teacher-logit cache").

    python benchmarks/teacher_logit_cache.py --config configs/recipes/fisher_svd_repair.yaml --k 16 64 256

For each k it prints the token-weighted mean KL of the cached approximation, its relative error against
the exact KL, the mean teacher mass outside the top-k, and the cosine similarity between the gradient
(w.r.t. the student's logits) of the approximation and of the exact KL: the direction repair follows.
The approximation is computed from the same teacher logits the cache would store (``teacher_top_k``).
With ``--repair_state`` the student is the repaired one instead.
"""
from __future__ import annotations

import argparse

import torch

from recipes.cli import _quiet
from recipes.recipe import load_recipe
from zoo.core.losses import cached_token_kl, prediction_mask, teacher_top_k, token_kl
from zoo.core.surgery import teacher_view


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/recipes/fisher_svd_repair.yaml")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repair_state", default=None)
    parser.add_argument("--split", default="heldout", choices=["heldout", "calibration", "train"])
    args = parser.parse_args(argv)
    _quiet()

    loaded = load_recipe(args.config, repair_state=args.repair_state)
    model, data = loaded.module, loaded.data  # builds the student (calibration cached)
    dataset = data._dataset(args.split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=data.batch_size)
    t = model.temperature
    sums = {"exact": 0.0, "count": 0.0, **{k: {"kl": 0.0, "rest": 0.0, "dot": 0.0, "nx": 0.0, "na": 0.0}
                                          for k in args.k}}
    for batch in loader:
        ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        with torch.no_grad(), teacher_view(model.model):
            teacher = model(ids, attn)
        student = model(ids, attn).detach().requires_grad_()
        n = float(prediction_mask(attn, loss_mask, ids.shape).sum())
        exact = token_kl(teacher, student, loss_mask, attn, t, model.kl_chunk)
        g_exact, = torch.autograd.grad(exact, student)
        sums["exact"] += float(exact.detach()) * n
        sums["count"] += n
        mask = prediction_mask(attn, loss_mask, ids.shape).float()
        for k in args.k:
            cached = teacher_top_k(teacher[:, :-1], k, t)
            approx = cached_token_kl(*cached, student, loss_mask, attn, t, model.kl_chunk)
            g_approx, = torch.autograd.grad(approx, student)
            s = sums[k]
            s["kl"] += float(approx.detach()) * n
            s["rest"] += float((cached[2].exp() * mask).sum())
            s["dot"] += float((g_exact * g_approx).sum())
            s["nx"] += float(g_exact.pow(2).sum())
            s["na"] += float(g_approx.pow(2).sum())
    count, exact = sums["count"], sums["exact"] / sums["count"]
    print(f"{args.config} ({args.split} split, {int(count)} counted predictions, teacher {model.teacher}, "
          f"vocab {teacher.shape[-1]}, temperature {t})")
    print(f"exact KL: {exact:.6g}")
    print(f"{'k':>6} {'cached KL':>12} {'rel. error':>11} {'rest mass':>10} {'grad cosine':>12}")
    for k in args.k:
        s = sums[k]
        kl = s["kl"] / count
        cosine = s["dot"] / (s["nx"] ** 0.5 * s["na"] ** 0.5)
        print(f"{k:>6} {kl:>12.6g} {(kl - exact) / exact:>+11.2%} {s['rest'] / count:>10.4f} {cosine:>12.4f}")


if __name__ == "__main__":
    main()
