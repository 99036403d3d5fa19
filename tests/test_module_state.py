import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from zoo import Composite, DistillationModule, FisherSVD
from zoo_cli import repair
from zoo.core.errors import ZooError
from zoo.core.models import load_causal_lm


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 380, (2, 32), generator=g), "attention_mask": torch.ones(2, 32, dtype=torch.long),
             "loss_mask": torch.ones(2, 32, dtype=torch.long)} for _ in range(n)]


def built(tiny_teacher_dir, **kwargs):
    args = dict(targets="model.layers.{0..1}.mlp.down_proj", rank=8, teacher=tiny_teacher_dir)
    args.update(kwargs)
    module = repair(FisherSVD, **args)
    module.build_student(batches(), data_fingerprint="test")
    return module


def test_repair_state_round_trips_bit_exactly(tiny_teacher_dir, tmp_path):
    a = built(tiny_teacher_dir)
    with torch.no_grad():
        for p in a.trainable_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    path = a.save_repair_state(tmp_path / "state.safetensors")
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(a.trainable_parameters())  # trainable tensors only
        header = f.metadata()
        # keyed on the parts (registered spec name, version and options) and the teacher, not on a LightningModule
        assert "technique" not in header
        assert [(p["technique"], p["version"]) for p in json.loads(header["parts"])] == [("fisher_svd", 1)]
    b = built(tiny_teacher_dir)
    b.load_repair_state(path)
    for name, p in a.trainable_parameters().items():
        q = b.trainable_parameters()[name]
        assert p.dtype == q.dtype and torch.equal(p, q), name
    batch = batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(a(batch["input_ids"]), b(batch["input_ids"]))


def test_student_is_rebuilt_deterministically_from_cached_calibration(tiny_teacher_dir):
    a, b = built(tiny_teacher_dir), built(tiny_teacher_dir)
    for (n, p), (m, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert n == m and torch.equal(p, q), n


def test_only_sigma_is_trainable_by_default(tiny_teacher_dir):
    module = built(tiny_teacher_dir)
    names = set(module.trainable_parameters())
    assert names == {f"model.layers.{i}.mlp.down_proj.replacement.sigma" for i in range(2)}
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters().values())


def test_state_from_another_rank_or_technique_is_refused(tiny_teacher_dir, tmp_path):
    path = built(tiny_teacher_dir).save_repair_state(tmp_path / "s.safetensors")
    with pytest.raises(ZooError, match="does not match this run: its parts"):
        built(tiny_teacher_dir, rank=4).load_repair_state(path)
    with pytest.raises(ZooError, match="does not match this run: its parts"):
        built(tiny_teacher_dir, weighting="diagonal").load_repair_state(path)
    # the same parts under another LightningModule name are the same student: the state loads
    same = Composite(parts=[FisherSVD("model.layers.{0..1}.mlp.down_proj", rank=8)], teacher=tiny_teacher_dir)
    same.build_student(batches(), data_fingerprint="test")
    same.load_repair_state(path)
    with pytest.raises(ZooError, match="does not exist"):
        same.load_repair_state(tmp_path / "missing.safetensors")


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("fixture, parts", [
    ("state-fisher-svd-v1.safetensors", [FisherSVD("model.layers.1.mlp.down_proj", rank=4, weighting="none")]),
    ("state-composite-v1.safetensors", [FisherSVD("model.layers.0.mlp.down_proj", 3, weighting="none"),
                                        FisherSVD("model.layers.1.self_attn.o_proj", 5, weighting="none",
                                                  train_factors=True)]),
])
def test_states_written_before_specs_keyed_the_header_still_load(fixture, parts, monkeypatch):
    """Committed states of the old layout (header ``technique: FisherSVDRepair`` / ``Composite``, written by the
    wrapper classes) load into today's ``DistillationModule(parts=[...])``, every tensor as stored."""
    from safetensors.torch import load_file

    monkeypatch.chdir(FIXTURES.parent.parent)  # the fixtures name their teacher by a path relative to the repo
    path = FIXTURES / fixture
    with safe_open(str(path), "pt") as f:
        assert "technique" in f.metadata()  # really the old layout
    module = DistillationModule(parts=parts, teacher="random:tests/fixtures/tiny-llama")
    module.build_student()
    module.load_repair_state(path)
    stored = load_file(str(path))
    params = module.trainable_parameters()
    assert set(stored) == set(params) and len(stored) >= 1
    for name, tensor in stored.items():
        assert torch.equal(params[name].detach(), tensor), name


def test_composite_parts_must_not_overlap(tiny_teacher_dir):
    # found on the architecture alone, before the weights load
    with pytest.raises(ZooError, match="both target 'model.layers.1.mlp.down_proj'"):
        Composite(parts=[FisherSVD("model.layers.*.mlp.down_proj", rank=8),
                         FisherSVD("model.layers.1.mlp.*", rank=4, weighting="diagonal")], teacher=tiny_teacher_dir)


def test_composite_mixes_two_parts_and_trains_only_their_tensors(tiny_teacher_dir):
    module = Composite(parts=[FisherSVD("model.layers.*.mlp.down_proj", rank=8),
                              FisherSVD("model.layers.*.self_attn.o_proj", rank=4, weighting="diagonal")],
                       teacher=tiny_teacher_dir)
    module.build_student(batches(), data_fingerprint="test")
    assert len(module.trainable_parameters()) == 4
    batch = batches(1)[0]
    loss, count = module.distillation_loss(batch)
    loss.backward()
    assert int(count) == 2 * 31
    assert all(p.grad is not None for p in module.trainable_parameters().values())
    assert all(p.grad is None for n, p in module.model.named_parameters() if not p.requires_grad)


def test_memoized_teacher_is_released_after_surgery(tiny_teacher_dir):
    module = built(tiny_teacher_dir)
    fresh, _ = load_causal_lm(tiny_teacher_dir)
    assert fresh is not module.model
    assert not any("replacement" in n for n, _ in fresh.named_modules())
