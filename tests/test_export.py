"""zoo export (issue 15): a trained student reloads with its logits through ``zoo.from_pretrained`` (every
technique: the export column of test_contract.py) and through transformers' remote code in a process that cannot
import the zoo; merge folds size-keeping repairs into a plain checkpoint. Tiny in-process teachers, CPU, seconds."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

import zoo
from techniques import TECHNIQUES, batches, reloads_with_the_same_logits
from techniques import lm_logits as logits
from techniques import perturb as move
from zoo import (BlockwisePHD, Composite, EigenAttention, FisherSVD, LoRA, TASECoupledCore, UniversalBasis, export_model,
                 export_student)
from zoo_cli import repair
from zoo.core.errors import ZooError

MLP = "model.layers.{0..1}.mlp.down_proj"


def built(cls, teacher, perturb=True, **kwargs):
    module = cls(teacher=teacher, **kwargs) if cls is Composite else repair(cls, teacher=teacher, **kwargs)
    module.build_student(batches(), data_fingerprint="test")
    if perturb:  # a trained student, not its initialization: the export must carry the trained tensors
        move(module)
    return module


def test_a_mix_of_techniques_exports_and_reloads(tiny_teacher_dir, tmp_path):
    module = built(Composite, tiny_teacher_dir, perturb=False, parts=[
        FisherSVD(MLP, rank=8), EigenAttention("model.layers.1.self_attn", k=8),
        BlockwisePHD("model.layers.0.self_attn.o_proj", rank=8, block=16)])
    reloads_with_the_same_logits(module, tmp_path / "export")


def test_compressed_export_is_smaller_than_the_teacher(tiny_teacher_dir, tmp_path):
    module = built(FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd_all_but_one"][1])
    out = export_model(module, tmp_path / "export")
    summary = json.loads((out / "config.json").read_text())["zoo"]["summary"]
    teacher_bytes = sum(p.numel() * 4 for p in torch.nn.Module.parameters(zoo.load_causal_lm(tiny_teacher_dir)[0]))
    assert summary["student_parameters"] < summary["teacher_parameters"]
    assert (out / "model.safetensors").stat().st_size < teacher_bytes
    card = (out / "README.md").read_text()
    assert tiny_teacher_dir in card and f"{summary['parameter_ratio']:.4f}" in card


STANDALONE = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path = [p for p in sys.path if p not in ("", ".")] + sys.argv[3:]
    assert importlib.util.find_spec("zoo") is None, "zoo is importable"
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        print(json.dumps(model(input_ids=ids).logits.tolist()))
    assert "zoo" not in sys.modules
""")


def run_standalone(path, ids, tmp_path):
    """Logits of the export at ``path`` in a fresh python that cannot see the zoo: no site processing (the
    editable install is a .pth file), site-packages added as plain directories, a cwd outside the repo."""
    import site
    import transformers

    dirs = [p for p in {*site.getsitepackages(), str(__import__("pathlib").Path(transformers.__file__).parents[1])}]
    result = subprocess.run([sys.executable, "-S", "-c", STANDALONE, str(path), json.dumps(ids.tolist()), *dirs],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("name", ["fisher_svd", "blockwise_phd_transform_pad", "coupled_core_shims_default_block",
                                  "tase_coupled_core", "lora", "eigen_attention",
                                  "quantize_mlp_in_hadamard_correction"])
def test_export_loads_with_transformers_alone(name, tiny_teacher_dir, tmp_path):
    cls, kwargs = TECHNIQUES[name][:2]
    module = built(cls, tiny_teacher_dir, **kwargs)
    ids = batches(1, seed=4)[0]["input_ids"]
    expected = logits(module.model, ids)
    out = export_model(module, tmp_path / "export")
    got = run_standalone(out, ids, tmp_path)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_bfloat16_export_keeps_fp32_tensors_and_halves_the_rest(tiny_teacher_dir, tmp_path):
    module = built(FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1])
    out = export_model(module, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        sigma = f.get_tensor("model.layers.0.mlp.down_proj.sigma")
        U = f.get_tensor("model.layers.0.mlp.down_proj.U")
    assert sigma.dtype == torch.float32 and U.dtype == torch.bfloat16
    stored = zoo.from_pretrained(out, fuse=False)  # the program as stored, op by op
    layer = stored.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.U.dtype == torch.bfloat16 and layer.sigma.dtype == torch.float32
    loaded = zoo.from_pretrained(out)  # fused: sigma folded into a factor, two bf16 matmuls
    fused = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert [op["op"] for op in fused.program] == ["matmul", "matmul"] and not hasattr(fused, "sigma")
    assert {p.dtype for p in fused.parameters()} == {torch.bfloat16}
    ids = batches(1)[0]["input_ids"]
    reference = logits(module.model, ids)
    module.model.to(torch.bfloat16)  # the in-zoo student in bf16 (sigma stays fp32 there too)
    expected = logits(module.model, ids)
    # bf16 rounding apart (model.to() also casts the rotary buffer, which a bf16 load keeps in fp32)
    for model in (stored, loaded):
        assert (logits(model, ids).float() - expected.float()).abs().max() <= 0.01 * expected.abs().max()
    assert (expected.float() - reference).abs().max() < 0.1 * reference.abs().max()


# ---- merge ------------------------------------------------------------------------------------------

def test_merge_of_lora_is_a_plain_checkpoint_with_the_students_logits(tiny_teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    module = built(LoRA, tiny_teacher_dir, **TECHNIQUES["lora"][1])
    ids = batches(1)[0]["input_ids"]
    expected = logits(module.model, ids)
    out = export_model(module, tmp_path / "merged", merge=True)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "zoo" not in config and not (out / "modeling_zoo.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no remote code
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_merge_of_a_full_rank_structured_student_matches_its_dense_weight(tiny_teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    module = built(BlockwisePHD, tiny_teacher_dir, targets=MLP, rank=128, rank_out=64, block=16)
    ids = batches(1)[0]["input_ids"]
    out = export_model(module, tmp_path / "merged", merge=True)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    layer = module.model.get_submodule("model.layers.1.mlp.down_proj").replacement
    torch.testing.assert_close(plain.get_submodule("model.layers.1.mlp.down_proj").weight.double(),
                               layer.dense_weight(), rtol=1e-5, atol=1e-6)
    expected = logits(module.model, ids)
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_merge_of_a_compressed_or_nonlinear_student_is_refused(tiny_teacher_dir, tmp_path):
    module = built(FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1])
    with pytest.raises(ZooError, match=r"--merge refused: merging would undo the compression.*FisherSVDLinear"):
        export_model(module, tmp_path / "m", merge=True)
    module = built(TASECoupledCore, tiny_teacher_dir, **TECHNIQUES["tase_coupled_core"][1])
    with pytest.raises(ZooError, match="not an affine map"):
        export_model(module, tmp_path / "m", merge=True)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp*"))


# ---- refusals and bad input ---------------------------------------------------------------------------

def test_a_replacement_without_an_export_description_is_refused_by_name(tiny_teacher_dir, tmp_path):
    module = built(FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1])
    wrapper = module.model.get_submodule("model.layers.1.mlp.down_proj")
    wrapper.replacement = torch.nn.Sequential(wrapper.replacement)  # a layer nobody taught to describe itself
    with pytest.raises(ZooError, match=r"cannot describe 1 replacement\(s\): Sequential \(model.layers.1.mlp.down_proj\)"):
        export_model(module, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_existing_output_needs_overwrite_and_an_incomplete_dir_fails_to_load(tiny_teacher_dir, tmp_path):
    module = built(FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1])
    out = export_model(module, tmp_path / "export")
    with pytest.raises(ZooError, match="exists; pass --overwrite"):
        export_model(module, out)
    export_model(module, out, overwrite=True)
    assert not list(tmp_path.glob(".export.*"))  # neither the temp dir nor the old copy stays behind
    for name in ("model.safetensors", "modeling_zoo.py", "config.json"):
        broken = tmp_path / f"broken-{name}"
        subprocess.run(["cp", "-r", str(out), str(broken)], check=True)
        (broken / name).unlink()
        with pytest.raises(ZooError, match=f"incomplete: it has no {name}"):
            zoo.from_pretrained(broken)


def test_weights_that_do_not_fit_the_zoo_block_fail_to_load(tiny_teacher_dir, tmp_path):
    out = export_model(built(FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1]), tmp_path / "e")
    config = json.loads((out / "config.json").read_text())
    config["zoo"]["modules"]["model.layers.0.mlp.down_proj"]["tensors"]["U"]["shape"] = [64, 7]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZooError, match="could not load the export"):
        zoo.from_pretrained(out)


def test_save_pretrained_of_export_student_points_to_zoo_export(tiny_teacher_dir, tmp_path):
    module = built(FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1])
    model = export_student(module.model)
    with pytest.raises(ZooError, match="use `zoo export`"):
        model.save_pretrained(tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_universal_basis_coefficients_export_and_merge(mode, tiny_teacher_dir, tiny_model, tmp_path):
    from test_universal_basis import TARGETS, random_adapter

    from zoo.universal_basis import DeltaBank, extract_basis

    shapes = {n: (tiny_model.get_submodule(n).out_features, tiny_model.get_submodule(n).in_features) for n in TARGETS}
    bank = DeltaBank([random_adapter(tmp_path / f"a{i}", shapes, seed=i) for i in range(3)])
    basis = extract_basis(bank, mode).save(tmp_path / "basis.safetensors")
    module = built(UniversalBasis, tiny_teacher_dir, basis=str(basis), k=2)
    ids = batches(1)[0]["input_ids"]
    expected = logits(module.model, ids)
    loaded = zoo.from_pretrained(export_model(module, tmp_path / "export"))
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(export_model(module, tmp_path / "merged", merge=True),
                                                  dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_a_failure_mid_export_leaves_no_directory_that_looks_complete(tiny_teacher_dir, tmp_path, monkeypatch):
    module = built(FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1])
    old = export_model(module, tmp_path / "export")
    before = sorted(p.name for p in old.iterdir())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module.tokenizer, "save_pretrained", fail)  # after the weights, before the rename
    with pytest.raises(OSError, match="disk full"):
        export_model(module, tmp_path / "fresh")
    with pytest.raises(OSError, match="disk full"):
        export_model(module, old, overwrite=True)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in old.iterdir()) == before  # the previous export is untouched
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left behind


@pytest.mark.slow
def test_the_embedded_teachers_location_is_its_converted_directory():
    from zoo.core.models import model_location

    path = __import__("pathlib").Path(model_location("smollm2-135m-instruct"))
    assert path.is_absolute() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_a_truncated_weights_file_is_named_by_both_loaders(tiny_teacher_dir, tmp_path):
    import transformers

    from zoo.export import modeling_zoo

    out = export_model(built(FisherSVD, tiny_teacher_dir, **TECHNIQUES["fisher_svd"][1]), tmp_path / "e")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ZooError, match=r"model\.safetensors is not a readable safetensors file"):
        zoo.from_pretrained(out)
    own = modeling_zoo.zoo_causal_lm(transformers.LlamaForCausalLM)  # what modeling_zoo.py runs without the zoo
    with pytest.raises(OSError, match=rf"{out}/model\.safetensors is not a readable safetensors file"):
        own.from_pretrained(str(out))
    plain = tmp_path / "plain"  # a merged export: transformers' own class
    subprocess.run(["cp", "-r", tiny_teacher_dir, str(plain)], check=True)
    (plain / "model.safetensors").write_bytes((plain / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ZooError, match=r"plain/model\.safetensors'? is not a readable safetensors file"):
        zoo.from_pretrained(plain)
