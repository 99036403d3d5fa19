"""``zoo export --format compressed-tensors``: a student on one symmetric low-bit grid loads in plain transformers
(no remote code) with the zoo student's logits; students the format cannot hold are refused by name."""
from __future__ import annotations

import json

import pytest
import torch

from test_export import batches, built
from zoo import FisherSVD, Quantize
from zoo.core.errors import ZooError
from zoo.export.stock import export_compressed_tensors

pytest.importorskip("compressed_tensors")
ALL = ["model.layers.*.self_attn.{q,k,v,o}_proj", "model.layers.*.mlp.{gate,up,down}_proj"]


@pytest.mark.parametrize("bits", [4, 8])
def test_stock_export_loads_without_remote_code_with_the_students_logits(bits, tiny_teacher_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    module = built(Quantize, tiny_teacher_dir, targets=ALL, bits=bits, group=32, symmetric=True)  # scales trained
    ids = batches(1, seed=3)[0]["input_ids"]
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
    out = export_compressed_tensors(module, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["quantization_config"]["format"] == "pack-quantized"
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    name = "model.layers.0.mlp.down_proj"
    assert {f"{name}.weight_packed", f"{name}.weight_scale"} <= keys and f"{name}.weight" not in keys
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind, options, needle", [
    ("asymmetric", dict(targets=ALL, group=32), "asymmetric zero points"),
    ("frame", dict(targets=ALL, group=32, symmetric=True, hadamard=True, block=16), "Hadamard frame"),
    ("correction", dict(targets=ALL, group=32, symmetric=True, correction=2), "low-rank correction"),
    ("ragged", dict(targets=ALL, group=48, symmetric=True), "ragged last group"),
])
def test_students_the_format_cannot_hold_are_refused(kind, options, needle, tiny_teacher_dir, tmp_path):
    module = built(Quantize, tiny_teacher_dir, perturb=False, rounding="nearest", **options)
    with pytest.raises(ZooError, match=needle):
        export_compressed_tensors(module, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_a_low_rank_student_is_refused(tiny_teacher_dir, tmp_path):
    module = built(FisherSVD, tiny_teacher_dir, perturb=False, targets="model.layers.0.mlp.down_proj", rank=8)
    with pytest.raises(ZooError, match="is not a low-bit grid.*--format zoo"):
        export_compressed_tensors(module, tmp_path / "ct")
