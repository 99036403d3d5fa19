"""Blockwise PHD layers, coupled cores, shims and the shim-dominance gate, on tiny models."""
import json

import lightning as L
import pytest
import torch
from safetensors import safe_open

from zoo import BlockwisePHD, CoupledCore, Shim
from zoo_cli import repair, repair_model, write_config, zoo_cli
from zoo.core import calibration as calib
from zoo.core.errors import ZooError
from zoo.core.linalg import procrustes
from zoo.core.surgery import teacher_view
from zoo.coupled import ShimmedLinear

TARGET = "model.layers.0.mlp.down_proj"  # 128 -> 64 in the tiny model
BOTH = "model.layers.{0..1}.mlp.down_proj"


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 380, (2, 48), generator=g), "attention_mask": torch.ones(2, 48, dtype=torch.long),
             "loss_mask": torch.ones(2, 48, dtype=torch.long)} for _ in range(n)]


@pytest.fixture(scope="module")
def calibrated(tiny_model):
    stats = calib.collect(tiny_model, batches(), [TARGET], progress=False)[TARGET]
    inputs = []
    hook = tiny_model.get_submodule(TARGET).register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches():
            tiny_model(input_ids=b["input_ids"])
    hook.remove()
    return tiny_model.get_submodule(TARGET), stats, torch.cat(inputs).double()


@pytest.mark.parametrize("core_init", ["lstsq", "slice"])
@pytest.mark.parametrize("compute", ["rows", "transform"])
def test_full_index_sets_reproduce_w(calibrated, core_init, compute):
    module, stats, X = calibrated
    spec = BlockwisePHD(TARGET, rank=128, rank_out=64, block=32, core_init=core_init, compute=compute)
    layer = spec.build(TARGET, module, stats).double()
    W = module.weight.double()
    assert (layer.dense_weight() - W).norm() / W.norm() < 1e-6
    assert torch.allclose(layer(X[:16]), X[:16] @ W.T, atol=1e-8)


def test_rows_and_transform_compute_the_same_function(calibrated):
    module, stats, X = calibrated
    a = BlockwisePHD(TARGET, rank=24, rank_out=16, block=16, compute="rows").build(TARGET, module, stats).double()
    b = BlockwisePHD(TARGET, rank=24, rank_out=16, block=16, compute="transform").build(TARGET, module, stats).double()
    assert torch.allclose(a(X[:32]), b(X[:32]), atol=1e-10)
    assert b.down.frame is not None and a.down.frame is None


def test_least_squares_core_beats_the_slice_on_output_error(calibrated):
    module, stats, X = calibrated
    W = module.weight.double()
    errors = {}
    for init in ("lstsq", "slice"):
        layer = BlockwisePHD(TARGET, rank=16, block=32, core_init=init).build(TARGET, module, stats).double()
        errors[init] = ((X @ (W - layer.dense_weight()).T) ** 2).sum().item()
    assert errors["lstsq"] < errors["slice"]


def test_energy_chosen_rows_beat_a_random_choice(calibrated):
    module, stats, X = calibrated
    W = module.weight.double()
    layer = BlockwisePHD(TARGET, rank=16, block=32).build(TARGET, module, stats).double()
    chosen = ((X @ (W - layer.dense_weight()).T) ** 2).sum().item()
    # same frames, random rows, least-squares core
    from zoo.core.hadamard import PHDFrame
    from zoo.core.seeds import derive_seed
    from zoo.phd import core_least_squares
    f_in = PHDFrame(128, 32, derive_seed(0, TARGET, "input"))
    f_out = PHDFrame(64, 32, derive_seed(0, TARGET, "output"))
    g = torch.Generator().manual_seed(0)
    worse = 0
    for _ in range(5):
        A = f_in.rows(torch.randperm(128, generator=g)[:16])
        B = f_out.rows(torch.randperm(64, generator=g)[:16])
        C = core_least_squares(W, stats.second_moment, A, B)
        worse += ((X @ (W - B.T @ C @ A).T) ** 2).sum().item() > chosen
    assert worse == 5


def test_layer_keeps_core_fp32_under_bf16_and_trains_only_core_and_bias(calibrated):
    module, stats, _ = calibrated
    layer = BlockwisePHD(TARGET, rank=8, block=32).build(TARGET, module, stats).to(torch.bfloat16)
    assert layer.core.dtype == torch.float32 and layer.down.rows.dtype == torch.bfloat16
    assert layer(torch.randn(3, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["core"]
    assert list(layer.state_dict()) == ["core"]  # frames are rebuilt, never stored


def test_bad_ranks_and_options_name_the_valid_choices(calibrated):
    module, stats, _ = calibrated
    with pytest.raises(ZooError, match="input rank 200 .* between 1 and 128"):
        BlockwisePHD(TARGET, rank=200).build(TARGET, module, stats)
    with pytest.raises(ZooError, match="unknown core_init 'svd'; valid choices: lstsq, slice"):
        BlockwisePHD(TARGET, core_init="svd")
    with pytest.raises(ZooError, match="align=True .* residual_frame='pca'"):
        CoupledCore(BOTH, residual_frame="phd", align=True)
    with pytest.raises(ZooError, match="unknown shim_train 'C'; valid choices: both, A, B"):
        CoupledCore(BOTH, shim_train="C")


def test_procrustes_finds_the_best_rotation():
    g = torch.Generator().manual_seed(0)
    source = torch.linalg.qr(torch.randn(20, 5, generator=g, dtype=torch.float64))[0]
    true = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    target = source @ true + 0.01 * torch.randn(20, 5, generator=g, dtype=torch.float64)
    R = procrustes(source, target)
    assert torch.allclose(R.T @ R, torch.eye(5, dtype=torch.float64), atol=1e-10)
    best = (source @ R - target).norm()
    for _ in range(20):
        Q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
        assert best <= (source @ Q - target).norm()
    assert torch.allclose(R, true, atol=0.05)


def built(module_cls, teacher, **kwargs):
    module = repair(module_cls, teacher=teacher, **kwargs)
    module.build_student(batches(), data_fingerprint="test")
    return module


def test_coupled_layers_share_their_residual_rows(tiny_teacher_dir):
    module = built(CoupledCore, tiny_teacher_dir, targets=BOTH, rank=16, rank_out=8, block=16)
    ups = [module.model.get_submodule(f"model.layers.{i}.mlp.down_proj").replacement.up.rows for i in (0, 1)]
    assert torch.equal(ups[0], ups[1])
    assert torch.allclose(ups[0] @ ups[0].T, torch.eye(8), atol=1e-5)


def test_aligned_rows_span_each_layers_own_subspace_in_shared_coordinates(tiny_teacher_dir):
    from zoo.coupled import leading_eigenvectors
    from zoo.phd import output_moment

    plain = built(CoupledCore, tiny_teacher_dir, targets=BOTH, rank=16, rank_out=8, block=16)
    aligned = built(CoupledCore, tiny_teacher_dir, targets=BOTH, rank=16, rank_out=8, block=16, align=True)
    shared = plain.model.get_submodule("model.layers.0.mlp.down_proj").replacement.up.rows.double()
    with teacher_view(plain.model):  # the teacher's statistics, as calibration saw them
        stats = calib.collect(plain.model, batches(), [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)],
                              progress=False)
    for i in (0, 1):
        name = f"model.layers.{i}.mlp.down_proj"
        rows = aligned.model.get_submodule(name).replacement.up.rows.double()
        own = leading_eigenvectors(output_moment(aligned.model.get_submodule(name).original.weight,
                                                 stats[name].second_moment), 8)
        assert torch.allclose(rows.T @ rows, own @ own.T, atol=1e-4)  # the layer's own subspace
        # ... in the coordinates closest to the shared ones
        assert (rows - shared).norm() <= (own.T - shared).norm() + 1e-6


def test_coupled_targets_must_be_a_contiguous_range():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
    spec = CoupledCore("model.layers.{0,2}.mlp.down_proj")
    modules = {n: model.get_submodule(n) for n in spec.resolve(model)}
    with pytest.raises(ZooError, match=r"contiguous layer range; 0..2 lacks layer\(s\) \[1\]"):
        spec.plan(modules, {})


@pytest.mark.parametrize("shim_train", ["both", "A", "B"])
def test_zero_initialized_shims_leave_the_logits_unchanged(tiny_teacher_dir, shim_train):
    ids = batches(1)[0]["input_ids"]
    plain = built(CoupledCore, tiny_teacher_dir, targets=BOTH, rank=16, block=16)
    with torch.no_grad():
        expected = plain(ids)
    shimmed = built(CoupledCore, tiny_teacher_dir, targets=BOTH, rank=16, block=16, shim_rank=4,
                    shim_train=shim_train)
    with torch.no_grad():
        assert torch.equal(shimmed(ids), expected)
    trainable = sorted(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in shimmed.trainable_parameters()
                       if ".shim." in n)
    want = {"both": ["shim.A", "shim.B"], "A": ["shim.A"], "B": ["shim.B"]}[shim_train]
    assert trainable == sorted(want * 2)
    # the shim can move: a gradient reaches its trainable factors
    loss, _ = shimmed.distillation_loss(batches(1)[0])
    loss.backward()
    assert all(p.grad is not None for n, p in shimmed.trainable_parameters().items())


def test_shim_dominance_metric_is_the_norm_ratio():
    torch.manual_seed(0)
    core = torch.nn.Linear(8, 6, bias=False)
    shim = Shim(8, 6, 2)
    with torch.no_grad():
        shim.B.normal_()
    layer = ShimmedLinear(core, shim)
    x = torch.randn(10, 8)
    layer.tracking = True
    layer(x[:4])
    layer(x[4:])
    expected = (x @ shim.A.T @ shim.B.T).norm() / core(x).norm()
    assert torch.allclose(layer.metrics()["shim_dominance"].compute().float(), expected, rtol=1e-5)


def test_repair_state_holds_cores_and_shims_only_and_round_trips(tiny_teacher_dir, tmp_path):
    a = built(CoupledCore, tiny_teacher_dir, targets=BOTH, rank=16, block=16, shim_rank=4)
    with torch.no_grad():
        for p in a.trainable_parameters().values():
            p.add_(0.01)
    path = a.save_repair_state(tmp_path / "state.safetensors")
    with safe_open(str(path), "pt") as f:
        names = sorted(f.keys())
    assert all(n.endswith(("core.core", "shim.A", "shim.B")) for n in names) and len(names) == 6
    b = built(CoupledCore, tiny_teacher_dir, targets=BOTH, rank=16, block=16, shim_rank=4,
              repair_state=str(path))
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


class ForceShims(L.Callback):
    """Test helper: makes every shim dominate its core at the start of training."""

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            for name, p in pl_module.trainable_parameters().items():
                if name.endswith("shim.B"):
                    p.normal_(0, 100.0)


def coupled_config(tmp_path, teacher, action, max_steps=4):
    model = repair_model("zoo.CoupledCore", **{"targets": BOTH, "rank": 16, "block": 16, "shim_rank": 4, "lr": 0.01})
    path = write_config(tmp_path, teacher, model, max_steps=max_steps)
    import yaml

    config = yaml.safe_load(open(path))
    config["trainer"]["val_check_interval"] = 2
    config["trainer"]["callbacks"] = [
        {"class_path": "callbacks.ShimDominanceGate", "init_args": {"max_ratio": 1.0, "action": action}},
        {"class_path": "test_phd_coupled.ForceShims"},
        {"class_path": "callbacks.RepairStateCheckpoint"},
    ]
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def test_gate_fails_a_run_whose_shim_dominates(tmp_path, tiny_teacher_dir, capsys):
    code, _, err = zoo_cli(["fit", "--config", coupled_config(tmp_path, tiny_teacher_dir, "fail")], capsys)
    assert code != 0
    assert "ShimDominanceGate: shim dominance above max_ratio=1.0" in err
    assert "model.layers.0.mlp.down_proj" in err


def test_gate_stop_restores_the_last_passing_state(tmp_path, tiny_teacher_dir, capsys):
    code, _, err = zoo_cli(["fit", "--config", coupled_config(tmp_path, tiny_teacher_dir, "stop")], capsys)
    assert code == 0, err
    run = tmp_path / "run"
    with safe_open(str(run / "repair_state.safetensors"), "pt") as f:
        shims_b = [f.get_tensor(k) for k in f.keys() if k.endswith("shim.B")]
    assert shims_b and all(torch.count_nonzero(b) == 0 for b in shims_b)  # the zero-shim start
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    assert summary["stopped_by"] == "ShimDominanceGate" and summary["restored_step"] == 0
    assert summary["shim_dominance_max"] > 1.0


def test_gate_on_a_student_without_shims_is_an_error(tmp_path, tiny_teacher_dir, capsys):
    model = repair_model("zoo.BlockwisePHD", **{"targets": BOTH, "rank": 16, "block": 16})
    path = write_config(tmp_path, tiny_teacher_dir, model, max_steps=2)
    code, _, err = zoo_cli(["fit", "--config", path, "--trainer.callbacks+=callbacks.ShimDominanceGate"], capsys)
    assert code == 2 and "the student has no shims" in err


def test_phd_repair_fits_and_validates_through_the_cli(tmp_path, tiny_teacher_dir, capsys):
    model = repair_model("zoo.BlockwisePHD", **{"targets": BOTH, "rank": 16, "block": 16, "lr": 0.01})
    path = write_config(tmp_path, tiny_teacher_dir, model)
    code, _, err = zoo_cli(["fit", "--config", path], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["summary"]["trainable_parameters"] == 2 * 16 * 16
    after = metrics["summary"]["heldout_kl_after"]
    code, _, err = zoo_cli(["validate", "--config", path, "--ckpt_path",
                            str(tmp_path / "run" / "repair_state.safetensors")], capsys)
    assert code == 0, err
    validated = json.loads((tmp_path / "run" / "metrics_validate.json").read_text())["final"]["heldout_kl"]
    assert validated == pytest.approx(after, rel=1e-5)
