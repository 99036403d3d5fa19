"""``zoo plan``: parameter counts from a meta model against real built students, Llama-3.1-8B's count
from a config written here, the activation estimate against what autograd saves, and user errors."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from zoo_cli import repair_model, write_config, zoo_cli

from recipes.recipe import load_recipe
from zoo.core import plan as zp
from zoo.core.models import load_causal_lm
from zoo.core.surgery import export_student, replaced_modules
from zoo.core.technique import Technique

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001,
}

RECIPES = {
    "fisher_svd": repair_model("zoo.FisherSVD", **{"targets": "model.layers.{0..1}.mlp.down_proj", "rank": 8}),
    "fisher_svd_factors": repair_model("zoo.FisherSVD", **{"targets": "model.layers.*.self_attn.{q,o}_proj", "rank": 0.25,
                                         "train_factors": True}),
    "phd_transform": repair_model("zoo.BlockwisePHD", **{"targets": "model.layers.1.mlp.down_proj", "rank": 40, "rank_out": 24,
                                    "block": 32, "compute": "transform"}),
    "coupled_shims": repair_model("zoo.CoupledCore", **{"targets": "model.layers.{0..1}.mlp.down_proj", "rank": 16, "align": True,
                                    "shim_rank": 4, "shim_train": "B", "block": 32}),
    "coupled_phd_input": repair_model("zoo.CoupledCore", **{"targets": "model.layers.{0..1}.mlp.up_proj", "rank": 16,
                                        "residual_side": "input", "residual_frame": "phd", "block": 16}),
    "composite": {"class_path": "zoo.Composite", "init_args": {"parts": [
        {"class_path": "zoo.FisherSVD", "init_args": {"targets": "model.layers.1.mlp.gate_proj", "rank": 8}},
        {"class_path": "zoo.BlockwisePHD", "init_args": {"targets": "model.layers.0.self_attn.o_proj", "rank": 8,
                                                         "block": 16}}]}},
}


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 380, (2, 32), generator=g), "attention_mask": torch.ones(2, 32, dtype=torch.long),
             "loss_mask": torch.ones(2, 32, dtype=torch.long)} for _ in range(n)]


def plan(args, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, stdout, err = zoo_cli(["plan", *args, "--output", str(out)], capsys)
    assert code == 0, err
    return json.loads(out.read_text()), stdout


def kind(t: torch.Tensor, model_dtype: torch.dtype) -> str:
    return {model_dtype: "model", torch.float32: "float32", torch.int64: "int64"}[t.dtype]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_plan_counts_equal_the_built_students(recipe, tiny_teacher_dir, tmp_path, capsys):
    # bf16 weights, so that tensors following the model's dtype and those kept in fp32 differ
    model_cfg = json.loads(json.dumps(RECIPES[recipe]))
    model_cfg["init_args"]["dtype"] = "bfloat16"
    config = write_config(tmp_path, tiny_teacher_dir, model=model_cfg)
    planned, table = plan(["--recipe", config, "--precision", "bf16-true"], tmp_path, capsys)

    module = load_recipe(config, build=False).module
    teacher_params = sum(p.numel() for p in module.model.parameters())
    module.build_student(batches(), data_fingerprint="test")
    built = {}
    for key, names in module.targets.items():
        part = module.parts[int(key.split(":")[0])]
        for name in names:
            wrapper = module.model.get_submodule(name)
            real = {n: (tuple(p.shape), "trainable" if p.requires_grad else "frozen", kind(p, torch.bfloat16))
                    for n, p in wrapper.replacement.named_parameters()}
            real |= {n: (tuple(b.shape), "buffer", kind(b, torch.bfloat16))
                     for n, b in wrapper.replacement.named_buffers()}
            sized = {n: (s.shape, s.role, s.kind) for n, s in part.footprint(name, wrapper.original).items()}
            assert sized == real, name
            built[name] = real
    assert [t["name"] for t in planned["targets"]] == list(built)

    trainable = module.trainable_parameters()
    counts = planned["parameters"]
    assert counts["model"] == teacher_params
    assert counts["trainable"] == sum(p.numel() for p in trainable.values())
    assert planned["bytes"]["repair_state"] == sum(p.numel() * p.element_size() for p in trainable.values())
    assert counts["replaced_original"] == sum(sum(p.numel() for p in w.original.parameters())
                                              for w in replaced_modules(module.model).values())
    assert counts["student"] == sum(p.numel() for p in export_student(module.model).parameters())
    assert f"{counts['trainable']:,}" in table


def test_llama_31_8b_from_a_config_file(tmp_path, capsys):
    path = tmp_path / "llama-3.1-8b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA_31_8B))
    planned, table = plan(["--recipe", "configs/recipes/coupled_core.yaml", "--model", str(path), "--dtype", "bfloat16",
                           "--batch_size", "4", "--seq_len", "2048", "--strategy", "[ddp, fsdp]",
                           "--devices", "[1, 8]"], tmp_path, capsys)
    counts = planned["parameters"]
    assert counts["model"] == 8_030_261_248 and "8,030,261,248" in table
    assert counts["replaced_original"] == 8 * 14336 * 4096
    # per down_proj: core 64 x 64, shim A 16 x 14336 and B 4096 x 16, all trainable, all fp32
    assert counts["trainable"] == 8 * (64 * 64 + 16 * 14336 + 4096 * 16)
    assert planned["bytes"]["repair_state"] == 4 * counts["trainable"]
    assert planned["bytes"]["model_weights"] == 2 * 8_030_261_248
    memory = {(m["settings"]["strategy"], m["settings"]["devices"]): m for m in planned["memory"]}
    assert memory["ddp", 1]["weights"] == memory["ddp", 8]["weights"] > 2 * 8_030_261_248
    assert memory["fsdp", 8]["weights"] < memory["ddp", 8]["weights"] / 3
    assert memory["ddp", 1]["settings"]["recorded_layers"] == 32 - 14
    for m in planned["memory"]:
        assert m["peak"] == m["weights"] + m["training_state"] + m["activations"] + max(m["logits"], m["backward_working_set"])
    assert "ESTIMATE" in table and "fsdp x8" in table


def test_llama_31_8b_sequential_calibration_holds_one_layer(tmp_path, capsys):
    """Issue 16's bound on an 8B shape: a sequential calibration of every linear holds one decoder layer's
    statistics and one depth's hidden states, where the one-pass one holds every target's statistics."""
    path = tmp_path / "llama-3.1-8b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA_31_8B))
    args = ["--recipe", "configs/recipes/compress_zoo.yaml", "--model", str(path), "--dtype", "bfloat16"]
    planned, table = plan(args, tmp_path, capsys)
    c = planned["calibration"]
    tokens, h = 64 * 128, 4096
    assert c["calibration"] == "sequential" and c["tokens"] == tokens
    # q, k, v, o, gate, up: 4096-wide full moments, own + cross; down_proj (14336 > full_cov_max): diagonals
    assert c["statistics"] == 6 * 8 * (2 * h + 2 * h * h) + 8 * (2 * 14336 + 14336)
    assert c["hidden_states"] == 3 * tokens * h * 2 + 2 * tokens * 128 * 4 + tokens * 128
    assert c["peak"] == c["weights"] + c["statistics"] + c["hidden_states"] + c["forward"]
    assert "calibration peak (ESTIMATE, sequential, 8,192 tokens)" in table and "(one layer)" in table
    once, _ = plan([*args, "--overrides", "[--model.init_args.calibration, once]"], tmp_path, capsys)
    assert once["calibration"]["statistics"] == 32 * (6 * 8 * (2 * h + h * h) + 8 * 2 * 14336)  # every layer's
    assert once["calibration"]["hidden_states"] == 0
    # a rank allocation plans from the one-pass statistics first: that is the sequential build's peak then
    alloc, _ = plan([*args, "--overrides", "[--model.init_args.parts.allocation, global]"], tmp_path, capsys)
    assert alloc["calibration"]["statistics"] == once["calibration"]["statistics"]


def test_the_calibration_estimate_of_an_attention_block_recipe(tmp_path, capsys):
    """EigenAttention's targets are attention blocks (taps, not linear inputs): sized without a crash."""
    planned, table = plan(["--recipe", "configs/recipes/eigen_attention.yaml"], tmp_path, capsys)
    assert planned["calibration"]["statistics"] == 0 and "calibration peak (ESTIMATE, once" in table


def test_a_sequential_build_keeps_one_layers_statistics(tiny_teacher_dir, monkeypatch):
    """The statistics alive while a target is built: only its own layer's (counted among live objects)."""
    import gc

    from zoo import DistillationModule, FisherSVD
    from zoo.core.calibration import ActivationStats

    live = []
    real = FisherSVD.build

    def counting(self, name, module, stats, plan):
        gc.collect()
        live.append(sum(isinstance(o, ActivationStats) for o in gc.get_objects()))
        return real(self, name, module, stats, plan)

    monkeypatch.setattr(FisherSVD, "build", counting)
    targets = ["model.layers.*.self_attn.{q,k,v,o}_proj", "model.layers.*.mlp.{gate,up,down}_proj"]
    module = DistillationModule(parts=[FisherSVD(targets, rank=4)], teacher=tiny_teacher_dir, calibration="sequential")
    module.build_student(batches(2), data_fingerprint="live-stats")
    assert len(live) == 14 and max(live) <= 7  # one layer's 7 targets, never both layers' 14


def test_meta_models_need_no_weights():
    model, tokenizer = load_causal_lm("meta:smollm2-135m-instruct", "bfloat16")
    assert tokenizer is None
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once


@pytest.mark.parametrize("target", ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj",
                                    "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"])
def test_activation_estimate_matches_what_autograd_saves(target, tiny_teacher_dir):
    """fp32 on the CPU: the bytes of the tensors autograd saves for the student's backward (parameters
    excluded, each storage once) against the plan's activation term."""
    from zoo import FisherSVD
    from zoo.core.surgery import replace

    real = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    real.requires_grad_(False)
    part = FisherSVD(target, rank=4, weighting="none")
    replace(real, part.resolve(real), lambda n, m: part.build(n, m, None))
    own = {t.data_ptr() for t in [*real.parameters(), *real.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 380, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        real(input_ids=ids, attention_mask=torch.ones_like(ids))

    meta, _ = load_causal_lm(f"meta:{tiny_teacher_dir}")
    resolved = [part.resolve(meta)]
    student = zp.plan_student(meta, [part], resolved, torch.float32)
    estimate = zp.estimate_peak_memory(meta, student, [part], resolved, load_dtype=torch.float32, batch_size=2,
                                       seq_len=96, precision="32-true").activations
    measured = sum(saved.values())
    # left out on purpose: rsqrt statistics, softmax log-sum-exp, rotary tables, rank-4 intermediates
    # measured: estimate / saved bytes = 0.966, 0.988, 0.978, 0.971 for these four targets
    assert measured * 0.93 <= estimate <= measured, (measured, estimate)


class NoFootprint(Technique):
    def build(self, name, module, stats, plan):
        raise AssertionError("zoo plan must not build")


def test_a_technique_without_footprint_is_a_clear_error(tiny_teacher_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_teacher_dir, model={"class_path": "zoo.Composite", "init_args": {
        "parts": [{"class_path": "test_plan.NoFootprint", "init_args": {"targets": "model.layers.0.mlp.down_proj"}}]}})
    code, _, err = zoo_cli(["plan", "--recipe", config], capsys)
    assert code == 2 and "NoFootprint does not implement footprint" in err


@pytest.mark.parametrize("model, message", [
    ("/no/such/dir/config.json", "is not an embedded alias"),
    ("smollm2-135m-instruc", "is not an embedded alias (smollm2-135m-instruct)"),
])
def test_bad_model_sources_name_the_valid_ones(model, message, tiny_teacher_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_teacher_dir)
    code, _, err = zoo_cli(["plan", "--recipe", config, "--model", model], capsys)
    assert code == 2 and message in err, err


def test_bad_plan_options_name_the_valid_choices(tiny_teacher_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_teacher_dir)
    code, _, err = zoo_cli(["plan", "--recipe", config, "--precision", "bf16"], capsys)
    assert code == 2 and "unknown precision 'bf16'" in err and "bf16-mixed" in err
    code, _, err = zoo_cli(["plan", "--recipe", config, "--strategy", "deepspeed"], capsys)
    assert code == 2 and "unknown strategy 'deepspeed'" in err and "fsdp" in err
    (tmp_path / "weights.json").write_text("{}")
    code, _, err = zoo_cli(["plan", "--recipe", config, "--model", str(tmp_path / "weights.json")], capsys)
    assert code == 2 and "weights.json has no hidden_size" in err


def test_the_low_bit_recipe_on_llama_31_8b(tmp_path, capsys):
    """``zoo plan`` sizes ``configs/recipes/compress_int4.yaml`` on an 8B shape from shapes alone: the trainable
    tensors are the fp32 group scales of every linear (224 maps), one per 64 inputs per output row."""
    path = tmp_path / "llama-3.1-8b" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA_31_8B))
    planned, table = plan(["--recipe", "configs/recipes/compress_int4.yaml", "--model", str(path), "--dtype", "bfloat16"],
                          tmp_path, capsys)
    h, m, kv = 4096, 14336, 1024
    per_layer = (h * h + 2 * kv * h + h * h + 2 * m * h + h * m) // 64  # q, k, v, o, gate, up, down
    assert planned["parameters"]["trainable"] == 32 * per_layer
    assert planned["bytes"]["repair_state"] == 4 * 32 * per_layer
