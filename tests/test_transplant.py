"""zoo.Transplant: frozen weights read from another checkpoint (an external quantizer's dequantized output) put
into the student; its bytes reported, its export reloads, bad sources refused by name, and ``zoo fit`` refuses a
student with nothing to train while ``zoo validate`` measures it. Tiny in-process teacher, CPU, seconds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import zoo
from zoo import DistillationModule, Transplant, export_model
from zoo.core.errors import ZooError
from zoo_cli import repair_model, zoo_cli

DOWN = "model.layers.{0..1}.mlp.down_proj"


def built(teacher, source, targets=DOWN, **kwargs):
    module = DistillationModule(parts=[Transplant(targets, source=str(source), **kwargs)], teacher=teacher)
    module.build_student()
    return module


def ids(seed=0):
    return torch.randint(3, 380, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_holds_the_source_weights_and_reports_their_bytes(tiny_teacher_dir, perturbed_teacher_dir):
    module = built(tiny_teacher_dir, perturbed_teacher_dir, bits_per_weight=4.25)
    source = load_file(str(next(Path(perturbed_teacher_dir).glob("*.safetensors"))))
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        wrapper = module.model.get_submodule(name)
        assert torch.equal(wrapper.replacement.weight, source[f"{name}.weight"])
        assert torch.equal(wrapper.replacement.dense_weight(), source[f"{name}.weight"].double())
        assert not torch.equal(wrapper.original.weight, source[f"{name}.weight"])  # the teacher keeps its own
    weights = 2 * 64 * 128
    assert module.summary["quantized_maps"] == 2
    assert module.summary["bits_per_weight"] == 4.25
    assert module.summary["quantized_bytes"] == module.summary["replaced_bytes"] == 4.25 * weights / 8
    # the student's bytes: the source's format for the two maps, the rest of the model at 16 bits
    dense = module.summary["teacher_bytes"] - 2 * weights
    assert module.summary["student_bytes"] == dense + 4.25 * weights / 8
    assert module.trainable_parameters() == {}


def test_export_reloads_with_the_students_logits(tiny_teacher_dir, perturbed_teacher_dir, tmp_path):
    module = built(tiny_teacher_dir, perturbed_teacher_dir, targets="model.layers.*.self_attn.{q,k,v,o}_proj")
    with torch.no_grad():
        expected = module.model(input_ids=ids()).logits
    loaded = zoo.from_pretrained(export_model(module, tmp_path / "export"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_sources_are_refused_by_name(tiny_teacher_dir, tmp_path):
    with pytest.raises(ZooError, match="is not a directory"):
        Transplant(DOWN, source=str(tmp_path / "missing"))
    with pytest.raises(ZooError, match="bits_per_weight"):
        Transplant(DOWN, source=tiny_teacher_dir, bits_per_weight=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZooError, match="holds no .safetensors"):
        built(tiny_teacher_dir, tmp_path / "empty")
    tensors = load_file(str(Path(tiny_teacher_dir) / "model.safetensors"))
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.down_proj.weight"},
              str(lacking / "model.safetensors"))
    with pytest.raises(ZooError, match=r"has no tensor 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        built(tiny_teacher_dir, lacking)
    other = tmp_path / "other"
    other.mkdir()
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :64].contiguous()
    save_file(tensors, str(other / "model.safetensors"))
    with pytest.raises(ZooError, match=r"down_proj\.weight' has shape \(64, 64\), the teacher's has \(64, 128\)"):
        built(tiny_teacher_dir, other)


def _recipe(tmp_path, teacher, source):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": repair_model("zoo.Transplant", teacher=teacher, targets=DOWN, source=str(source), bits_per_weight=4.25),
        "data": {"class_path": "recipes.CodeDataModule",
                 "init_args": {"seq_len": 32, "batch_size": 2, "n_calibration": 2, "n_train": 4, "n_heldout": 2,
                               "max_repeat": 4.0, "code": {"max_files": 10}}},
        "trainer": {"max_steps": 2, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "callbacks.HeldoutKLGate", "init_args": {"tolerance": 100.0}}]}}))
    return str(path)


def test_validate_measures_it_and_fit_refuses_it(tiny_teacher_dir, perturbed_teacher_dir, tmp_path, capsys):
    """The identity source measures KL 0; a moved one more; a fit has nothing to train and says so."""
    teacher_copy = tmp_path / "teacher_copy"
    shutil.copytree(tiny_teacher_dir, teacher_copy)
    kls = {}
    for name, source in (("identity", teacher_copy), ("moved", perturbed_teacher_dir)):
        code, out, err = zoo_cli(["validate", "--config", _recipe(tmp_path, tiny_teacher_dir, source)], capsys)
        assert code == 0, err[-2000:]
        kls[name] = json.loads((tmp_path / "run" / "metrics_validate.json").read_text())["final"]["heldout_kl"]
    assert kls["identity"] < 1e-6 < kls["moved"]
    code, out, err = zoo_cli(["fit", "--config", _recipe(tmp_path, tiny_teacher_dir, perturbed_teacher_dir)], capsys)
    assert code == 2 and "nothing to train" in err and "zoo.Transplant" in err and "zoo validate" in err
