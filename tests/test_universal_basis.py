"""WIZORB universal basis: canonicalization, basis extraction, projection, controls, PEFT adapters
(zoo/universal_basis.py, zoo/lora.py; source 001 sections 4-6). Tiny in-process models, CPU, seconds."""
from __future__ import annotations

import math

import pytest
import torch

from zoo.core.errors import ZooError
from zoo.lora import read_adapter, save_adapter
from zoo.universal_basis_lora import UniversalBasisLoRA
from zoo.universal_basis import (DeltaBank, canonicalize, delta_error_sq, extract_basis, fit_subspace,
                                 leave_out_errors, load_basis, project_adapter, save_projection)

TARGETS = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def _shapes(model) -> dict[str, tuple[int, int]]:
    return {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in TARGETS}


def random_adapter(path, shapes, rank=2, alpha=4.0, seed=0, shared=None):
    """A PEFT adapter with random factors; ``shared`` (module -> (A, B)) is a common part every adapter
    adds, so that a bank has structure beyond noise."""
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for m, (out_f, in_f) in shapes.items():
        A[m] = torch.randn(rank, in_f, generator=g) * 0.1
        B[m] = torch.randn(out_f, rank, generator=g) * 0.1
        if shared is not None:
            A[m] = A[m] + shared[m][0]
            B[m] = B[m] + shared[m][1]
    return save_adapter(path, A, B, rank, alpha, base_model="tiny")


@pytest.fixture
def bank(tmp_path, tiny_model):
    shapes = _shapes(tiny_model)
    paths = [random_adapter(tmp_path / f"adapter_{i}", shapes, seed=i) for i in range(4)]
    return DeltaBank(paths)


def test_canonicalization_leaves_delta_unchanged_and_is_gauge_invariant():
    g = torch.Generator().manual_seed(0)
    A, B, scale = torch.randn(4, 40, generator=g, dtype=torch.float64), torch.randn(24, 4, generator=g,
                                                                                      dtype=torch.float64), 2.5
    a, b = canonicalize(A, B, scale)
    dense = scale * B @ A
    assert torch.linalg.norm(b.T @ a - dense) / torch.linalg.norm(dense) < 1e-12
    # the scale-invariant normalization: ||a_j|| = ||b_j||; rows are orthogonal (they come from an SVD)
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=1), rtol=1e-10, atol=0)
    gram = a @ a.T
    assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-10 * gram.abs().max()
    # the same dW written with other factors (B R^-1, R A: LoRA's rotation/scale gauge) gives the same rows
    R = torch.randn(4, 4, generator=g, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    a2, b2 = canonicalize(R @ A, B @ torch.linalg.inv(R), scale)
    torch.testing.assert_close(a2, a, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(b2, b, rtol=1e-8, atol=1e-10)


def test_canonicalization_of_a_rank_deficient_adapter_keeps_zero_rows():
    A = torch.randn(3, 20, dtype=torch.float64)
    B = torch.zeros(10, 3, dtype=torch.float64)  # PEFT's initialization: B = 0
    a, b = canonicalize(A, B, 1.0)
    assert a.shape == (3, 20) and b.shape == (3, 10)
    assert torch.isfinite(a).all() and float(b.abs().max()) == 0.0


def test_full_rank_basis_reconstructs_a_bank_member(bank, tmp_path):
    basis = extract_basis(bank, "separate")
    path = basis.save(tmp_path / "basis.safetensors")
    basis = load_basis(path)
    k_full = min(mb.rank for mb in basis.modules.values())
    assert k_full == len(bank) * bank.rank - 1  # centered rows of 4 adapters x rank 2
    for i, adapter in enumerate(bank.paths):
        full = project_adapter(basis, adapter, k_full)
        assert full.relative_error() < 1e-4, i
        assert max(full.relative_error(m) for m in full.error_sq) < 1e-4
    # fewer components reconstruct worse, and the mean alone worst of all
    errors = [project_adapter(basis, bank.paths[0], k).relative_error() for k in (0, 2, 5)]
    assert errors[0] > errors[1] > errors[2] > 1e-3


def test_joint_mode_also_reconstructs_at_full_rank(bank):
    basis = extract_basis(bank, "joint")
    k_full = min(mb.rank for mb in basis.modules.values())
    assert project_adapter(basis, bank.paths[2], k_full).relative_error() < 1e-4


def test_random_basis_is_orthonormal_and_seeded():
    sub = fit_subspace(torch.randn(12, 30, dtype=torch.float64))
    C = sub.basis(6, "random", seed=3, key="m")
    assert C.shape == (6, 30)
    torch.testing.assert_close(C @ C.T, torch.eye(6, dtype=C.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(sub.basis(6, "random", seed=3, key="m"), C)
    assert (sub.basis(6, "random", seed=4, key="m") - C).abs().max() > 0.1
    # the universal components are orthonormal too; secondary is components k..2k
    U = sub.basis(5, "universal")
    torch.testing.assert_close(U @ U.T, torch.eye(5, dtype=U.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(sub.basis(4, "secondary"), sub.components[4:8])
    assert sub.basis(4, "mean").shape == (0, 30)
    with pytest.raises(ZooError, match="components 6..12"):
        sub.basis(6, "secondary")


def test_projection_is_orthogonal():
    """Projecting twice changes nothing, and the residual is orthogonal to the basis."""
    X = torch.randn(10, 16, dtype=torch.float64)
    sub = fit_subspace(X)
    C = sub.basis(3)
    _, X_hat = sub.project(X, C)
    _, X_hat2 = sub.project(X_hat, C)
    torch.testing.assert_close(X_hat2, X_hat)
    assert ((X - X_hat) @ C.T).abs().max() < 1e-12


def test_leave_out_errors_train_below_holdout(bank):
    result = leave_out_errors(bank, ks=[0, 2, 5], mode="separate", holdout=1, controls=("universal", "random"))
    uni = result["universal"]
    # at k = the train basis's full rank (3 adapters x 2 rows - 1 = 5) the train adapters reconstruct exactly
    assert max(uni[5]["train"]) < 1e-4
    # independent random adapters share nothing: a left-out one is far from the others' basis
    assert min(uni[5]["holdout"]) > 0.5
    assert len(uni[5]["holdout"]) == len(bank) and len(uni[5]["train"]) == len(bank) * (len(bank) - 1)
    assert result["random"][5]["k_effective"] == 5


def test_coefficient_count_is_2rk_per_module(bank, tmp_path, tiny_teacher_dir):
    from zoo.universal_basis_lora import UniversalBasis
    from zoo_cli import repair

    path = extract_basis(bank, "separate").save(tmp_path / "basis.safetensors")
    module = repair(UniversalBasis, objective="next_token", basis=str(path), k=3, teacher=tiny_teacher_dir)
    module.build_student()
    # a state written before the spec moved to zoo.universal_basis_lora names it by its old class path: the
    # registry's legacy table reads it as the same spec
    from zoo.core.registry import canonical_parts

    old = [{"technique": "zoo.universal_basis.UniversalBasis", "init_args": module.parts[0].init_args()}]
    assert canonical_parts(old) == canonical_parts([module.parts[0].describe()])
    assert canonical_parts(old)[0]["technique"] == "universal_basis"
    params = module.trainable_parameters()
    assert sum(p.numel() for p in params.values()) == 2 * bank.rank * 3 * len(TARGETS)
    assert all(name.endswith(("coef_A", "coef_B")) for name in params)

    joint = extract_basis(bank, "joint").save(tmp_path / "joint.safetensors")
    module = repair(UniversalBasis, objective="next_token", basis=str(joint), k=3, teacher=tiny_teacher_dir)
    module.build_student()
    assert sum(p.numel() for p in module.trainable_parameters().values()) == bank.rank * 3 * len(TARGETS)


def test_projected_adapter_loads_with_peft_and_changes_logits_as_its_delta_says(bank, tmp_path, tiny_teacher_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    basis = extract_basis(bank, "separate", members=[0, 1, 2])
    proj = project_adapter(basis, bank.paths[3], k=3)
    assert 0.05 < proj.relative_error() < 1.5
    out = save_projection(tmp_path / "projected", proj, alpha=8.0, base_model=tiny_teacher_dir)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])

    base = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids).logits

    dense = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    with torch.no_grad():
        for m in proj.a:
            dW = (proj.b[m].T @ proj.a[m]).float()
            dense.get_submodule(m).weight += dW
        dense_logits = dense(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the delta does change the model

    # the PEFT file holds what the projection says: read back, same dW per module
    back = read_adapter(out)
    for m in proj.a:
        e, d = delta_error_sq(proj.a[m], proj.b[m], *canonicalize(back.A[m], back.B[m], back.scale[m]))
        assert math.sqrt(e / d) < 1e-6


def test_universal_basis_layer_matches_dense_and_init_adapter(bank, tmp_path, tiny_teacher_dir):
    from zoo.universal_basis_lora import UniversalBasis
    from zoo_cli import repair

    path = extract_basis(bank, "separate", members=[0, 1, 2]).save(tmp_path / "basis.safetensors")
    module = repair(UniversalBasis, objective="next_token", basis=str(path), k=2, teacher=tiny_teacher_dir,
                                        init_adapter=bank.paths[3])
    module.build_student()
    proj = project_adapter(load_basis(path), bank.paths[3], k=2)
    name = "model.layers.1.mlp.down_proj"
    layer = module.model.get_submodule(name).replacement
    assert isinstance(layer, UniversalBasisLoRA)
    dW = layer.delta_weight().double()
    torch.testing.assert_close(dW, proj.b[name].T @ proj.a[name], atol=1e-5, rtol=1e-4)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        dense = x @ (layer.base.weight + dW.float()).T
        torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)


def test_mean_control_is_k0_and_unknown_control_is_refused(bank, tmp_path):
    basis = extract_basis(bank, "separate")
    mean = project_adapter(basis, bank.paths[0], k=4, control="mean")
    zero = project_adapter(basis, bank.paths[0], k=0)
    assert mean.relative_error() == pytest.approx(zero.relative_error(), rel=1e-12)
    with pytest.raises(ZooError, match="valid choices: universal, random, secondary, mean"):
        project_adapter(basis, bank.paths[0], k=2, control="orthogonal")


def test_peft_adapter_round_trip_and_lora_layer(tmp_path, tiny_model):
    from zoo.lora import peft_lora_layer

    path = random_adapter(tmp_path / "a", _shapes(tiny_model), rank=3, alpha=6.0, seed=7)
    adapter = read_adapter(path)
    assert sorted(adapter.modules) == sorted(TARGETS) and adapter.scale[TARGETS[0]] == pytest.approx(2.0)
    base = tiny_model.get_submodule(TARGETS[0])
    layer = peft_lora_layer(base, 3, 6.0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(adapter.A[TARGETS[0]])
        layer.lora_B["default"].weight.copy_(adapter.B[TARGETS[0]])
    x = torch.randn(2, base.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (base.weight + adapter.delta(TARGETS[0]).float()).T,
                                   atol=1e-5, rtol=1e-5)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.default.weight",
                                                                            "lora_B.default.weight"}
    with pytest.raises(ZooError, match="not a PEFT adapter directory"):
        read_adapter(tmp_path)


def test_next_token_objective_trains_lora(tiny_teacher_dir):
    from zoo.core.module import next_token_nll
    from zoo.lora import LoRA
    from zoo_cli import repair

    module = repair(LoRA, objective="next_token", targets="model.layers.*.self_attn.{q,v}_proj", rank=2, alpha=4.0,
                          teacher=tiny_teacher_dir, lr=1e-2)
    module.build_student()
    params = module.trainable_parameters()
    assert len(params) == 8 and all("lora_" in n for n in params)
    ids = torch.randint(3, 300, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    batch["loss_mask"][:, :8] = 0  # response-only: the prompt's predictions do not count
    module.log = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    nll, count = next_token_nll(module(ids), ids, batch["loss_mask"], batch["attention_mask"])
    assert int(count) == 2 * 8 and float(loss.detach()) == pytest.approx(float(nll / count), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for n, p in params.items() if "lora_A" in n or "lora_B" in n)
    with pytest.raises(ZooError, match="valid choices: distillation, next_token"):
        repair(LoRA, targets="model.layers.0.self_attn.q_proj", teacher=tiny_teacher_dir, objective="nll")


# --------------------------------------------------------------------------------------------------
# the commands, end to end on the tiny teacher


def _bank_config(tmp_path, teacher) -> str:
    import yaml

    config = {
        "teacher": teacher, "targets": "model.layers.*.self_attn.{q,v}_proj", "rank": 2, "alpha": 4.0,
        "lr": 0.01, "steps": 2, "n_adapters": 3, "output_dir": str(tmp_path / "bank"), "logger": False,
        "accelerator": "cpu",
        "data": {"class_path": "recipes.CodeDataModule",
                 "init_args": {"seq_len": 32, "batch_size": 2, "n_calibration": 1, "n_train": 4, "n_heldout": 2,
                               "code": {"max_files": 12}}},
    }
    path = tmp_path / "bank.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_bank_basis_project_commands(tmp_path, tiny_teacher_dir, capsys):
    import json

    from safetensors import safe_open
    from zoo_cli import zoo_cli

    config = _bank_config(tmp_path, tiny_teacher_dir)
    code, out, err = zoo_cli(["bank", "--config", config], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert [e["name"] for e in manifest["adapters"]] == ["adapter_00", "adapter_01", "adapter_02"]
    assert [e["shard"] for e in manifest["adapters"]] == [0, 1, 2]
    for e in manifest["adapters"]:
        adapter = read_adapter(tmp_path / "bank" / e["name"])
        assert len(adapter.modules) == 4 and adapter.rank(adapter.modules[0]) == 2
        assert float(adapter.B[adapter.modules[0]].abs().max()) > 0  # trained: B left PEFT's zero init
    # resumable: a second run keeps every saved adapter
    code, out, err = zoo_cli(["bank", "--config", config], capsys)
    assert code == 0, err
    assert out.count("already trained") == 3

    code, out, err = zoo_cli(["basis", "--bank", str(tmp_path / "bank"), "--exclude", "[adapter_02]",
                              "--output_dir", str(tmp_path / "basis"), "--logger", "true"], capsys)
    assert code == 0, err
    assert list((tmp_path / "basis" / "wandb").glob("offline-run-*"))  # the table and chart went to W&B
    result = json.loads((tmp_path / "basis" / "basis.json").read_text())
    assert [r["k"] for r in result["rows"]] == [0, 1]  # leave-one-out of 2 adapters x rank 2: rank <= 1
    assert (tmp_path / "basis" / "basis.png").stat().st_size > 1000
    with safe_open(str(tmp_path / "basis" / "basis.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.A.components").shape == (3, 64)  # 2 x 2 rows - 1

    code, out, err = zoo_cli(["project", "--adapter", str(tmp_path / "bank" / "adapter_02"),
                              "--basis", str(tmp_path / "basis" / "basis.safetensors"), "--k", "1",
                              "--control", "[universal, random, secondary, mean]",
                              "--output_dir", str(tmp_path / "proj"), "--logger", "false"], capsys)
    assert code == 0, err
    payload = json.loads((tmp_path / "proj" / "projection.json").read_text())
    assert [s["control"] for s in payload["summary"]] == ["universal", "random", "secondary", "mean"]
    assert all(0 < s["overall"] < 2 for s in payload["summary"])
    for name in ("universal-k1", "random-k1", "secondary-k1", "mean-k0"):
        assert read_adapter(tmp_path / "proj" / name).modules

    code, out, err = zoo_cli(["project", "--adapter", str(tmp_path / "bank" / "adapter_02"),
                              "--basis", str(tmp_path / "basis" / "basis.safetensors"), "--control", "orthogonal",
                              "--logger", "false"], capsys)
    assert code == 2 and "valid choices: universal, random, secondary, mean" in err
