"""Per-target rank allocation of FisherSVD (``allocation='global'``): the budget of the uniform ratio,
spent where the relative weighted error falls most per parameter; planned by the spec's plan() hook."""
from __future__ import annotations

import pytest
import torch

from zoo import Composite, FisherSVD
from zoo_cli import repair
from zoo.core.errors import ZooError
from zoo.fisher_svd import allocate_ranks, resolve_rank, weighted_spectrum


def relative_error(s: torch.Tensor, r: int) -> float:
    e = s.double().pow(2)
    return float(e[r:].sum() / e.sum())


def test_allocation_keeps_the_uniform_budget_and_favours_flat_spectra():
    steep = torch.tensor([2.0**-i for i in range(40)])  # one direction carries the layer
    flat = torch.linspace(1.0, 0.9, 40)  # every direction matters
    spectra = {"steep": steep, "flat": flat, "flat2": flat.clone()}
    shapes = {n: (40, 60) for n in spectra}
    ratio = 0.5
    ranks = allocate_ranks(spectra, shapes, ratio)
    uniform = resolve_rank(ratio, 40, 60)
    budget = 3 * uniform * 100
    assert sum(r * 100 for r in ranks.values()) <= budget
    assert budget - sum(r * 100 for r in ranks.values()) < 100  # spent up to less than one component
    assert ranks["steep"] < uniform < min(ranks["flat"], ranks["flat2"]) and abs(ranks["flat"] - ranks["flat2"]) <= 1
    assert all(1 <= r <= 40 * 60 // 100 for r in ranks.values())
    total = sum(relative_error(spectra[n], ranks[n]) for n in spectra)
    assert total < sum(relative_error(s, uniform) for s in spectra.values())
    assert allocate_ranks(spectra, shapes, ratio) == ranks  # deterministic


def test_allocation_weighs_parameters_of_different_shapes():
    s = torch.linspace(1.0, 0.5, 64)
    ranks = allocate_ranks({"small": s, "wide": s.clone()}, {"small": (64, 64), "wide": (64, 448)}, 0.5)
    # the same relative gain costs 128 parameters in one and 512 in the other: the small one gets more rank
    assert ranks["small"] > ranks["wide"]


def calibration_batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 380, (2, 32), generator=g), "attention_mask": torch.ones(2, 32, dtype=torch.long),
             "loss_mask": torch.ones(2, 32, dtype=torch.long)} for _ in range(n)]


@pytest.mark.parametrize("weighting", ["covariance", "none"])
def test_repair_module_builds_the_planned_ranks(tiny_teacher_dir, weighting):
    targets = "model.layers.{0..1}.{mlp.down_proj,self_attn.o_proj}"
    module = repair(FisherSVD, targets=targets, rank=0.3, weighting=weighting, allocation="global",
                             teacher=tiny_teacher_dir)
    module.build_student(calibration_batches(), data_fingerprint="alloc-test")
    planned = dict(module.student.plans[0])
    built = {n: m.replacement.rank for n, m in module.model.named_modules() if hasattr(m, "replacement")}
    assert built == planned and len(built) == 4
    budget = sum(resolve_rank(0.3, m.replacement.out_features, m.replacement.in_features) *
                 (m.replacement.out_features + m.replacement.in_features)
                 for m in module.model.modules() if hasattr(m, "replacement"))
    used = sum(m.replacement.rank * (m.replacement.out_features + m.replacement.in_features)
               for m in module.model.modules() if hasattr(m, "replacement"))
    assert used <= budget
    again = repair(FisherSVD, targets=targets, rank=0.3, weighting=weighting, allocation="global",
                            teacher=tiny_teacher_dir)
    again.build_student(calibration_batches(), data_fingerprint="alloc-test")
    assert dict(again.student.plans[0]) == planned  # a rebuilt student has the same shapes


def test_spectrum_is_the_weighted_svds_singular_values(tiny_model):
    W = tiny_model.get_submodule("model.layers.0.mlp.down_proj").weight
    assert torch.allclose(weighted_spectrum(W, "none"), torch.linalg.svdvals(W.double()), rtol=1e-10)


def test_global_allocation_needs_a_ratio_and_a_planner(tiny_teacher_dir):
    with pytest.raises(ZooError, match="float ratio"):
        FisherSVD("model.layers.0.mlp.down_proj", rank=8, allocation="global")
    with pytest.raises(ZooError, match="valid choices: uniform, global"):
        FisherSVD("model.layers.0.mlp.down_proj", rank=0.5, allocation="greedy")
    # inside a Composite the allocation is planned the same way (the shared plan() hook)
    composite = Composite(parts=[FisherSVD("model.layers.{0..1}.mlp.down_proj", rank=0.5, allocation="global",
                                           weighting="none")], teacher=tiny_teacher_dir)
    composite.build_student(None)
    assert set(composite.student.plans[0]) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


# ---- allocation by measured sensitivity (issue 16) ------------------------------------------------------

def test_sensitivity_allocation_spends_the_uniform_budget_and_keeps_the_floor():
    from zoo.fisher_svd import allocate_by_gain

    g = torch.Generator().manual_seed(0)
    shapes = {"a": (64, 64), "b": (64, 448), "c": (192, 64), "d": (64, 64)}
    gains = {n: torch.rand(min(s), generator=g, dtype=torch.float64) * (100 if n == "c" else 1) for n, s in shapes.items()}
    ratio, floor = 0.5, 0.25
    ranks = allocate_by_gain(gains, shapes, ratio, floor)
    budget = sum(resolve_rank(ratio, o, i, n) * (o + i) for n, (o, i) in shapes.items())
    spent = sum(ranks[n] * sum(s) for n, s in shapes.items())
    assert spent <= budget and budget - spent < min(map(sum, shapes.values()))
    assert all(ranks[n] >= max(1, int(floor * resolve_rank(ratio, *s, n))) for n, s in shapes.items())
    assert ranks["c"] > resolve_rank(ratio, *shapes["c"], "c")  # the sensitive target gets more than uniform
    assert allocate_by_gain(gains, shapes, ratio, floor) == ranks  # deterministic


def test_sensitivity_gains_against_a_dense_reference():
    from zoo.core.calibration import ActivationStats
    from zoo.fisher_svd import sensitivity_gains, weighted_svd

    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 9, generator=g, dtype=torch.float64)
    X = torch.randn(300, 9, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 9, dtype=torch.float64)
    C = X.T @ X / 300
    grad_sq = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    stats = ActivationStats(count=300, mean=X.mean(0), diag=C.diagonal().clone(), second_moment=C,
                            extra={"grad_output_diag.mean": grad_sq})
    for weighting in ("covariance", "none"):
        gains = sensitivity_gains(W, weighting, stats, name="w")
        U, s, V, _ = weighted_svd(W, 9, weighting, stats)
        for i in range(9):
            D = s[i] * torch.outer(U[:, i], V[:, i])  # the map dropping component i removes
            reference = float((grad_sq * (D @ C @ D.T).diagonal()).sum())  # sum_j E[g_j^2] E[(D x)_j^2]
            assert float(gains[i]) == pytest.approx(reference, rel=1e-9), (weighting, i)


def test_sensitivity_allocation_builds_and_reports_ranks_per_layer_type(tiny_teacher_dir):
    targets = ["model.layers.*.self_attn.{q,k,v,o}_proj", "model.layers.*.mlp.{gate,up,down}_proj"]
    module = repair(FisherSVD, targets=targets, rank=0.5, allocation="sensitivity", teacher=tiny_teacher_dir)
    module.build_student(calibration_batches(), data_fingerprint="sensitivity")
    planned = module.student.plans[0]
    shapes = {n: (module.model.get_submodule(n).out_features, module.model.get_submodule(n).in_features)
              for n in planned}
    budget = sum(resolve_rank(0.5, o, i, n) * (o + i) for n, (o, i) in shapes.items())
    spent = sum(r * sum(shapes[n]) for n, r in planned.items())
    assert len(shapes) == 14 and budget - min(map(sum, shapes.values())) < spent <= budget
    assert {f"ranks/{t}/mean" for t in ("q_proj", "down_proj")} <= set(module.summary)
    assert len(set(planned.values())) > 1  # not the uniform ranks
    # what the built maps export, counted from their tensors (the plan's count is the uniform rank's)
    from zoo.core.surgery import replaced_modules

    layers = [w.replacement for w in replaced_modules(module.model).values()]
    assert module.summary["low_rank_maps"] == 14
    assert module.summary["low_rank_parameters"] == sum(t.numel() for layer in layers
                                                       for t in layer.export_tensors().values())
