"""The whole-model compression path (issue 16): ASVD's scale as its paper defines it, the closed-form local
refit, and error-aware (sequential) calibration, each against a dense reference."""
from __future__ import annotations

import pytest
import torch

from zoo import DistillationModule, FisherSVD
from zoo.core.calibration import collect
from zoo.core.linalg import refit_left
from zoo.core.models import load_causal_lm
from zoo.core.surgery import replace, replaced_modules, teacher_view
from zoo.fisher_svd import FisherSVDLinear, asvd_scale, diagonal_scale, weighted_svd

ALL_LINEARS = ["model.layers.*.self_attn.{q,k,v,o}_proj", "model.layers.*.mlp.{gate,up,down}_proj"]


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[0, 25:] = 0
    return [{"input_ids": torch.randint(3, 380, (2, 32), generator=g), "attention_mask": mask.clone(),
             "loss_mask": mask.clone()} for _ in range(n)]


def inputs_of(model, name, data):
    """The masked inputs of module ``name`` over ``data`` as [tokens, in] fp64 (the dense reference)."""
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda m, args: rows.append(args[0].detach()))
    try:
        with torch.no_grad():
            for b in data:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        handle.remove()
    return torch.cat([r[b["attention_mask"].bool()] for r, b in zip(rows, data)]).double()


def test_refit_is_the_least_squares_optimum():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(9, 7, generator=g, dtype=torch.float64)
    X_t = torch.randn(200, 7, generator=g, dtype=torch.float64)
    X_s = X_t + 0.3 * torch.randn(200, 7, generator=g, dtype=torch.float64)  # the student's drifted inputs
    V = torch.linalg.qr(torch.randn(7, 3, generator=g, dtype=torch.float64))[0]
    B = refit_left(W, V, X_s.T @ X_s / 200, X_t.T @ X_s / 200)
    expected = torch.linalg.lstsq(X_s @ V, X_t @ W.T).solution.T  # min ||X_s V B^T - X_t W^T||
    torch.testing.assert_close(B, expected, rtol=1e-9, atol=1e-10)
    B_same = refit_left(W, V, X_s.T @ X_s / 200)  # no cross moment: x_t = x_s
    torch.testing.assert_close(B_same, torch.linalg.lstsq(X_s @ V, X_s @ W.T).solution.T, rtol=1e-9, atol=1e-10)


def test_asvd_scale_is_the_mean_absolute_input(tiny_teacher_dir):
    model = load_causal_lm(tiny_teacher_dir)[0]
    name, data = "model.layers.1.mlp.down_proj", batches()
    stats = collect(model, data, [name], collectors={"abs_mean": [name]}, progress=False)[name]
    X = inputs_of(model, name, data)
    torch.testing.assert_close(stats.extra["abs_mean.mean"], X.abs().mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(asvd_scale(stats, 0.5), X.abs().mean(0).sqrt(), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(asvd_scale(stats), diagonal_scale(stats))  # mean |x| is not the RMS


@pytest.mark.parametrize("weighting", ["none", "asvd", "diagonal"])
def test_refit_alone_beats_truncation_alone(weighting, tiny_teacher_dir):
    """On the calibration inputs, the refit's output error E||W x - W_r x||^2 is below truncation's."""
    name, data = "model.layers.1.mlp.down_proj", batches()
    errors = {}
    for refit in (False, True):
        module = DistillationModule(parts=[FisherSVD(name, rank=6, weighting=weighting, refit=refit)],
                                    teacher=tiny_teacher_dir)
        module.build_student(data, data_fingerprint="refit")
        layer = module.model.get_submodule(name)
        X = inputs_of(module.model, name, data)  # the layer's inputs are the teacher's (nothing replaced below)
        D = layer.original.weight.double() - layer.replacement.dense_weight()
        errors[refit] = float((X @ D.T).pow(2).sum(1).mean())
    assert errors[True] < errors[False] * 0.98


def test_refit_of_the_covariance_weighting_changes_nothing(tiny_teacher_dir):
    """SVD-LLM's whitened truncation is already the least-squares optimum on the teacher's inputs."""
    name, data = "model.layers.1.mlp.down_proj", batches()
    dense = []
    for refit in (False, True):
        module = DistillationModule(parts=[FisherSVD(name, rank=6, refit=refit)], teacher=tiny_teacher_dir)
        module.build_student(data, data_fingerprint="refit")
        dense.append(module.model.get_submodule(name).replacement.dense_weight())
    torch.testing.assert_close(dense[0], dense[1], rtol=1e-6, atol=1e-8)


def test_cross_moments_are_teacher_inputs_against_the_students(tiny_teacher_dir):
    """With layer 0 replaced, layer 1's target sees the student's inputs; ``cross`` pairs them with the
    teacher's at the same positions."""
    model = load_causal_lm(tiny_teacher_dir)[0]
    from zoo.core.models import claim

    claim(model)
    data = batches()
    W0 = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    U, s, V, _ = weighted_svd(W0, 4, "none")
    replace(model, ["model.layers.0.mlp.down_proj"], lambda n, m: FisherSVDLinear(U.float(), s, V.float()))
    name = "model.layers.1.mlp.down_proj"
    stats = collect(model, data, [name], cross=True, progress=False)[name]
    X_s = inputs_of(model, name, data)
    with teacher_view(model):
        X_t = inputs_of(model, name, data)
    assert not torch.allclose(X_s, X_t)  # the replacement below changed the inputs
    torch.testing.assert_close(stats.second_moment, X_s.T @ X_s / len(X_s), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(stats.extra["cross.second_moment"], X_t.T @ X_s / len(X_s), rtol=1e-7, atol=1e-9)


def test_sequential_calibration_collects_nothing_on_the_teacher_that_no_plan_reads(tiny_teacher_dir, monkeypatch):
    """Uniform ranks plan nothing from data: one calibration pass per layer, none before (two, not three)."""
    import zoo.core.calibration as calib

    calls = []
    real = calib.collect
    monkeypatch.setattr(calib, "collect", lambda *a, **k: calls.append(k.get("cross")) or real(*a, **k))
    module = DistillationModule(parts=[FisherSVD("model.layers.*.mlp.down_proj", rank=8)], teacher=tiny_teacher_dir,
                                calibration="sequential")
    module.build_student(batches(), data_fingerprint="plan-needs")
    assert calls == [True, True]
    global_ = DistillationModule(parts=[FisherSVD("model.layers.*.mlp.down_proj", rank=0.5, allocation="global")],
                                 teacher=tiny_teacher_dir, calibration="sequential")
    calls.clear()
    global_.build_student(batches(), data_fingerprint="plan-needs")
    assert calls == [False, True, True]  # the global allocation plans from the teacher's statistics


def test_sequential_student_is_the_layer_by_layer_build(tiny_teacher_dir):
    """``calibration="sequential"`` equals building by hand: layer 0's targets from the teacher's statistics,
    then layer 1's from statistics collected with layer 0 replaced (and the teacher-view cross moments)."""
    from zoo.core.models import claim

    data = batches(4)
    spec = lambda: FisherSVD("model.layers.*.mlp.{up,down}_proj", rank=8, refit=True)  # noqa: E731
    module = DistillationModule(parts=[spec()], teacher=tiny_teacher_dir, calibration="sequential")
    module.build_student(data, data_fingerprint="by-hand")

    model = load_causal_lm(tiny_teacher_dir)[0]
    claim(model)
    part = spec()
    for layer in (0, 1):  # up_proj and down_proj of a layer: one group
        names = [f"model.layers.{layer}.mlp.up_proj", f"model.layers.{layer}.mlp.down_proj"]
        stats = collect(model, data, names, cross=True, progress=False)
        replace(model, names, lambda n, m: part.build(n, m, stats[n]))
    for name, wrapper in replaced_modules(module.model).items():
        torch.testing.assert_close(wrapper.replacement.dense_weight(),
                                   model.get_submodule(name).replacement.dense_weight(), rtol=1e-6, atol=1e-9)
    groups = module.student.layer_groups([["model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj", "lm_head"]])
    assert groups == [[["model.layers.0.mlp.down_proj"]], [["model.layers.1.mlp.up_proj"]], [["lm_head"]]]


def test_sequential_calibration_is_in_the_state_header(tiny_teacher_dir, tmp_path):
    from zoo.core.errors import ZooError

    name, data = "model.layers.1.mlp.down_proj", batches()
    seq = DistillationModule(parts=[FisherSVD(name, rank=4)], teacher=tiny_teacher_dir, calibration="sequential")
    seq.build_student(data, data_fingerprint="state")
    path = seq.save_repair_state(tmp_path / "s.safetensors")
    with pytest.raises(ZooError, match='its calibration is "sequential", this run\'s is "once"'):
        DistillationModule(parts=[FisherSVD(name, rank=4)], teacher=tiny_teacher_dir, repair_state=str(path))
    with pytest.raises(ZooError, match="unknown calibration 'twice'; valid choices: once, sequential"):
        DistillationModule(parts=[FisherSVD(name, rank=4)], teacher=tiny_teacher_dir, calibration="twice")


def test_calibration_reports_rank_deficient_covariances_by_name(tiny_teacher_dir, caplog):
    """12 tokens cannot span a 128-wide input: the run says so, naming the target, and counts it. Seed 31's
    tokens give a 13th eigenvalue of 1.4e-6 x the mean (the fp32 products' noise), which a threshold of 1e-6
    x the mean alone counted as rank: no more than 12 tokens' worth is."""
    import logging

    torch.manual_seed(31)
    few = [{"input_ids": torch.randint(3, 380, (1, 12)), "attention_mask": torch.ones(1, 12, dtype=torch.long)}]
    module = DistillationModule(parts=[FisherSVD("model.layers.1.mlp.down_proj", rank=4)], teacher=tiny_teacher_dir)
    with caplog.at_level(logging.INFO, logger="zoo"):
        module.build_student(few, data_fingerprint="few")
    assert module.summary["calibration_rank_deficient_targets"] == 1
    assert module.summary["calibration_min_effective_rank_fraction"] <= 12 / 128
    assert "model.layers.1.mlp.down_proj, effective rank" in caplog.text and "of 128" in caplog.text
    enough = DistillationModule(parts=[FisherSVD("model.layers.1.mlp.down_proj", rank=4)], teacher=tiny_teacher_dir)
    enough.build_student(batches(6), data_fingerprint="enough")
    assert enough.summary["calibration_rank_deficient_targets"] == 0
