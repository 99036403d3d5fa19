"""Spectrum math (zoo.core.spectrum) against closed forms."""
from __future__ import annotations

import pytest
import torch

from zoo.core.errors import ZooError
from zoo.core.spectrum import (block_diagonal, cumulative_variance, drop_dims, eigenvalues, outlier_dims,
                               participation_ratio, rank_for_variance)


@pytest.mark.parametrize("d", [1, 7, 64])
def test_participation_ratio_of_isotropic_spectrum_is_its_dimension(d):
    assert participation_ratio(torch.full((d,), 3.5)) == pytest.approx(d)
    assert participation_ratio(eigenvalues(2.0 * torch.eye(d))) == pytest.approx(d)


def test_participation_ratio_of_rank_one_spectrum_is_one():
    v = torch.randn(32, dtype=torch.float64)
    assert participation_ratio(eigenvalues(torch.outer(v, v))) == pytest.approx(1.0, abs=1e-9)
    assert participation_ratio(torch.tensor([5.0, 0, 0, 0])) == 1.0
    assert participation_ratio(torch.zeros(4)) == 0.0
    # two equal directions out of many: 2
    assert participation_ratio(torch.tensor([1.0, 1.0, 0, 0, 0])) == pytest.approx(2.0)


def test_rank_for_variance():
    eigs = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative 0.4, 0.7, 0.9, 1.0
    assert torch.allclose(cumulative_variance(eigs), torch.tensor([0.4, 0.7, 0.9, 1.0], dtype=torch.float64))
    assert [rank_for_variance(eigs, t) for t in (0.3, 0.4, 0.41, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 4, 4]
    assert rank_for_variance(torch.full((10,), 1.0), 0.95) == 10
    with pytest.raises(ZooError, match="must be in"):
        rank_for_variance(eigs, 0.0)


def test_outlier_dims_are_set_apart():
    torch.manual_seed(0)
    x = torch.randn(2000, 16, dtype=torch.float64)
    x[:, 5] *= 300.0  # a massive-activation dimension
    C = x.T @ x / len(x)
    raw = participation_ratio(eigenvalues(C))
    dims = outlier_dims(C.diagonal())
    assert dims.tolist() == [5]
    rest = participation_ratio(eigenvalues(drop_dims(C, dims)))
    assert raw < 1.01 and rest > 13  # the outlier makes it look 1-dimensional; without it ~ isotropic 15
    assert drop_dims(C, dims).shape == (15, 15)
    with pytest.raises(ZooError):
        outlier_dims(C.diagonal(), ratio=0.5)


def test_block_diagonal():
    m = torch.arange(36.0).reshape(6, 6)
    blocks = block_diagonal(m, 3)
    assert [b.shape for b in blocks] == [(2, 2)] * 3 and torch.equal(blocks[1], m[2:4, 2:4])
    with pytest.raises(ZooError):
        block_diagonal(m, 4)


def test_zoo_spectrum_end_to_end(tmp_path, tiny_teacher_dir, capsys):
    import json

    import yaml

    from zoo_cli import zoo_cli

    config = {"teacher": tiny_teacher_dir, "output_dir": str(tmp_path / "out"), "logger": False,
              "data": {"class_path": "recipes.DistillationDataModule",
                       "init_args": {"seq_len": 32, "batch_size": 2, "n_calibration": 4, "n_train": 1, "n_heldout": 1,
                                     "max_repeat": 4.0, "code": {"max_files": 40},
                                     "hologram": {"n_samples": 4, "max_new_tokens": 16, "gen_batch_size": 4}}}}
    path = tmp_path / "spectrum.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = zoo_cli(["spectrum", "--config", str(path)], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    layers = result["layers"]
    assert list(layers) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for entry in layers.values():
        streams = entry["streams"]
        assert streams["hidden"]["dim"] == 64 and streams["K"]["dim"] == 16 and len(streams["K"]["groups"]) == 2
        assert streams["W_q"]["dim"] == 32  # 2 query heads x head_dim rows per group
        for s in streams.values():
            assert 1 <= s["df"] <= s["dim"] + 1e-9 and 1 <= s["k"] <= s["dim"]
    assert "| layer | hidden Df | hidden k95 |" in out
    assert (tmp_path / "out" / "spectrum.png").stat().st_size > 10_000
    # a layer index out of range is a one-line error
    code, _, err = zoo_cli(["spectrum", "--config", str(path), "--layers", "[0, 5]"], capsys)
    assert code == 2 and "out of range" in err and "Traceback" not in err
