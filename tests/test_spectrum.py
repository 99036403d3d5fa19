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
