"""The contract every technique keeps, run over all of them (a matrix like PEFT's TEST_CASES).

For each technique setting (tests/techniques.py): the built replacements hold exactly the tensors ``footprint``
names (shape, role, dtype kind) and ``zoo plan``'s counts equal the built student's; a full-rank / identity
setting reproduces the teacher's logits; a repair state round-trips bit-exactly; the spec works as one part of
a mix; and the trained student exports and reloads with its logits. test_families.py runs every technique on
the other model families.

A new technique adds one row to ``tests/techniques.TECHNIQUES`` (see docs/guides/new-technique.md).
"""
from __future__ import annotations

import pytest
import torch

import zoo
from families import save_basis
from techniques import FROZEN, TECHNIQUES, batches, logits, reloads_with_the_same_logits
from zoo import DistillationModule, FisherSVD
from zoo.core.models import META_PREFIX, load_causal_lm
from zoo.core.plan import plan_student
from zoo.core.surgery import export_student, replaced_modules

#: a second part on targets no row uses, for the mixing check
OTHER = FisherSVD("model.layers.0.mlp.gate_proj", rank=4, weighting="none")


@pytest.fixture(scope="module")
def sources(basis_file, perturbed_teacher_dir, tiny_teacher_dir):
    """What a row's "{placeholder}" options stand for."""
    return {"{basis}": basis_file, "{perturbed}": perturbed_teacher_dir, "{teacher}": tiny_teacher_dir}


@pytest.fixture(scope="module")
def basis_file(tmp_path_factory, tiny_teacher_dir):
    return save_basis(tiny_teacher_dir, "model.layers.*.self_attn.{q,v}_proj", tmp_path_factory.mktemp("contract_basis"))


def spec(name, sources, full=False):
    cls, options, full_options, _ = TECHNIQUES[name]
    chosen = dict(full_options if full and full_options is not None else options)
    return cls(**{k: sources.get(v, v) if isinstance(v, str) else v for k, v in chosen.items()})


def built(parts, teacher, dtype="float32"):
    module = DistillationModule(parts=parts, teacher=teacher, dtype=dtype)
    module.build_student(batches(), data_fingerprint="contract")
    return module


def kind(t: torch.Tensor, model_dtype: torch.dtype) -> str:
    return {model_dtype: "model", torch.float32: "float32", torch.int64: "int64", torch.uint8: "uint8"}[t.dtype]


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_build_matches_footprint_and_plan(name, sources, tiny_teacher_dir):
    """bf16 weights, so tensors following the model's dtype and those kept in fp32 differ."""
    part = spec(name, sources)
    module = built([part], tiny_teacher_dir, dtype="bfloat16")
    merged = 0  # tensors folded into others on export (a factor's LoRA correction)
    for target, wrapper in replaced_modules(module.model).items():
        real = {n: (tuple(p.shape), "trainable" if p.requires_grad else "frozen", kind(p, torch.bfloat16))
                for n, p in wrapper.replacement.named_parameters()}
        real |= {n: (tuple(b.shape), "buffer", kind(b, torch.bfloat16)) for n, b in wrapper.replacement.named_buffers()}
        footprint = part.footprint(target, wrapper.original)
        sized = {n: (s.shape, s.role, s.kind) for n, s in footprint.items()}
        assert sized == real, target
        merged += sum(s.numel for s in footprint.values() if not s.exported)
        exportable = getattr(wrapper.replacement, "export_tensors", None)
        if merged and exportable:  # what is merged is not in what the export writes
            written = sum(t.numel() for t in wrapper.replacement.export_tensors().values())
            assert written == sum(s.numel for s in footprint.values() if s.exported and s.role != "buffer")
    meta = load_causal_lm(META_PREFIX + tiny_teacher_dir, "bfloat16")[0]
    plan = plan_student(meta, [part], [part.resolve(meta)], torch.bfloat16)
    trainable = module.trainable_parameters()
    assert plan.trainable == sum(p.numel() for p in trainable.values())
    assert (plan.trainable > 0) == (name not in FROZEN)
    assert plan.repair_state_bytes == sum(p.numel() * p.element_size() for p in trainable.values())
    assert plan.student_parameters == sum(p.numel() for p in export_student(module.model).parameters()) - merged


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_full_rank_or_identity_setting_reproduces_the_teacher(name, sources, tiny_teacher_dir):
    module = built([spec(name, sources, full=True)], tiny_teacher_dir)
    hook = TECHNIQUES[name][3]
    if hook is not None:
        hook(module)
    ids = batches(1, seed=3)[0]["input_ids"]
    student = logits(module, ids)
    with zoo.teacher_view(module.model):
        teacher = logits(module, ids)
    if TECHNIQUES[name][2] is None and hook is None and name != "lora":  # a compressed setting only
        assert not torch.allclose(student, teacher, atol=1e-3), "a compressed student should differ"
        return
    torch.testing.assert_close(student, teacher, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_repair_state_round_trips(name, sources, tiny_teacher_dir, tmp_path):
    a = built([spec(name, sources)], tiny_teacher_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    path = a.save_repair_state(tmp_path / "state.safetensors")
    b = built([spec(name, sources)], tiny_teacher_dir)
    b.load_repair_state(path)
    for n, p in a.trainable_parameters().items():
        assert torch.equal(p, b.trainable_parameters()[n]), n
    ids = batches(1, seed=4)[0]["input_ids"]
    assert torch.equal(logits(a, ids), logits(b, ids))


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_works_as_one_part_of_a_mix(name, sources, tiny_teacher_dir):
    part = spec(name, sources)
    other = OTHER
    alone = built([spec(name, sources)], tiny_teacher_dir)
    mixed = built([part, other], tiny_teacher_dir)
    own = set(alone.trainable_parameters())
    assert own < set(mixed.trainable_parameters())
    assert set(mixed.trainable_parameters()) - own == set(built([other], tiny_teacher_dir).trainable_parameters())
    assert sorted(replaced_modules(mixed.model)) == sorted([*part.resolve(mixed.model), *other.resolve(mixed.model)])
    ids = batches(1, seed=5)[0]["input_ids"]
    assert torch.isfinite(logits(mixed, ids)).all()


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_trained_student_exports_and_reloads_with_its_logits(name, sources, tiny_teacher_dir, tmp_path):
    reloads_with_the_same_logits(built([spec(name, sources)], tiny_teacher_dir), tmp_path / "export")


def test_every_exported_technique_is_in_the_matrix():
    """A technique spec exported by ``zoo`` without a row here would skip the contract."""
    specs = {getattr(zoo, n) for n in zoo.__all__
             if isinstance(getattr(zoo, n), type) and issubclass(getattr(zoo, n), zoo.Technique)
             and getattr(zoo, n) is not zoo.Technique}
    assert specs == {row[0] for row in TECHNIQUES.values()}
