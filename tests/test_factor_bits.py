"""``factor_bits`` (issue 25): the low-rank techniques store their factors on a low-bit grid, sigma folded into
the first one, the group scales trained; checked against a dense reference, in bytes, and through a repair step."""
from __future__ import annotations

import pytest
import torch

from zoo import DistillationModule, FisherSVD, KFACSVD
from zoo.core.errors import ZooError
from zoo.core.lowbit import dequantize
from zoo.core.lowrank import QuantizedFactorsLinear, quantized_factors
from zoo.core.surgery import replaced_modules
from zoo.export.writer import size_report

ATTN = "model.layers.*.self_attn.{q,o}_proj"


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 380, (2, 32), generator=g), "attention_mask": torch.ones(2, 32, dtype=torch.long),
             "loss_mask": torch.ones(2, 32, dtype=torch.long)} for _ in range(n)]


def factors(out=48, inp=80, r=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64)).Q
    V = torch.randn(inp, r, generator=g, dtype=torch.float64)
    sigma = torch.linspace(3.0, 0.1, r, dtype=torch.float64)
    X = torch.randn(512, inp, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, inp, dtype=torch.float64)
    return U, sigma, V, X.T @ X / len(X), X


def test_the_layer_is_the_product_of_its_dequantized_factors():
    U, sigma, V, moment, X = factors()
    layer = quantized_factors(U, sigma, V, 4, 16, moment)
    down = dequantize(layer.down.codes, layer.down.scales.half().double(), layer.down.zeros, layer.down.grid)
    up = dequantize(layer.up.codes, layer.up.scales.half().double(), layer.up.zeros, layer.up.grid)
    torch.testing.assert_close(layer.dense_weight(), up @ down, rtol=1e-12, atol=1e-12)
    x = X[:8].float()
    torch.testing.assert_close(layer(x), x @ (up @ down).float().T, rtol=1e-5, atol=1e-5)
    dense = (U * sigma) @ V.T
    errors = {b: float(((quantized_factors(U, sigma, V, b, 16, moment).dense_weight().detach() - dense) @ X.T).pow(2).mean())
              for b in (3, 4, 8)}
    assert errors[8] < errors[4] < errors[3] < float((dense @ X.T).pow(2).mean()) * 0.1


def test_gptq_rounding_of_the_factors_beats_round_to_nearest_on_the_calibration_inputs():
    U, sigma, V, moment, X = factors(seed=1)
    dense = (U * sigma) @ V.T
    gptq = quantized_factors(U, sigma, V, 3, 16, moment).dense_weight().detach()
    nearest = quantized_factors(U, sigma, V, 3, 16, None).dense_weight().detach()
    assert float(((gptq - dense) @ X.T).pow(2).mean()) < float(((nearest - dense) @ X.T).pow(2).mean())


@pytest.mark.parametrize("cls", [FisherSVD, KFACSVD])
def test_a_student_with_quantized_factors_counts_its_packed_bytes(cls, tiny_teacher_dir):
    module = DistillationModule(parts=[cls(ATTN, rank=8, factor_bits=3, factor_group=32)], teacher=tiny_teacher_dir)
    module.build_student(batches(), data_fingerprint="factor-bits")
    expected, weights = 0, 0
    for wrapper in replaced_modules(module.model).values():
        layer = wrapper.replacement
        assert isinstance(layer, QuantizedFactorsLinear) and layer.rank == 8
        for rows, width in ((8, layer.in_features), (layer.out_features, 8)):
            groups = -(-width // min(32, width))
            # codes and zero points packed 8 per 3 bytes along a row, fp16 scales
            expected += rows * (-(-width // 8) * 3 + 2 * groups + -(-groups // 8) * 3)
        weights += layer.in_features * layer.out_features
    report = size_report(module.model)
    assert report["replaced_bytes"] == expected
    assert report["bits_per_weight"] == pytest.approx(8 * expected / weights)
    full = DistillationModule(parts=[cls(ATTN, rank=8)], teacher=tiny_teacher_dir)
    full.build_student(batches(), data_fingerprint="factor-bits")
    # 3-bit codes, fp16 scales per group of at most 32 (8 at the rank side): well under half the fp16 factors
    assert report["bits_per_weight"] < size_report(full.model)["bits_per_weight"] / 2


def test_repair_moves_the_scales_and_never_the_codes(tiny_teacher_dir):
    module = DistillationModule(parts=[FisherSVD(ATTN, rank=8, factor_bits=4, factor_group=16)], teacher=tiny_teacher_dir)
    module.build_student(batches(), data_fingerprint="factor-bits")
    trainable = module.trainable_parameters()
    assert trainable and all(n.endswith((".down.scales", ".up.scales")) for n in trainable)
    layer = next(iter(replaced_modules(module.model).values())).replacement
    codes = layer.down.codes.clone()
    ids = batches(1, seed=3)[0]["input_ids"]
    module(ids).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    with torch.no_grad():
        for p in trainable.values():
            p.sub_(0.01 * p.grad.sign() * p.abs())
    assert torch.equal(layer.down.codes, codes)
    program = [op["op"] for op in layer.export_spec()["program"]]
    assert program == ["qmatmul", "qmatmul"]


@pytest.mark.parametrize("options, needle", [
    (dict(factor_bits=5), "bits must be one of"),
    (dict(factor_bits=4, train_factors=True), "excludes train_factors"),
    (dict(factor_bits=4, factor_lora=2), "excludes train_factors and factor_lora"),
    (dict(factor_bits=4, factor_group=-1), "factor_group must be"),
])
def test_bad_factor_options_are_refused(options, needle):
    with pytest.raises(ZooError, match=needle):
        FisherSVD(ATTN, rank=8, **options)
