"""The technique matrix: one row per technique setting, run by the contract (test_contract.py, every check
on the tiny Llama, export + reload included) and reused by the export and quantization tests.

A new technique adds one row to ``TECHNIQUES`` (see docs/guides/new-technique.md) and one to the family
matrix (test_families.py).
"""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

import zoo
from zoo import (BlockwisePHD, CoupledCore, EigenAttention, FisherSVD, KFACSVD, LoRA, Quantize, TASECoupledCore,
                 Transplant, UniversalBasis)
from zoo.core.surgery import replaced_modules

DOWN = "model.layers.{0..1}.mlp.down_proj"
ATTN = "model.layers.*.self_attn"
#: every linear map of the decoder but layer 0's gate_proj, which the contract's mixing check gives another part
ALL_BUT_ONE = ["model.layers.*.self_attn.{q,k,v,o}_proj", "model.layers.*.mlp.{up,down}_proj",
               "model.layers.1.mlp.gate_proj"]


def _zero_deltas(module):
    """UniversalBasis's identity setting: zero means and coefficients, so dW = 0."""
    with torch.no_grad():
        for wrapper in replaced_modules(module.model).values():
            for t in [*wrapper.replacement.parameters(recurse=False), *wrapper.replacement.buffers(recurse=False)]:
                t.zero_()


#: name -> (spec, options, full-rank/identity options or None to reuse them, hook making the identity setting);
#: "{basis}", "{perturbed}" and "{teacher}" are files the contract's ``sources`` fixture makes
TECHNIQUES = {
    "fisher_svd": (FisherSVD, dict(targets=DOWN, rank=8), dict(targets=DOWN, rank=64, weighting="none"), None),
    "fisher_svd_all_but_one": (FisherSVD, dict(targets=ALL_BUT_ONE, rank=0.5), None, None),
    "fisher_svd_ratio_factors": (FisherSVD, dict(targets="model.layers.*.self_attn.{q,o}_proj", rank=0.25,
                                                 train_factors=True, weighting="diagonal"), None, None),
    "fisher_svd_factor_lora": (FisherSVD, dict(targets=DOWN, rank=8, factor_lora=2),
                               dict(targets=DOWN, rank=64, weighting="none", factor_lora=2), None),
    "kfac_svd": (KFACSVD, dict(targets=DOWN, rank=8), dict(targets=DOWN, rank=64), None),
    "kfac_svd_factor_lora": (KFACSVD, dict(targets=DOWN, rank=8, factor_lora=3, train_factors=True), None, None),
    "fisher_svd_factor_bits": (FisherSVD, dict(targets="model.layers.*.self_attn.{q,o}_proj", rank=8, factor_bits=4,
                                                factor_group=32), None, None),
    "kfac_svd_factor_bits": (KFACSVD, dict(targets=DOWN, rank=8, factor_bits=3, factor_group=16), None, None),
    "blockwise_phd": (BlockwisePHD, dict(targets=DOWN, rank=8, block=16),
                      dict(targets=DOWN, rank=128, rank_out=64, block=16), None),
    "blockwise_phd_transform": (BlockwisePHD, dict(targets="model.layers.1.mlp.up_proj", rank=16, rank_out=24,
                                                   block=32, compute="transform"), None, None),
    "blockwise_phd_transform_pad": (BlockwisePHD, dict(targets="model.layers.*.mlp.up_proj", rank=8, block=256,
                                                       fit="pad", compute="transform"), None, None),
    "coupled_core_shims": (CoupledCore, dict(targets=DOWN, rank=8, shim_rank=2, block=16),
                           dict(targets=DOWN, rank=128, rank_out=64, shim_rank=2, block=16), None),
    "coupled_core_shims_default_block": (CoupledCore, dict(targets=DOWN, rank=8, shim_rank=2), None, None),
    "coupled_core_phd_input": (CoupledCore, dict(targets="model.layers.{0..1}.mlp.up_proj", rank=16,
                                                 residual_side="input", residual_frame="phd", block=16), None, None),
    "coupled_core_phd_transform": (CoupledCore, dict(targets=DOWN, rank=8, residual_frame="phd", block=16,
                                                     compute="transform"), None, None),
    "tase_coupled_core": (TASECoupledCore, dict(targets=DOWN, rank=8, block=16, expansion=2, k=8),
                          dict(targets=DOWN, rank=128, rank_out=64, block=16, expansion=2), None),
    "tase_coupled_core_input": (TASECoupledCore, dict(targets="model.layers.{0..1}.mlp.up_proj", rank=8, block=16,
                                                      residual_side="input", expansion=2, tase_init="random"),
                                None, None),
    "eigen_attention": (EigenAttention, dict(targets=ATTN, k_keys=8, k_values=12), dict(targets=ATTN, k=16), None),
    "lora": (LoRA, dict(targets="model.layers.*.self_attn.{q,v}_proj", rank=4), None, None),
    "quantize": (Quantize, dict(targets=DOWN, bits=4, group=16),
                 dict(targets=DOWN, bits=8, group=16, correction=64), None),
    "quantize_group_48": (Quantize, dict(targets=DOWN, bits=4, group=48), None, None),
    "quantize_hadamard_correction": (Quantize, dict(targets="model.layers.*.self_attn.{q,o}_proj", bits=3, group=32,
                                                    symmetric=True, hadamard=True, block=16, correction=4, clip=True),
                                     dict(targets="model.layers.*.self_attn.{q,o}_proj", bits=2, group=32,
                                          hadamard=True, block=16, correction=64, rounding="nearest"), None),
    "quantize_mlp_in_hadamard_correction": (Quantize, dict(targets="model.layers.*.mlp.up_proj", bits=3,
                                                           group=64, symmetric=True, hadamard=True, block=32,
                                                           correction=4), None, None),
    "universal_basis": (UniversalBasis, dict(basis="{basis}", k=2), None, _zero_deltas),
    "transplant": (Transplant, dict(targets=DOWN, source="{perturbed}", bits_per_weight=4.25),
                   dict(targets=DOWN, source="{teacher}"), None),
}
#: rows whose student has nothing to train (a repair has nothing to move)
FROZEN = {"transplant"}


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 380, (2, 32), generator=g), "attention_mask": torch.ones(2, 32, dtype=torch.long),
             "loss_mask": torch.ones(2, 32, dtype=torch.long)} for _ in range(n)]


def logits(module, ids):
    """fp32 logits of a training module's student."""
    with torch.no_grad():
        return module(ids).float()


def lm_logits(model, ids):
    """Logits of a causal LM (a student, an export reloaded)."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(module, seed=1):
    """Move every trainable tensor: a trained student, not its initialization, so an export must carry the
    trained tensors to reproduce it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05 * (p.abs().mean() + 1e-3))


def reloads_with_the_same_logits(module, out):
    """Perturb ``module``'s student, export it to ``out``, check the directory's layout, and reload it with
    ``zoo.from_pretrained``: the reloaded model computes the perturbed student's logits."""
    ids = batches(1, seed=3)[0]["input_ids"]
    initial = lm_logits(module.model, ids)
    perturb(module)
    expected = lm_logits(module.model, ids)
    if module.trainable_parameters():
        assert not torch.allclose(expected, initial), "the perturbation moved nothing"
    out = zoo.export_model(module, out)
    config = json.loads((out / "config.json").read_text())
    block = config["zoo"]
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_zoo.ZooForCausalLM"}
    assert set(block["modules"]) == set(sum(module.targets.values(), []))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(".original." in k or ".replacement." in k for k in keys)
    for target, entry in block["modules"].items():
        assert {f"{target}.{t}" for t in entry["tensors"]} <= keys
        if entry["module"] == "linear" and "weight" not in entry["tensors"]:  # the teacher's dense map is not
            assert f"{target}.weight" not in keys  # shipped (a Transplant's own dense map is its "weight")
    got = lm_logits(zoo.from_pretrained(out), ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    return out
