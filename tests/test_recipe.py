"""One way to build a student: ``recipes.recipe.load_recipe`` turns a recipe into its built student with no
Trainer and no LightningCLI, calibrating through the ``CalibrationSource`` protocol, which anything with
calibration batches and a fingerprint implements."""
from __future__ import annotations

import functools

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from recipes.recipe import load_recipe
from zoo.core.errors import ZooError
from zoo.core.student import CalibrationSource
from zoo_cli import write_config


def test_a_student_is_built_without_a_trainer_or_a_cli(tmp_path, tiny_teacher_dir, monkeypatch):
    for cls in (Trainer, LightningCLI):
        @functools.wraps(cls.__init__)  # the parser still reads the trainer's signature through it
        def refuse(self, *args, **kwargs):
            raise AssertionError(f"{type(self).__name__} constructed to build a student")

        monkeypatch.setattr(cls, "__init__", refuse)
    recipe = load_recipe(write_config(tmp_path, tiny_teacher_dir))
    assert recipe.module.student.built and recipe.module.summary["targets"] == 2
    assert recipe.module._trainer is None and recipe.data.trainer is None
    # the trainer section is parsed all the same: a typo in it is reported, not ignored
    with pytest.raises(Exception, match="max_stepz"):
        load_recipe(write_config(tmp_path, tiny_teacher_dir, max_stepz=3))


def test_a_recipe_given_as_a_dict_builds_the_same_student(tmp_path, tiny_teacher_dir):
    path = write_config(tmp_path, tiny_teacher_dir)
    from_file = load_recipe(path).module
    from_dict = load_recipe(yaml.safe_load(open(path))).module
    assert from_file.header() == from_dict.header()
    for (name, a), b in zip(from_file.trainable_parameters().items(), from_dict.trainable_parameters().values()):
        assert torch.equal(a, b), name


def test_overrides_and_meta_reach_the_model_not_the_data(tmp_path, tiny_teacher_dir):
    recipe = load_recipe(write_config(tmp_path, tiny_teacher_dir), ["--model.init_args.parts.rank", "4"],
                         build=False, meta=True)
    assert recipe.module.parts[0].rank == 4
    assert recipe.module.teacher == "meta:" + tiny_teacher_dir and recipe.data.teacher == tiny_teacher_dir
    assert next(recipe.module.model.parameters()).device.type == "meta"


def test_a_missing_recipe_is_one_line(tmp_path):
    with pytest.raises(ZooError, match="no such file"):
        load_recipe(str(tmp_path / "nope.yaml"))


class Batches:
    """A calibration source that is no data module: a list of batches and a name for them."""

    def __init__(self, batches, name):
        self.batches, self.name = batches, name

    def calibration_dataloader(self):
        return self.batches

    def fingerprint(self, split):
        return f"{self.name}-{split}"


def test_any_calibration_source_builds_the_student_the_data_module_would(tmp_path, tiny_teacher_dir):
    recipe = load_recipe(write_config(tmp_path, tiny_teacher_dir))
    batches = list(recipe.data.calibration_dataloader())
    source = Batches(batches, "same-tokens")
    assert isinstance(source, CalibrationSource) and isinstance(recipe.data, CalibrationSource)
    other = load_recipe(write_config(tmp_path, tiny_teacher_dir), build=False).module
    other.build_student_from(source)
    for (name, a), b in zip(recipe.module.trainable_parameters().items(), other.trainable_parameters().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # other tokens, another student (the fingerprint keys the cached statistics apart)
    fewer = load_recipe(write_config(tmp_path, tiny_teacher_dir), build=False).module
    fewer.build_student_from(Batches(batches[:1], "fewer-tokens"))
    a, b = (next(iter(m.trainable_parameters().values())) for m in (recipe.module, fewer))
    assert not torch.allclose(a, b)


def test_short_class_names_resolve_as_in_zoo_fit(tiny_teacher_dir):
    recipe = {"model": {"class_path": "DistillationModule", "init_args": {"teacher": tiny_teacher_dir, "parts": [
        {"class_path": "FisherSVD", "init_args": {"targets": "model.layers.0.mlp.down_proj", "rank": 4}}]}},
        "data": {"class_path": "CodeDataModule"}}
    loaded = load_recipe(recipe, build=False, meta=True)
    assert type(loaded.module.parts[0]).__name__ == "FisherSVD" and type(loaded.data).__name__ == "CodeDataModule"
