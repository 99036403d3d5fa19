"""Specs are configuration only (``plan`` returns a ``Plan`` the Student holds) and techniques are registered by
a stable name and version that repair-state headers store (``zoo.core.registry``)."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open

import zoo
from zoo import CoupledCore, EigenAttention, FisherSVD, Student
from zoo.core.errors import ZooError
from zoo.core.registry import LEGACY_CLASS_PATHS, REGISTRY, canonical_parts, register, registered, technique_class
from zoo.core.state import check_header, save_state
from zoo.core.technique import NO_PLAN, Plan

TARGETS = "model.layers.{0..1}.{mlp.down_proj,self_attn.o_proj}"


def calibration(kind: str, n=2):
    """Random tokens, or one repeated token (a covariance of rank one per position: another spectrum)."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 380, (2, 32), generator=g) if kind == "random" else torch.full((2, 32), 7)
           for _ in range(n)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "loss_mask": torch.ones_like(x)} for x in ids]


def test_one_spec_builds_students_on_different_data_and_stays_as_given(tiny_teacher_dir):
    spec = FisherSVD(TARGETS, rank=0.3, allocation="global")
    before, fields = spec.describe(), copy.deepcopy(vars(spec))
    students = {}
    for kind in ("random", "repeated"):
        students[kind] = Student([spec], tiny_teacher_dir)
        students[kind].build(calibration(kind), data_fingerprint=f"registry-{kind}")
        assert spec.describe() == before and vars(spec) == fields  # nothing planned is left on the spec
    plans = {kind: dict(s.plans[0]) for kind, s in students.items()}
    assert plans["random"] != plans["repeated"]  # each student's allocation is its own data's
    for kind, s in students.items():
        built = {n: s.model.get_submodule(n).replacement.rank for n in plans[kind]}
        assert built == plans[kind] and len(built) == 4


@pytest.mark.parametrize("spec", [
    CoupledCore("model.layers.{0..1}.mlp.down_proj", rank=8, block=16),
    EigenAttention(targets="model.layers.*.self_attn", variance=0.9),
], ids=["coupled_core", "eigen_attention"])
def test_specs_that_plan_keep_nothing_planned(spec, tiny_teacher_dir):
    fields = copy.deepcopy(vars(spec))
    student = Student([spec], tiny_teacher_dir)
    student.build(calibration("random"), data_fingerprint="registry-plans")
    assert vars(spec) == fields
    assert set(student.plans[0]) == set(spec.resolve(student.model)) and len(student.plans[0]) == 2


def test_a_plan_is_read_only_and_build_outside_a_student_says_what_is_missing(tiny_model):
    plan = Plan({"a": 3})
    with pytest.raises(TypeError):
        plan["a"] = 4
    with pytest.raises(AttributeError):
        plan.extra = 1
    assert dict(plan) == {"a": 3} and len(NO_PLAN) == 0
    spec = FisherSVD("model.layers.0.mlp.down_proj", rank=0.5, allocation="global", weighting="none")
    with pytest.raises(ZooError, match="no planned decision for model.layers.0.mlp.down_proj"):
        spec.build("model.layers.0.mlp.down_proj", tiny_model.get_submodule("model.layers.0.mlp.down_proj"), None)


def test_every_shipped_technique_is_registered_and_described_by_name():
    shipped = {getattr(zoo, n) for n in zoo.__all__ if isinstance(getattr(zoo, n), type)
               and issubclass(getattr(zoo, n), zoo.Technique) and getattr(zoo, n) is not zoo.Technique}
    assert shipped == set(REGISTRY.values())
    for name, cls in REGISTRY.items():
        assert registered(cls).name == name and technique_class(name) is cls
    assert zoo.TASECoupledCore is not zoo.CoupledCore and registered(zoo.TASECoupledCore).name == "tase_coupled_core"
    part = FisherSVD("model.layers.0.mlp.down_proj", rank=4).describe()
    assert (part["technique"], part["version"]) == ("fisher_svd", 1)


def test_every_legacy_class_path_resolves_through_the_registry():
    assert set(LEGACY_CLASS_PATHS.values()) <= set(REGISTRY)
    for path, name in LEGACY_CLASS_PATHS.items():
        assert technique_class(path) is REGISTRY[name]
    # every registered spec's own class path is one an older state may hold: all of them are in the table
    assert {f"{c.__module__}.{c.__qualname__}" for c in REGISTRY.values()} <= set(LEGACY_CLASS_PATHS)


def test_every_registered_technique_has_a_row_in_the_contract_matrix():
    from techniques import TECHNIQUES

    assert set(REGISTRY.values()) <= {row[0] for row in TECHNIQUES.values()}


def header_of(parts, teacher="t"):
    return {"parts": parts, "teacher": teacher}


def test_a_state_naming_a_moved_class_path_matches_the_registered_spec(tmp_path):
    spec = FisherSVD("model.layers.0.mlp.down_proj", rank=4, weighting="none")
    old = {"technique": "zoo.fisher_svd.FisherSVD", "init_args": {"targets": spec.targets, "rank": 4,
                                                                   "weighting": "none"}}
    path = save_state(tmp_path / "old.safetensors", {"x": torch.zeros(1)}, header_of([old]))
    assert check_header(path, header_of([spec.describe()]))["parts"] == [old]
    # the version is part of the match: a state of another version of the spec is refused
    newer = {**spec.describe(), "version": 2}
    path = save_state(tmp_path / "v2.safetensors", {"x": torch.zeros(1)}, header_of([newer]))
    with pytest.raises(ZooError, match="does not match this run: its parts"):
        check_header(path, header_of([spec.describe()]))


def test_an_unknown_technique_name_is_a_clear_error_listing_the_registered(tmp_path):
    path = save_state(tmp_path / "s.safetensors", {"x": torch.zeros(1)},
                      header_of([{"technique": "fisher_svdd", "version": 1, "init_args": {}}]))
    with pytest.raises(ZooError, match=r"no technique is registered as 'fisher_svdd'; registered: blockwise_phd, "
                                       r"coupled_core, .*fisher_svd"):
        check_header(path, header_of([FisherSVD("x", rank=4).describe()]))
    with pytest.raises(ZooError, match="no technique is registered as 'zoo.gone.Spec'"):
        canonical_parts([{"technique": "zoo.gone.Spec", "init_args": {}}])


def test_register_refuses_a_taken_name_and_a_bad_one_and_a_subclass_is_not_its_parent():
    with pytest.raises(ValueError, match="'fisher_svd' is taken by zoo.fisher_svd.FisherSVD"):
        register("fisher_svd")(type("Other", (zoo.Technique,), {}))
    with pytest.raises(ValueError, match="lower_snake_case"):
        register("Fisher-SVD")
    with pytest.raises(ValueError, match="version must be an int >= 1"):
        register("x", version=0)

    @dataclass(eq=False, repr=False)
    class Variant(FisherSVD):
        pass

    # an unregistered subclass is described by its class path, not taken for the registered parent
    assert registered(Variant) is None
    assert Variant("x", rank=4).describe()["technique"].endswith("<locals>.Variant")
    assert "fisher_svd" in REGISTRY and REGISTRY["fisher_svd"] is FisherSVD


def test_a_written_state_names_its_parts_by_registered_name(tiny_teacher_dir, tmp_path):
    from zoo_cli import repair

    module = repair(FisherSVD, targets="model.layers.0.mlp.down_proj", rank=4, weighting="none",
                    teacher=tiny_teacher_dir)
    module.build_student()
    path = module.save_repair_state(tmp_path / "state.safetensors")
    with safe_open(str(path), "pt") as f:
        parts = json.loads(f.metadata()["parts"])
    assert [(p["technique"], p["version"]) for p in parts] == [("fisher_svd", 1)]


def test_a_name_resolves_before_any_technique_is_imported():
    """``zoo`` imports its techniques on first use; a repair state's header names one before that."""
    import subprocess
    import sys

    code = ("import sys; from zoo.core.registry import REGISTRY, technique_class; empty = not REGISTRY; "
            "cls = technique_class('fisher_svd'); print(empty, cls.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "FisherSVD"]
