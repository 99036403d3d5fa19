import copy

import pytest
import torch

from zoo.core import calibration as calib
from zoo.core.errors import ZooError
from zoo.fisher_svd import FisherSVD, FisherSVDLinear, resolve_rank, weighted_svd

TARGET = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def calibrated(tiny_model):
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 380, (4, 64)), "attention_mask": torch.ones(4, 64, dtype=torch.long)}
               for _ in range(3)]
    stats = calib.collect(tiny_model, batches, [TARGET], collectors={"fisher": [TARGET]}, progress=False)[TARGET]
    inputs = []
    hook = tiny_model.get_submodule(TARGET).register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            tiny_model(**b)
    hook.remove()
    return stats, torch.cat(inputs).double()


def test_calibration_matches_dense_statistics(calibrated):
    stats, X = calibrated
    assert stats.count == X.shape[0]
    assert torch.allclose(stats.mean, X.mean(0), atol=1e-6)
    assert torch.allclose(stats.second_moment, X.T @ X / len(X), atol=1e-6)
    assert torch.allclose(stats.diag, (X**2).mean(0), atol=1e-6)
    assert stats.fisher_rows.shape == (64,) and (stats.fisher_rows > 0).all()


@pytest.mark.parametrize("weighting", ["covariance", "diagonal", "fisher", "none"])
def test_full_rank_factorization_reproduces_w(tiny_model, calibrated, weighting):
    stats, _ = calibrated
    W = tiny_model.get_submodule(TARGET).weight
    U, s, V, used = weighted_svd(W, min(W.shape), weighting, stats)
    assert used == weighting
    rel = ((U * s) @ V.T - W.double()).norm() / W.double().norm()
    assert rel < 1e-4


def test_covariance_weighting_beats_plain_svd_on_output_error(tiny_model, calibrated):
    stats, X = calibrated
    W = tiny_model.get_submodule(TARGET).weight.double()
    errors = {}
    for weighting in ("covariance", "none", "diagonal"):
        U, s, V, _ = weighted_svd(W, 8, weighting, stats)
        errors[weighting] = ((X @ (W - (U * s) @ V.T).T) ** 2).sum().item()
    assert errors["covariance"] < errors["none"]
    assert errors["covariance"] <= errors["diagonal"]


def test_layer_forward_equals_dense_factors_and_sigma_stays_fp32():
    torch.manual_seed(0)
    U, s, V, b = torch.randn(6, 3), torch.rand(3), torch.randn(5, 3), torch.randn(6)
    layer = FisherSVDLinear(U, s, V, b)
    x = torch.randn(4, 5)
    expected = x @ ((U * s) @ V.T).T + b
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.to(torch.bfloat16)
    assert layer.sigma.dtype == torch.float32 and layer.U.dtype == torch.bfloat16
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["sigma", "bias"]
    assert {n for n, p in FisherSVDLinear(U, s, V, train_factors=True).named_parameters() if p.requires_grad} == {
        "U", "V", "sigma"}


def test_factor_lora_corrects_the_factors_and_exports_them_merged():
    torch.manual_seed(0)
    U, s, V, b = torch.randn(6, 4), torch.rand(4) + 0.5, torch.randn(5, 4), torch.randn(6)
    plain, layer = FisherSVDLinear(U, s, V, b), FisherSVDLinear(U, s, V, b, factor_lora=2)
    x = torch.randn(7, 5)
    assert torch.equal(layer(x), plain(x))  # B = 0: the built student is the truncated one
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "sigma", "bias", "U_lora_A", "U_lora_B", "V_lora_A", "V_lora_B"}
    assert torch.allclose(layer.U_lora_A @ layer.U_lora_A.T, torch.eye(2), atol=1e-6)  # orthonormal rows
    loss = (layer(x) - torch.randn(7, 6)).square().sum()
    loss.backward()
    assert layer.U_lora_B.grad.abs().sum() > 0 and layer.V_lora_B.grad.abs().sum() > 0 and layer.U.grad is None
    with torch.no_grad():
        for f in ("U", "V"):
            getattr(layer, f"{f}_lora_B").normal_()
    U2 = U + layer.U_lora_B @ layer.U_lora_A
    V2 = V + layer.V_lora_B @ layer.V_lora_A
    dense = (U2.double() * s.double()) @ V2.double().T
    assert torch.allclose(layer.dense_weight(), dense, atol=1e-10)
    assert torch.allclose(layer(x).double(), x.double() @ dense.T + b.double(), atol=1e-4)
    exported = layer.export_tensors()
    assert torch.allclose(exported["U"], U2) and torch.allclose(exported["V"], V2)
    assert exported["U"].shape == U.shape and set(exported) == {"U", "V", "sigma", "bias"}
    # a step of B moves U by about lr x rms(U), whatever the scale of U (the relative step)
    assert layer.lr_scales["U_lora_B"] == pytest.approx(U.square().mean().sqrt().item() * (4 / 2) ** 0.5, rel=1e-5)
    assert FisherSVDLinear(U, s, V, factor_lora=9).factor_lora == 4  # at most the map's rank
    with pytest.raises(ZooError, match="factor_lora must be an int >= 0.*got -1"):
        FisherSVD(TARGET, rank=8, factor_lora=-1)


def test_rank_resolution_and_errors():
    assert resolve_rank(64, 576, 1536) == 64
    assert resolve_rank(0.5, 576, 1536) == int(0.5 * 576 * 1536 / (576 + 1536))
    with pytest.raises(ZooError, match=r"min\(out_features=576, in_features=1536\) = 576"):
        resolve_rank(600, 576, 1536, "down")
    with pytest.raises(ZooError, match="ratio"):
        resolve_rank(1.5, 576, 1536)


def test_bad_weighting_names_the_choices():
    with pytest.raises(ZooError, match="covariance, diagonal, fisher, none"):
        FisherSVD("x", weighting="cov")


def test_covariance_falls_back_to_diagonal_when_only_the_diagonal_exists(tiny_model, calibrated):
    stats, _ = calibrated
    diag_only = copy.copy(stats)
    diag_only.second_moment = None
    W = tiny_model.get_submodule(TARGET).weight
    *_, used = weighted_svd(W, 8, "covariance", diag_only)
    assert used == "diagonal"
