"""Fused exports (issue 26): at load time each affine run of an exported program becomes the fewest matmuls by
folded tensors (``zoo.export.fuse_zoo``), an EigenAttention block's value projector is folded into v_proj and
o_proj; the fused model computes what the stored program computes (fp32: to a few ulps; bf16: to bf16
rounding), stores no more numbers, and saved again it loads back bitwise. Tiny models, CPU, seconds."""
from __future__ import annotations

import copy

import pytest
import torch

import zoo
from techniques import TECHNIQUES as MATRIX
from test_export import MLP, batches, built, logits
from zoo import BlockwisePHD, Composite, EigenAttention, FisherSVD
from zoo.export.fuse_zoo import fuse_program, referenced
from zoo.export.modeling_zoo import ZooLinear, run


def program_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {"V": r(24, 5), "sigma": r(5).abs() + 0.5, "U": r(16, 5), "bias": r(16), "A": r(3, 24), "B": r(16, 3),
            "W": r(16, 24), "rows_in": r(6, 24), "core": r(6, 6), "rows_out": r(6, 16), "center": r(24),
            "index": torch.tensor([0, 3, 5, 9, 11, 20])}


LOW_RANK = [{"op": "matmul", "t": "V"}, {"op": "scale", "t": "sigma"}, {"op": "matmul", "t": "U", "transpose": True}]
#: name -> (program, matmuls after fusing, ops after fusing)
PROGRAMS = {
    "svd": (LOW_RANK + [{"op": "add", "t": "bias"}], ["matmul", "matmul", "add"]),
    "phd_rows": ([{"op": "matmul", "t": "rows_in", "transpose": True}, {"op": "matmul", "t": "core", "transpose": True},
                  {"op": "matmul", "t": "rows_out"}], ["matmul", "matmul"]),
    "shimmed": ([{"op": "sum", "branches": [LOW_RANK, [{"op": "matmul", "t": "A", "transpose": True},
                                                        {"op": "matmul", "t": "B", "transpose": True}]]}],
                ["matmul", "matmul"]),
    "lora": ([{"op": "sum", "branches": [[{"op": "matmul", "t": "W", "transpose": True}, {"op": "add", "t": "bias"}],
                                         [{"op": "matmul", "t": "A", "transpose": True},
                                          {"op": "matmul", "t": "B", "transpose": True}, {"op": "mul", "value": 0.5}]]}],
             ["matmul", "add"]),
    "centered": ([{"op": "add", "t": "center", "alpha": -1.0}, *LOW_RANK, {"op": "mul", "value": 2.0}],
                 ["matmul", "matmul", "add"]),
    "gathered": ([{"op": "gather", "t": "index"}, {"op": "matmul", "t": "core", "transpose": True},
                  {"op": "topk_relu", "k": 3}, {"op": "matmul", "t": "rows_in"}, {"op": "scale", "t": "center"}],
                 ["gather", "matmul", "topk_relu", "matmul"]),
    # one tensor in two runs: folding would store it twice, so the program stays as it is
    "shared": ([{"op": "matmul", "t": "core", "transpose": True}, {"op": "topk_relu", "k": 3},
                {"op": "matmul", "t": "core"}], ["matmul", "topk_relu", "matmul"]),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_fused_program_computes_the_stored_one_with_no_more_numbers(name):
    program, expected_ops = PROGRAMS[name]
    tensors = program_tensors()
    x = torch.randn(7, 24 if name != "shared" else 6, dtype=torch.float64)
    fused, new = fuse_program(program, tensors.__getitem__, torch.float64)
    assert [op["op"] for op in fused] == expected_ops
    assert (fused == program) == (name == "shared")
    both = tensors | new
    expected = run(program, x, tensors.__getitem__)  # its diagonal scales run in fp32, as in the model
    torch.testing.assert_close(run(fused, x, both.__getitem__), expected, rtol=1e-6, atol=1e-6 * expected.abs().max())
    numbers = lambda names, source: sum(source[n].numel() for n in names if source[n].is_floating_point())  # noqa: E731
    assert numbers(referenced(fused), both) <= numbers(referenced(program), tensors)


def low_rank_layer(dtype):
    tensors = program_tensors()
    spec = {"kind": "FisherSVDLinear", "in_features": 24, "out_features": 16, "program": LOW_RANK,
            "tensors": {"V": {"shape": [24, 5], "dtype": "model"}, "sigma": {"shape": [5], "dtype": "float32"},
                        "U": {"shape": [16, 5], "dtype": "model"}}}
    layer = ZooLinear(spec)
    with torch.no_grad():
        for n in ("V", "sigma", "U"):
            getattr(layer, n).data = tensors[n].to(torch.float32 if n == "sigma" else dtype)
    return layer, spec, tensors


def test_a_low_rank_map_runs_as_two_matmuls_with_sigma_folded():
    layer, spec, tensors = low_rank_layer(torch.float32)
    x = torch.randn(3, 24)
    with torch.no_grad():
        expected = layer(x)
        layer.fuse(torch.float32)
        got = layer(x)
    # fp32: the second factor (5 inputs, 16 outputs) is stored [in, out] and run as x @ T
    assert layer._fixed == ([("fused0", True), ("fused1", False)], None)
    assert set(dict(layer.named_parameters())) == {"fused0", "fused1"}
    torch.testing.assert_close(layer.fused0 @ x.T, (x @ (tensors["V"].float() * tensors["sigma"].float())).T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert spec["tensors"] == {"fused0": {"shape": [5, 24], "dtype": "model"}, "fused1": {"shape": [5, 16], "dtype": "model"}}
    bf16, _, _ = low_rank_layer(torch.bfloat16)
    with torch.no_grad():
        stored = bf16(x.bfloat16())
        bf16.fuse(torch.bfloat16)
        fused = bf16(x.bfloat16())
    assert bf16._fixed == ([("fused0", True), ("fused1", True)], None)  # bf16: nn.Linear's layout for both
    assert (fused.float() - stored.float()).abs().max() <= 0.02 * stored.float().abs().max()


#: every row of the technique matrix that needs no file made by the contract's fixtures, and a mix
TECHNIQUES = {name: row[:2] for name, row in MATRIX.items()
              if not {"{basis}", "{perturbed}", "{teacher}"} & set(map(str, row[1].values()))}
TECHNIQUES["composite"] = (Composite, dict(parts=[FisherSVD(MLP, rank=8), EigenAttention("model.layers.1.self_attn", k=8),
                                                  BlockwisePHD("model.layers.0.self_attn.o_proj", rank=8, block=16)]))


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_fused_and_stored_programs_agree_in_both_dtypes(name, tiny_teacher_dir, tmp_path):
    cls, kwargs = TECHNIQUES[name]
    module = built(cls, tiny_teacher_dir, **kwargs)
    ids = batches(1, seed=5)[0]["input_ids"]
    for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 0.02)):
        out = zoo.export_model(module, tmp_path / dtype, dtype=dtype)
        stored = logits(zoo.from_pretrained(out, fuse=False), ids).float()
        fused_model = zoo.from_pretrained(out)
        fused = logits(fused_model, ids).float()
        assert (fused - stored).abs().max() <= tolerance * stored.abs().max(), dtype
        packed_model = zoo.from_pretrained(out, onednn=True)
        packed = logits(packed_model, ids).float()
        assert (packed - stored).abs().max() <= tolerance * stored.abs().max(), dtype
        replaced = [m for m in packed_model.modules() if isinstance(m, ZooLinear) and m._fixed]
        assert all(m.__dict__.get("_onednn") for m in replaced), "a fused map did not run through oneDNN"
        assert packed_model.lm_head.__dict__.get("_onednn"), "lm_head did not run through oneDNN"
        before = sum(p.numel() for p in zoo.from_pretrained(out, fuse=False).parameters())
        assert sum(p.numel() for p in fused_model.parameters()) <= before


def test_a_fused_export_saved_again_loads_back_bitwise(tiny_teacher_dir, tmp_path):
    module = built(zoo.Composite, tiny_teacher_dir, **TECHNIQUES["composite"][1])
    out = zoo.export_model(module, tmp_path / "export")
    fused = zoo.from_pretrained(out)
    attention = fused.get_submodule("model.layers.1.self_attn")
    assert attention.values_folded and not hasattr(attention, "U_values")
    fused.save_pretrained(tmp_path / "again")
    for name in ("modeling_zoo.py", "fuse_zoo.py"):
        (tmp_path / "again" / name).write_text((out / name).read_text())
    ids = batches(1, seed=6)[0]["input_ids"]
    assert torch.equal(logits(zoo.from_pretrained(tmp_path / "again"), ids), logits(fused, ids))


def test_compiled_forward_keeps_the_logits(tiny_teacher_dir, tmp_path):
    module = built(zoo.FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1])
    out = zoo.export_model(module, tmp_path / "export")
    ids = batches(1, seed=7)[0]["input_ids"]
    compiled = zoo.from_pretrained(out, compile={"backend": "eager"})
    assert compiled.forward is not type(compiled).forward
    torch.testing.assert_close(logits(compiled, ids), logits(zoo.from_pretrained(out), ids), rtol=0, atol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_onednn_packing_follows_the_weights_and_keeps_training_on_f_linear(tiny_model):
    from zoo.export.modeling_zoo import PackedLinear, pack_model

    model = copy.deepcopy(tiny_model).to(torch.bfloat16).eval()
    keys = list(model.state_dict())
    ids = batches(1, seed=8)[0]["input_ids"]
    plain = logits(model, ids)
    pack_model(model)
    assert list(model.state_dict()) == keys and isinstance(model.lm_head, PackedLinear)
    torch.testing.assert_close(logits(model, ids), plain, rtol=0.02, atol=0.02)
    assert model.lm_head._onednn["weight"][2].is_mkldnn  # the packed copy ran
    with torch.no_grad():  # a load writes in place: the stale copy is reordered again
        model.model.layers[0].mlp.down_proj.weight.mul_(-1)
    changed = logits(model, ids)
    assert not torch.allclose(changed, plain, atol=0.1)
    model.model.layers[0].mlp.down_proj.__dict__["_onednn"] = None  # this layer on F.linear: the reference
    torch.testing.assert_close(changed, logits(model, ids), rtol=0.02, atol=0.02)
    twin = copy.deepcopy(model)  # the packed copies are left out of a copy (oneDNN's layout has no storage)
    assert twin.lm_head._onednn == {}
    torch.testing.assert_close(logits(twin, ids), changed, rtol=0, atol=0)
    model.to(torch.float32)  # a cast drops every packed copy
    assert model.lm_head._onednn == {}
    model.lm_head.weight.requires_grad_(True)
    out = model.lm_head(torch.randn(2, model.config.hidden_size, requires_grad=True))
    out.sum().backward()  # with grad: F.linear, so the weight gets its gradient
    assert model.lm_head.weight.grad is not None and model.lm_head._onednn == {}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_onednn_runs_an_fp32_factor_stored_in_out(tiny_teacher_dir, tmp_path):
    module = built(zoo.FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1])
    out = zoo.export_model(module, tmp_path / "export", dtype="float32")
    ids = batches(1, seed=9)[0]["input_ids"]
    model = zoo.from_pretrained(out, onednn=True)
    stored_in_out = [m for m in model.modules() if isinstance(m, ZooLinear) and m._fixed and
                     not all(linear for _, linear in m._fixed[0])]
    assert stored_in_out, "no fp32 factor is stored [in, out]"
    torch.testing.assert_close(logits(model, ids), logits(zoo.from_pretrained(out), ids), rtol=1e-4, atol=1e-4)
    assert all(m._onednn for m in stored_in_out)
