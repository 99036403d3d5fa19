"""EigenAttention on tiny Llama models: exactness at k = head_dim (training forward and generation), the
low-dimensional cache, k selection, errors, repair and mixing."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import DynamicCache

from conftest import build_model, build_tokenizer
from zoo import Composite, EigenAttention, EigenAttentionLayer, FisherSVD
from zoo.core import calibration as calib
from zoo.core.compat import cache_kwargs, output_cache
from zoo.core.errors import ZooError
from zoo.core.surgery import replace, teacher_view
from zoo.eigen_attention import (SUPPORTED_ATTENTION, attention_streams, cache_bytes, kv_cache_report,
                                 score_error_curve)
from zoo_cli import repair_model, zoo_cli

HEAD_DIM = 16  # the tiny model: hidden 64, 4 query heads, 2 KV heads


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n=3, b=4, s=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 380, (b, s), generator=g), "attention_mask": torch.ones(b, s, dtype=torch.long)}
            for _ in range(n)]


def tiny(seed=0, **overrides):
    return build_model(len(build_tokenizer()), seed=seed, **overrides)


def eigen_student(model, spec: EigenAttention, data=None):
    names = spec.resolve(model)
    taps = {n: spec.tap for n in names}
    stats = calib.collect(model, data or batches(), [], progress=False, taps=taps)
    plan = spec.plan({n: model.get_submodule(n) for n in names}, stats)
    replace(model, names, lambda name, module: spec.build(name, module, None, plan), spec.target_kind)
    return stats, plan


def logits_both(model, ids, mask=None):
    with torch.no_grad():
        student = model(input_ids=ids, attention_mask=mask).logits
        with teacher_view(model):
            teacher = model(input_ids=ids, attention_mask=mask).logits
    return teacher, student


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_full_k_equals_the_original_in_the_training_forward(implementation):
    model = tiny(attn_implementation=implementation)
    eigen_student(model, EigenAttention(k=HEAD_DIM))
    assert isinstance(model.model.layers[0].self_attn.replacement, EigenAttentionLayer)
    ids = batches(1, b=3, s=40, seed=1)[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    teacher, student = logits_both(model, ids, mask)
    assert (teacher - student).abs().max() < 1e-4
    # gradients reach the projectors; the shared attention weights stay frozen
    model.requires_grad_(False)
    for layer in model.model.layers:
        layer.self_attn.replacement.U_keys.requires_grad_(True)
        layer.self_attn.replacement.U_values.requires_grad_(True)
    out = model(input_ids=ids, attention_mask=mask).logits
    out.float().pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {f"model.layers.{i}.self_attn.replacement.U_{w}" for i in range(2) for w in ("keys", "values")}


def test_full_k_generation_equals_the_original_step_by_step():
    model = tiny(seed=1)
    eigen_student(model, EigenAttention(k=HEAD_DIM))
    ids = batches(1, b=2, s=12, seed=3)[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        student = model.generate(ids, **kwargs)
        with teacher_view(model):
            teacher = model.generate(ids, **kwargs)
    assert torch.equal(student.sequences, teacher.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(teacher.logits, student.logits))
    assert diff < 1e-4
    # the student's cache holds its keys in k dims (here k = head_dim): the library's cache, our shapes
    assert output_cache(student).layers[0].keys.shape[-1] == HEAD_DIM


def test_compressed_cache_generation_runs_hundreds_of_tokens_and_holds_k_dims():
    model = tiny(seed=2)
    eigen_student(model, EigenAttention(k_keys=[4, 6], k_values=[3, 5]))
    report = kv_cache_report(model)
    # 2 layers x 2 KV heads x (kK + kV) x 4 bytes vs 2 x 2 x 2 x 16 x 4
    assert report["kv_cache_bytes_per_token"] == 2 * ((4 + 3) + (6 + 5)) * 4
    assert report["kv_cache_bytes_per_token_original"] == 2 * 2 * 2 * HEAD_DIM * 4
    ids = batches(1, b=2, s=8, seed=4)[0]["input_ids"]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=320,
                             min_new_tokens=320, do_sample=True, top_k=20, pad_token_id=0)
    assert out.shape == (2, 8 + 320)
    layers = cache.layers
    assert [tuple(layer.keys.shape) for layer in layers] == [(2, 2, 327, 4), (2, 2, 327, 6)]
    assert [layer.values.shape[-1] for layer in layers] == [3, 5]
    # measured bytes in the cache = the report's bytes per token x tokens x batch
    assert cache_bytes(cache) == report["kv_cache_bytes_per_token"] * 327 * 2
    # the teacher's own cache, for the ratio measured in one run
    teacher_cache = DynamicCache(config=model.config)
    with torch.no_grad(), teacher_view(model):
        model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, teacher_cache),
                       max_new_tokens=320, min_new_tokens=320, do_sample=False, pad_token_id=0)
    assert cache_bytes(teacher_cache) == report["kv_cache_bytes_per_token_original"] * 327 * 2


def test_projectors_come_from_the_rotated_queries_and_keys():
    model = tiny(seed=3)
    attn = model.model.layers[1].self_attn
    captured = {}
    handle = attn.register_forward_hook(
        lambda m, a, kw, o: captured.update(attention_streams(m, kw["hidden_states"], kw["position_embeddings"])),
        with_kwargs=True)
    data = batches(1, b=2, s=20)
    with torch.no_grad():
        model(**data[0])
    handle.remove()
    spec = EigenAttention(targets="model.layers.1.self_attn", k=5, key_basis="keys")
    stats, plan = eigen_student(model, spec, data)
    keys = captured["keys"].reshape(-1, 2 * HEAD_DIM).double()
    C = keys.T @ keys / len(keys)
    assert torch.allclose(stats["model.layers.1.self_attn:keys"].second_moment, C, atol=1e-5)
    # the projector of group 1 spans the top-5 eigenvectors of its block
    vals, vecs = torch.linalg.eigh(C[HEAD_DIM:, HEAD_DIM:])
    top = vecs[:, -5:]
    U = plan["model.layers.1.self_attn"]["U_keys"][1]
    assert torch.allclose(U @ U.T, top @ top.T, atol=1e-6)
    # queries: each head is a sample of its group (head h in group h // n_rep)
    assert stats["model.layers.1.self_attn:queries"].count == 2 * stats["model.layers.1.self_attn:keys"].count


def test_variance_and_error_thresholds_choose_k():
    model = tiny(seed=4)
    spec = EigenAttention(variance=1.0)
    _, plan = eigen_student(model, spec)
    assert all(p["k_keys"] == HEAD_DIM and p["k_values"] == HEAD_DIM for p in plan.values())
    _, loose = eigen_student(tiny(seed=4), EigenAttention(variance=0.5))
    _, tight = eigen_student(tiny(seed=4), EigenAttention(variance=0.9))
    for name, p in loose.items():
        assert p["k_keys"] <= tight[name]["k_keys"] and p["k_values"] <= tight[name]["k_values"]
        assert p["variance_keys"] >= 0.5 and tight[name]["variance_values"] >= 0.9
    _, plan = eigen_student(tiny(seed=4), EigenAttention(error=0.1, round_to=4))
    for p in plan.values():
        assert p["logit_error"] <= 0.1 and p["k_keys"] % 4 == 0 and 1 - p["variance_values"] <= 0.1 + 1e-9


def test_score_error_curve_is_the_dense_formula():
    torch.manual_seed(0)
    d = 8
    A, B = torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)
    Cq, Ck = A @ A.T, B @ B.T
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    curve = score_error_curve(basis, Cq, Ck)
    for k in range(d + 1):
        P = basis[:, :k] @ basis[:, :k].T
        R = torch.eye(d, dtype=torch.float64) - P
        assert abs(curve[k] - torch.trace(R @ Cq @ R @ Ck) / torch.trace(Cq @ Ck)) < 1e-10
    assert abs(curve[0] - 1) < 1e-12 and abs(curve[d]) < 1e-12
    # and it is the mean-square logit error of independent (q, k) pairs
    q, k = torch.randn(4000, d, dtype=torch.float64) @ A.T, torch.randn(4000, d, dtype=torch.float64) @ B.T
    P = basis[:, :3] @ basis[:, :3].T
    mc = ((q @ (torch.eye(d, dtype=torch.float64) - P)) * k).sum(1).pow(2).mean() / (q * k).sum(1).pow(2).mean()
    assert abs(mc - curve[3]) / curve[3] < 0.15


def test_bad_k_and_unsupported_family_are_clear_errors():
    model = tiny()
    with pytest.raises(ZooError, match=r"k_keys=17 .* above head_dim=16"):
        eigen_student(model, EigenAttention(k_keys=17, k_values=4))
    with pytest.raises(ZooError, match="positive int"):
        EigenAttention(k=0)
    with pytest.raises(ZooError, match="valid choices: queries_keys, keys"):
        EigenAttention(key_basis="values")
    with pytest.raises(ZooError, match="matches no attention module"):
        EigenAttention(targets="model.layers.0.mlp").resolve(model)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ZooError) as err:
        EigenAttention(targets="transformer.h.*.attn").resolve(gpt2)
    assert "GPT2Attention" in str(err.value) and all(f in str(err.value) for f in SUPPORTED_ATTENTION)


def test_other_llama_family_members_are_exact_at_full_k():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shapes = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    for cls, cfg in ((MistralForCausalLM, MistralConfig), (Qwen2ForCausalLM, Qwen2Config)):
        torch.manual_seed(0)
        model = cls(cfg(**shapes)).eval()
        eigen_student(model, EigenAttention(k=HEAD_DIM))
        ids = batches(1, b=2, s=24)[0]["input_ids"]
        teacher, student = logits_both(model, ids)
        assert (teacher - student).abs().max() < 1e-4, cls.__name__


def test_composite_mixes_eigen_attention_with_fisher_svd_and_refuses_nested_targets(tiny_teacher_dir):
    model = Composite(parts=[EigenAttention(variance=0.9), FisherSVD("model.layers.*.mlp.down_proj", rank=8)],
                      teacher=tiny_teacher_dir)
    model.build_student(batches(2), "tiny")
    trainable = set(model.trainable_parameters())
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"U_keys", "U_values", "sigma"}
    assert model.summary["kv_cache_ratio"] < 1.0
    with pytest.raises(ZooError, match="inside 'model.layers.0.self_attn'"):  # before the weights load
        Composite(parts=[EigenAttention(k=4), FisherSVD("model.layers.0.self_attn.o_proj", rank=8)],
                  teacher=tiny_teacher_dir)


def test_zoo_fit_repairs_projectors_and_validate_rebuilds(tmp_path, tiny_teacher_dir, capsys):
    config = {
        "seed_everything": 0,
        "model": repair_model("zoo.EigenAttention", **{"teacher": tiny_teacher_dir, "k": 4, "lr": 0.02}),
        "data": {"class_path": "recipes.DistillationDataModule",
                 "init_args": {"seq_len": 32, "batch_size": 2, "n_calibration": 4, "n_train": 8, "n_heldout": 4,
                               "max_repeat": 4.0, "code": {"max_files": 40},
                               "hologram": {"n_samples": 6, "max_new_tokens": 24, "gen_batch_size": 6}}},
        "trainer": {"max_steps": 8, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"), "check_val_every_n_epoch": 1,
                    "callbacks": [{"class_path": "callbacks.HeldoutKLGate", "init_args": {"tolerance": 1.0}},
                                  {"class_path": "callbacks.RepairStateCheckpoint"}]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = zoo_cli(["fit", "--config", str(path)], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    summary = metrics["summary"]
    assert summary["heldout_kl_after"] < summary["heldout_kl_before"]
    assert summary["kv_cache_ratio"] == pytest.approx(4 / HEAD_DIM)
    state = tmp_path / "run" / "repair_state.safetensors"
    with safe_open(str(state), "pt") as f:
        assert sorted(f.keys()) == sorted(f"model.layers.{i}.self_attn.replacement.U_{w}"
                                          for i in range(2) for w in ("keys", "values"))
    code, _, err = zoo_cli(["validate", "--config", str(path), "--ckpt_path", str(state)], capsys)
    assert code == 0, err
    validated = json.loads((tmp_path / "run" / "metrics_validate.json").read_text())
    assert abs(validated["final"]["heldout_kl"] - summary["heldout_kl_after"]) < 1e-5


@pytest.mark.parametrize("config", ["configs/recipes/eigen_attention.yaml", "configs/recipes/mixed_eigen_fisher.yaml"])
def test_shipped_configs_parse(config, capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code, out, err = zoo_cli(["fit", "--config", str(root / config), "--print_config"], capsys)
    assert code == 0, err
    parsed = yaml.safe_load(out)["model"]
    text = json.dumps(parsed)
    assert "EigenAttention" in text and "self_attn" in text


@pytest.mark.slow
def test_embedded_teacher_full_k_is_exact_and_compressed_generation_runs():
    from zoo.core.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    rows = [tokenizer(t).input_ids for t in ("def add(a, b):\n    return a + b\n\ndef mul(a, b):",
                                             "import os\nimport sys\n\nclass Config:\n    def __init__(self):")]
    ids = torch.tensor([r[:min(map(len, rows))] for r in rows])
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    eigen_student(model, EigenAttention(k=64), data)
    teacher, student = logits_both(model, ids)
    assert (teacher - student).abs().max() < 1e-4
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        with teacher_view(model):
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < 1e-4


def test_reduced_k_equals_dense_projection_of_rotated_keys_and_values():
    """At k < head_dim the layer is the original attention with every rotated query/key replaced by its
    projection P_K = U_K U_K^T of its KV group and every value by P_V v (a dense reference)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    model = tiny(seed=5, attn_implementation="eager")
    spec = EigenAttention(targets="model.layers.1.self_attn", k_keys=5, k_values=7)
    eigen_student(model, spec)
    wrapper = model.model.layers[1].self_attn
    layer, original = wrapper.replacement, wrapper.original
    torch.manual_seed(0)
    b, s, d = 2, 10, HEAD_DIM
    x = torch.randn(b, s, 64)
    cos, sin = model.model.rotary_emb(x, torch.arange(s)[None].expand(b, -1))
    causal = torch.full((s, s), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        got, _ = layer(x, position_embeddings=(cos, sin), attention_mask=causal)
        q = original.q_proj(x).view(b, s, -1, d).transpose(1, 2)
        k = original.k_proj(x).view(b, s, -1, d).transpose(1, 2)
        v = original.v_proj(x).view(b, s, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        PK = layer.U_keys @ layer.U_keys.transpose(1, 2)  # [kv, d, d]
        PV = layer.U_values @ layer.U_values.transpose(1, 2)
        k, v = k @ PK, v @ PV
        q = q @ repeat_kv(PK[None], 2)[0]  # head h uses group h // 2
        scores = q @ repeat_kv(k, 2).transpose(2, 3) * d ** -0.5 + causal
        ref = (scores.softmax(-1) @ repeat_kv(v, 2)).transpose(1, 2).reshape(b, s, -1)
        ref = original.o_proj(ref)
    assert (got - ref).abs().max() < 1e-5
    assert not torch.allclose(got, original(x, position_embeddings=(cos, sin), attention_mask=causal)[0], atol=1e-3)
