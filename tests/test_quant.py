"""The low-bit grid (``zoo.core.lowbit``) and the ``Quantize`` technique against dense references: codes and
scales reproduce the weight within half a step, packing round-trips at every width, GPTQ's rounding beats
nearest on the error the calibration inputs see, the correction removes the error it is fitted to, and
training reaches the scales through the dequantized weight."""
from __future__ import annotations

import pytest
import torch

from zoo import Quantize, QuantizedLinear
from zoo.core.calibration import ActivationStats
from zoo.core.errors import ZooError
from zoo.core.lowbit import Grid, clip_search, dequantize, gptq, grid_params, pack, quantize, unpack
from zoo.quant import weighted_correction


def correlated_inputs(n=4000, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    x[:, 3] *= 20  # an outlier channel, as real activations have
    return x


def weight(out=24, d=48, seed=1):
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("width", [48, 50])  # a ragged last group
def test_nearest_rounding_is_within_half_a_step(bits, symmetric, width):
    W = weight(d=width)
    grid = Grid(bits, 16, symmetric)
    scales, zeros = grid_params(W, grid)
    codes = quantize(W, scales, zeros, grid)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= grid.maxq
    deq = dequantize(codes, scales, zeros, grid)
    step = grid.expand(scales, width)
    # inside the grid's range every weight is within half a step; symmetric grids clip the top code's side
    inside = (deq - W).abs() <= step / 2 + 1e-12
    assert inside.float().mean() > (0.97 if symmetric else 0.999)
    assert (deq - W).abs().max() <= step.max() * (1 if symmetric else 0.5 + 1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("width", [8, 13, 64, 100])
def test_pack_round_trips(bits, width):
    codes = torch.randint(0, 2 ** bits, (5, width), generator=torch.Generator().manual_seed(bits * width)).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-width // 8) * bits)
    assert torch.equal(unpack(packed, bits, width), codes)


def naive_gptq(W, moment, grid, damp=0.01):
    """GPTQ as optimal brain quantization states it: one column at a time, the rest updated through the inverse
    Hessian of the columns not yet rounded (no Cholesky, no lazy blocks)."""
    W = W.clone()
    n = W.shape[1]
    Hinv = torch.linalg.inv(moment + damp * moment.diagonal().mean() * torch.eye(n, dtype=moment.dtype))
    codes = torch.empty(W.shape, dtype=torch.uint8)
    scales, zeros = torch.empty(W.shape[0], grid.groups(n), dtype=W.dtype), torch.empty(W.shape[0], grid.groups(n), dtype=W.dtype)
    for j in range(n):
        g = j // grid.group
        if j % grid.group == 0:
            s, z = grid_params(W[:, j:j + grid.group], grid)
            scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
        q = torch.clamp(torch.round(W[:, j] / scales[:, g]) + zeros[:, g], 0, grid.maxq)
        codes[:, j] = q.to(torch.uint8)
        e = (W[:, j] - (q - zeros[:, g]) * scales[:, g]) / Hinv[j, j]
        W[:, j + 1:] -= e[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes, scales, zeros


@pytest.mark.parametrize("group", [16, 12])
def test_gptq_is_optimal_brain_quantization_column_by_column(group):
    x = correlated_inputs(d=40)
    W = weight(d=40)
    moment = x.T @ x / len(x)
    grid = Grid(3, group)
    codes, scales, zeros = gptq(W, moment, grid, block=16)
    ref_codes, ref_scales, ref_zeros = naive_gptq(W, moment, grid)
    assert (codes == ref_codes).float().mean() > 0.99  # fp64 ties aside, the same codes
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=1e-9)


def test_gptq_beats_nearest_on_the_calibration_inputs():
    x = correlated_inputs()
    W = weight()
    moment = x.T @ x / len(x)
    grid = Grid(3, 16)
    scales, zeros = grid_params(W, grid)
    nearest = dequantize(quantize(W, scales, zeros, grid), scales, zeros, grid)
    codes, s, z = gptq(W, moment, grid)
    fed = dequantize(codes, s, z, grid)

    def err(Wq):
        return ((x @ (Wq - W).T) ** 2).mean()

    assert err(fed) < 0.8 * err(nearest)
    # and the clipping search never does worse than min-max on its own weighted error
    cs, cz = clip_search(W, grid, moment.diagonal())
    clipped = dequantize(quantize(W, cs, cz, grid), cs, cz, grid)
    w = moment.diagonal()
    assert ((clipped - W) ** 2 * w).sum() <= ((nearest - W) ** 2 * w).sum() + 1e-12


def test_weighted_correction_is_the_best_rank_r_fit_on_the_inputs():
    x = correlated_inputs(d=32)
    R = weight(d=32)
    moment = x.T @ x / len(x)
    A, B = weighted_correction(R, moment, 6, "t")
    err = ((x @ (R - A @ B).T) ** 2).mean()
    # the plain SVD of R at the same rank removes less of the error these inputs see
    P, s, Qh = torch.linalg.svd(R, full_matrices=False)
    plain = ((x @ (R - (P[:, :6] * s[:6]) @ Qh[:6]).T) ** 2).mean()
    assert err < plain
    full_A, full_B = weighted_correction(R, moment, 24, "t")
    torch.testing.assert_close(full_A @ full_B, R, rtol=1e-8, atol=1e-8)


def stats_of(x: torch.Tensor) -> ActivationStats:
    return ActivationStats(count=len(x), mean=x.mean(0), diag=(x ** 2).mean(0), second_moment=x.T @ x / len(x))


@pytest.mark.parametrize("options", [dict(), dict(hadamard=True, block=16), dict(correction=4, symmetric=True),
                                     dict(rounding="nearest", clip=True, bits=2)])
def test_layer_computes_its_dense_weight_and_trains_the_scales(options):
    x = correlated_inputs(n=512, d=48).float()
    linear = torch.nn.Linear(48, 24)
    spec = Quantize("t", group=16, **options)
    layer = spec.build("t", linear, stats_of(x.double()))
    assert isinstance(layer, QuantizedLinear)
    y = layer(x)
    torch.testing.assert_close(y.double(), x.double() @ layer.dense_weight().T + linear.bias.double(),
                               rtol=1e-4, atol=1e-4)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"scales"} | ({"A", "B"} if options.get("correction") else set())
    (y - linear(x).detach()).pow(2).mean().backward()
    assert layer.scales.grad is not None and layer.scales.grad.abs().sum() > 0
    assert layer.codes.dtype == torch.uint8 and not layer.codes.requires_grad


def test_the_forward_reads_the_scales_the_export_stores():
    linear = torch.nn.Linear(32, 8)
    layer = Quantize("t", group=8, rounding="nearest").build("t", linear, None)
    with torch.no_grad():
        layer.scales.mul_(1 + 1e-4)  # a trained value between two fp16 numbers
    exported = layer.export_tensors()["w_scales"]
    assert exported.dtype == torch.float16
    torch.testing.assert_close(layer.grid_weight(), dequantize(layer.codes, exported.float(), layer.zeros, layer.grid))


@pytest.mark.parametrize("options", [dict(bits=4, group=32), dict(bits=3, group=48, symmetric=True, correction=3),
                                     dict(bits=2, group=16, hadamard=True, block=16)])
def test_the_size_report_counts_what_export_writes(options, tiny_teacher_dir, tmp_path):
    from safetensors import safe_open

    from test_export import built
    from zoo import export_model

    module = built(Quantize, tiny_teacher_dir, targets="model.layers.*.mlp.{gate,up,down}_proj", rounding="nearest",
                   **options)
    out = export_model(module, tmp_path / "export", dtype="bfloat16")
    summary = module.summary
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    on_disk = sum(t.numel() * t.element_size() for k, t in stored.items() if ".mlp." in k and "_proj." in k)
    assert summary["replaced_bytes"] == on_disk
    assert summary["student_bytes"] == sum(t.numel() * t.element_size() for k, t in stored.items() if k != "lm_head.weight")
    grid = Grid(options["bits"], options["group"], options.get("symmetric", False))
    if not options.get("correction") and not options.get("hadamard"):  # codes, scales and zero points alone
        def row_bytes(n):
            G = grid.groups(n)
            return -(-n // 8) * grid.bits + 2 * G + (0 if grid.symmetric else -(-G // 8) * grid.bits)
        # per layer: gate and up are [128, 64], down [64, 128]
        expected = 2 * (2 * 128 * row_bytes(64) + 64 * row_bytes(128))
        assert summary["replaced_bytes"] == expected
        assert summary["bits_per_weight"] == 8 * expected / (2 * 3 * 64 * 128)


def test_bits_per_weight_of_a_grid():
    assert Grid(4, 64, True).bits_per_weight(576) == 4.25
    assert Grid(4, 128).bits_per_weight(1536) == pytest.approx(4 + 20 / 128)


@pytest.mark.parametrize("bad, needle", [(dict(bits=5), "bits must be one of 2, 3, 4, 8"),
                                         (dict(group=-1), "group must be an int >= 0"),
                                         (dict(rounding="awq"), "valid choices: nearest, gptq"),
                                         (dict(correction=-1), "correction must be an int rank"),
                                         (dict(hadamard=True, block=12), "power of two")])
def test_bad_options_name_the_value(bad, needle):
    with pytest.raises(ZooError, match=needle):
        Quantize("t", **bad)


def test_group_zero_is_one_scale_per_output_channel():
    linear = torch.nn.Linear(40, 6)
    layer = Quantize("t", bits=8, group=0, symmetric=True, rounding="nearest").build("t", linear, None)
    assert layer.scales.shape == (6, 1) and layer.grid.group == 40
    torch.testing.assert_close(layer.grid_weight(), linear.weight.detach(), rtol=0, atol=float(layer.scales.max()))


def test_calibration_free_settings_need_no_statistics_and_others_say_so():
    linear = torch.nn.Linear(16, 4)
    assert Quantize("t", rounding="nearest").needs() == set()
    Quantize("t", rounding="nearest", group=8).build("t", linear, None)
    with pytest.raises(ZooError, match="need calibration statistics"):
        Quantize("t", group=8).build("t", linear, None)
    with pytest.raises(ZooError, match="exceeds min"):
        Quantize("t", group=8, correction=5).build("t", linear, stats_of(correlated_inputs(d=16)))


def test_bf16_exports_of_4_bit_grids_run_the_int4_kernel_with_the_students_logits(tiny_teacher_dir, tmp_path):
    """In bf16 a 4-bit grid runs torch's int4 weight-only CPU kernel; its logits stay within bf16's rounding of the
    fp32 student's (the in-zoo student cast to bf16, dense matmuls of the same grid, is the yardstick)."""
    import zoo
    from test_export import batches, built
    from zoo.export.modeling_zoo import ZooLinear

    module = built(Quantize, tiny_teacher_dir, targets="model.layers.*.mlp.{gate,up,down}_proj", bits=4, group=32)
    ids = batches(1, seed=3)[0]["input_ids"]
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
    out = zoo.export_model(module, tmp_path / "export")
    loaded = zoo.from_pretrained(out, dtype="bfloat16").eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits.float()
    layers = [m for m in loaded.modules() if isinstance(m, ZooLinear)]
    assert layers and all(isinstance(v, tuple) for m in layers for v in m._dense.values())  # the kernel's operands
    import copy

    in_zoo_bf16 = copy.deepcopy(module.model).to(torch.bfloat16)  # dense bf16 matmuls of the same grid
    with torch.no_grad():
        yardstick = in_zoo_bf16(input_ids=ids).logits.float()
    kernel_error = (got - expected).abs().max()
    assert kernel_error <= 2 * (yardstick - expected).abs().max() + 1e-3
