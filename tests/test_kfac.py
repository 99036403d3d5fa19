"""K-FAC-weighted SVD (zoo/kfac.py): its statistic against autograd, its factorization against the dense
optimum, and the collector mechanism it rides on."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from zoo import DistillationModule, FisherSVD, Technique
from zoo.core.calibration import ActivationStats, collect
from zoo.core.errors import ZooError
from zoo.core.models import load_causal_lm
from zoo.kfac import kfac_svd

TARGET = "model.layers.1.mlp.down_proj"


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0  # padding: its gradients must not count
    return [{"input_ids": torch.randint(3, 380, (2, 32), generator=g), "attention_mask": mask} for _ in range(n)]


def sqrtm(S: torch.Tensor) -> torch.Tensor:
    w, Q = torch.linalg.eigh(S)
    return (Q * w.clamp_min(0).sqrt()) @ Q.T


def test_grad_output_covariance_equals_autograd(tiny_teacher_dir):
    model = load_causal_lm(tiny_teacher_dir)[0]
    data = batches()
    stats = collect(model, data, [TARGET], collectors={"grad_output": [TARGET]}, progress=False)[TARGET]
    G = stats.extra["grad_output.second_moment"]

    module = model.get_submodule(TARGET)
    gram, tokens = torch.zeros(64, 64, dtype=torch.float64), 0
    for batch in data:
        seen = []

        def keep(_module, _args, out):
            out.retain_grad()
            seen.append(out)

        handle = module.register_forward_hook(keep)
        weight = module.weight
        weight.requires_grad_(True)
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            valid = batch["attention_mask"][:, 1:].bool()
            F.cross_entropy(logits[:, :-1][valid].float(), batch["input_ids"][:, 1:][valid]).backward()
        finally:
            handle.remove()
            weight.requires_grad_(False)
            weight.grad = None
        g = seen[0].grad[batch["attention_mask"].bool()].double()
        gram += g.T @ g
        tokens += len(g)
    torch.testing.assert_close(G, gram / tokens, rtol=1e-6, atol=1e-12)
    assert stats.count == tokens == 2 * (32 + 20)  # the padding counted in neither


def test_kfac_svd_reaches_the_dense_optimum_of_the_kfac_weighted_error():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 7, 6, 3
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    Xg = torch.randn(40, out_f, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, out_f, dtype=torch.float64)
    Xa = torch.randn(40, in_f, generator=g, dtype=torch.float64) * torch.linspace(3, 0.2, in_f, dtype=torch.float64)
    G, A = Xg.T @ Xg / 40, Xa.T @ Xa / 40
    stats = ActivationStats(count=40, mean=Xa.mean(0), diag=A.diagonal().clone(), second_moment=A,
                            extra={"grad_output.second_moment": G})
    U, s, V = kfac_svd(W, r, stats)
    W_r = (U * s) @ V.T

    def weighted(D):  # tr(D^T G D A): the K-FAC estimate of the loss increase
        return float(torch.trace(D.T @ G @ D @ A))

    optimum = float(torch.linalg.svdvals(sqrtm(G) @ W @ sqrtm(A))[r:].pow(2).sum())  # Eckart-Young
    assert weighted(W - W_r) == pytest.approx(optimum, rel=1e-9)
    P, S, Qh = torch.linalg.svd(W)
    plain = (P[:, :r] * S[:r]) @ Qh[:r]
    assert weighted(W - plain) > optimum * 1.05  # the weighting matters on this problem


def test_kfac_svd_student_builds_from_its_own_statistic_and_the_cache(tiny_teacher_dir):
    """A technique with its own statistic, added in one file: it calibrates, builds and trains."""
    from zoo import KFACSVD

    module = DistillationModule(parts=[KFACSVD(TARGET, rank=8)], teacher=tiny_teacher_dir)
    module.build_student(batches(), data_fingerprint="kfac")
    names = set(module.trainable_parameters())
    assert names == {f"{TARGET}.replacement.sigma"}
    again = DistillationModule(parts=[KFACSVD(TARGET, rank=8)], teacher=tiny_teacher_dir)
    again.build_student(batches(), data_fingerprint="kfac")  # from the cache: the same student
    assert torch.equal(module.model.get_submodule(TARGET).replacement.U, again.model.get_submodule(TARGET).replacement.U)


def test_an_unknown_statistic_is_a_clear_error(tiny_teacher_dir):
    @dataclass(eq=False, repr=False)
    class NeedsNothingKnown(FisherSVD):
        def needs(self):
            return {"input", "hessian_of_everything"}

    module = DistillationModule(parts=[NeedsNothingKnown(TARGET, rank=4)], teacher=tiny_teacher_dir)
    with pytest.raises(ZooError, match="'hessian_of_everything'.*valid: input, taps, fisher, abs_mean, grad_output"):
        module.build_student(batches(), data_fingerprint="unknown")


def test_a_part_that_is_not_a_spec_is_refused(tiny_teacher_dir):
    with pytest.raises(ZooError, match="part 0 is a dict, not a technique spec"):
        DistillationModule(parts=[{"targets": TARGET}], teacher=tiny_teacher_dir)
    assert issubclass(FisherSVD, Technique)
