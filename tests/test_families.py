"""Every technique on every model family the zoo is used on (tests/families.py: tiny random-init teachers).

A technique's setting is its first row in the contract matrix (tests/techniques.py), aimed at the family's
attention or MLP input maps (Phi-3's fused ``qkv_proj`` and ``gate_up_proj``) or its attention blocks, so a
new technique needs no line here. Each cell builds the student from the family's checkpoint directory, as ``zoo fit`` would, and checks that
the replaced modules are the targets, ``zoo plan``'s trainable count (from the meta model) is the built
student's, and the student's forward is finite and differs from its teacher's. EigenAttention is refused by
name on the attention families it does not support. ``EXPORTS`` writes and reloads students of the other
families, beside the Llama export column of test_contract.py.
"""
from __future__ import annotations

import pytest
import torch

import zoo
from families import EIGEN_FAMILIES, FAMILIES, save_basis, save_family_teacher, save_perturbed, targets
from techniques import FROZEN, TECHNIQUES, batches, lm_logits, logits, reloads_with_the_same_logits
from zoo import DistillationModule, FisherSVD
from zoo.core.errors import ZooError
from zoo.core.models import META_PREFIX, load_causal_lm
from zoo.core.plan import plan_student
from zoo.core.surgery import replaced_modules

#: one setting per technique: the first row of each spec in the contract matrix
FIRST: dict[type, str] = {}
for _name, _row in TECHNIQUES.items():
    FIRST.setdefault(_row[0], _name)
ROWS = {name: TECHNIQUES[name][:2] for name in FIRST.values()}
#: rows whose freshly built student is its teacher (a zero LoRA update)
STARTS_AT_TEACHER = {"lora"}


@pytest.fixture(scope="module")
def family_sources(tmp_path_factory, tiny_teacher_dir):
    """family -> its teacher directory, a perturbed copy and a basis, made on first use."""
    made: dict[str, dict[str, str]] = {}

    def get(family: str) -> dict[str, str]:
        if family not in made:
            tmp = tmp_path_factory.mktemp(family)
            teacher = tiny_teacher_dir if family == "llama" else save_family_teacher(family, tmp / "teacher")
            roles = {f"{{{role}}}": pattern for role, pattern in targets(family).items()}
            made[family] = {"teacher": teacher, "{perturbed}": save_perturbed(teacher, tmp / "perturbed"),
                            "{basis}": save_basis(teacher, roles["{attn_in}"], tmp / "basis"), **roles}
        return made[family]

    return get


def spec(row: str, sources: dict[str, str]):
    """The row's spec on the family: its targets the family's attention blocks, its attention input maps (a
    row on attention projections) or its MLP input maps (any other row), one role so coupled cores share
    one width."""
    cls, options = ROWS[row]
    options = {k: sources.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    if "targets" in options:
        role = "attention" if cls.target_kind == "attention" else \
            "attn_in" if "self_attn" in str(options["targets"]) else "mlp_in"
        options["targets"] = sources[f"{{{role}}}"]
    return cls(**options)


def build(row: str, sources: dict[str, str]) -> DistillationModule:
    module = DistillationModule(parts=[spec(row, sources)], teacher=sources["teacher"])
    module.build_student(batches(), data_fingerprint="families")
    return module


CELLS = [(f, r) for f in FAMILIES for r in ROWS if r != "eigen_attention" or f in EIGEN_FAMILIES]


@pytest.mark.parametrize("family, row", CELLS)
def test_every_technique_builds_and_runs_on_every_family(family, row, family_sources):
    sources = family_sources(family)
    module = build(row, sources)
    part = module.parts[0]
    assert sorted(replaced_modules(module.model)) == sorted(part.resolve(module.model))
    meta = load_causal_lm(META_PREFIX + sources["teacher"])[0]
    plan = plan_student(meta, [part], [part.resolve(meta)], torch.float32)
    trainable = module.trainable_parameters()
    assert plan.trainable == sum(p.numel() for p in trainable.values())
    assert (plan.trainable > 0) == (row not in FROZEN)
    ids = batches(1, seed=3)[0]["input_ids"]
    student = logits(module, ids)
    assert student.shape == (*ids.shape, module.model.config.vocab_size) and torch.isfinite(student).all()
    with zoo.teacher_view(module.model):
        teacher = logits(module, ids)
    assert torch.allclose(student, teacher, atol=1e-5) == (row in STARTS_AT_TEACHER)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - EIGEN_FAMILIES))
def test_eigen_attention_refuses_other_attention_families_by_name(family, family_sources):
    attention = load_causal_lm(family_sources(family)["teacher"])[0].model.layers[0].self_attn
    with pytest.raises(ZooError, match=rf"EigenAttention does not support .*\({type(attention).__name__}\)"):
        build("eigen_attention", family_sources(family))


#: exported and reloaded: every technique on the fused-projection family, EigenAttention on its other families
#: (Qwen2's q/k/v carry biases), and one technique on each other family (its own model class in the export)
EXPORTS = ([("phi3", r) for r in ROWS if r != "eigen_attention"] + [(f, "eigen_attention") for f in ("qwen2", "mistral")]
           + [(f, "fisher_svd") for f in FAMILIES if f not in ("llama", "phi3")])


@pytest.mark.parametrize("family, row", EXPORTS)
def test_students_of_other_families_export_and_reload(family, row, family_sources, tmp_path):
    module = build(row, family_sources(family))
    if family == "phi3":  # the fused maps themselves are replaced
        assert any(n.endswith(("qkv_proj", "gate_up_proj")) for n in replaced_modules(module.model))
    reloads_with_the_same_logits(module, tmp_path / "export")


def test_a_fused_projection_export_loads_in_transformers_alone(family_sources, tmp_path):
    """Both fused maps of every layer factorized, exported, and run by transformers' remote code alone."""
    from test_export import run_standalone

    sources = family_sources("phi3")
    module = DistillationModule(parts=[FisherSVD([sources["{attn_in}"], sources["{mlp_in}"]], rank=8)],
                                teacher=sources["teacher"])
    module.build_student(batches(), data_fingerprint="families")
    assert sorted(replaced_modules(module.model)) == [f"model.layers.{i}.{m}" for i in range(2)
                                                      for m in ("mlp.gate_up_proj", "self_attn.qkv_proj")]
    out = reloads_with_the_same_logits(module, tmp_path / "export")
    ids = batches(1, seed=4)[0]["input_ids"]
    expected = lm_logits(module.model, ids)
    torch.testing.assert_close(run_standalone(out, ids, tmp_path), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())
