"""The fast Walsh-Hadamard transform and the PHD frame against dense references."""
import pytest
import torch

from zoo.core.errors import ZooError
from zoo.core.hadamard import PHDFrame, block_hadamard, fit_block, fwht, hadamard_matrix, kernel_unavailable


def dense_hadamard(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / n**0.5


@pytest.mark.parametrize("n", [1, 2, 8, 64, 512])
def test_fwht_matches_the_dense_normalized_hadamard_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)  # batched over leading dims
    assert torch.allclose(fwht(x), x @ dense_hadamard(n), atol=1e-12)
    assert torch.allclose(hadamard_matrix(n, torch.float64), dense_hadamard(n), atol=1e-12)


def test_fwht_in_fp32_and_bf16():
    x = torch.randn(4, 256)
    ref = x.double() @ dense_hadamard(256)
    assert torch.allclose(fwht(x).double(), ref, atol=1e-5)
    y = fwht(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (y.double() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("method", ["matmul", "butterfly"])
def test_block_hadamard_is_blockdiagonal(method):
    x = torch.randn(7, 3 * 16, dtype=torch.float64)
    dense = torch.block_diag(*[dense_hadamard(16)] * 3)
    assert torch.allclose(block_hadamard(x, 16, method), x @ dense, atol=1e-12)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ZooError, match="power-of-two length, got 12"):
        fwht(torch.randn(12))


@pytest.mark.parametrize("n,block,expect", [(576, 512, (64, 576)), (1536, 512, (512, 1536)),
                                            (14336, 512, (512, 14336)), (4096, 512, (512, 4096)), (7, 4, (1, 7))])
def test_divide_fit_picks_the_largest_dividing_power_of_two(n, block, expect):
    assert fit_block(n, block, "divide") == expect


def test_pad_fit_pads_to_a_multiple_of_the_block():
    assert fit_block(576, 512, "pad") == (512, 1024)
    assert fit_block(100, 512, "pad") == (128, 128)
    with pytest.raises(ZooError, match="unknown fit .crop.; valid choices: divide, pad"):
        fit_block(576, 512, "crop")
    with pytest.raises(ZooError, match="power of two"):
        fit_block(576, 500)


@pytest.mark.parametrize("n,block,fit", [(576, 512, "divide"), (64, 16, "divide"), (96, 64, "pad")])
def test_phd_frame_is_orthogonal_and_transpose_inverts_it(n, block, fit):
    frame = PHDFrame(n, block, seed=3, fit=fit)
    T = frame.matrix(torch.float32)
    assert T.shape == (frame.n_pad, n)
    assert torch.allclose(T.T @ T, torch.eye(n), atol=1e-5)  # orthonormal columns
    if frame.n_pad == n:
        assert torch.allclose(T @ T.T, torch.eye(n), atol=1e-5)  # square: orthogonal
    x = torch.randn(2, 5, n, dtype=torch.float64)
    assert torch.allclose(frame(x), x @ frame.matrix().T, atol=1e-10)
    assert torch.allclose(frame.transpose(frame(x)), x, atol=1e-10)


def test_phd_frame_is_fixed_by_its_seed_and_mixes_within_blocks():
    a, b, c = PHDFrame(64, 16, seed=1), PHDFrame(64, 16, seed=1), PHDFrame(64, 16, seed=2)
    assert torch.equal(a.matrix(), b.matrix()) and not torch.equal(a.matrix(), c.matrix())
    T = a.matrix()
    # every row mixes exactly one block of b source coordinates, each with weight 1/sqrt(b)
    assert torch.all((T != 0).sum(1) == 16)
    assert torch.allclose(T[T != 0].abs(), torch.full_like(T[T != 0], 0.25))


def test_kernel_method_refuses_cpu_tensors_and_says_why_it_cannot_run():
    with pytest.raises(ZooError, match="runs on CUDA tensors only; got a tensor on cpu"):
        block_hadamard(torch.randn(2, 8), 4, "kernel")
    if not torch.cuda.is_available():
        assert kernel_unavailable().startswith("no CUDA device")


def test_block_primitives_build_the_frames_the_basis_duel_uses():
    from zoo.core.hadamard import block_hadamard_matrix, frame_draws, largest_block

    assert [largest_block(n) for n in (1536, 576, 128, 7, 1)] == [512, 64, 128, 1, 1]
    H = block_hadamard_matrix(96, 32)
    assert torch.equal(H, block_hadamard(torch.eye(96, dtype=torch.float64), 32, "matmul"))
    assert torch.equal(H[:32, :32], hadamard_matrix(32, torch.float64))
    assert torch.equal(H[32:, :32], torch.zeros(64, 32, dtype=H.dtype))
    with pytest.raises(ZooError, match="multiple"):
        block_hadamard_matrix(96, 64)
    signs, perm = frame_draws(96, torch.Generator().manual_seed(5))
    frame = PHDFrame(96, 32, seed=5)
    assert torch.equal(frame.signs, signs.float()) and torch.equal(frame.perm, perm)
    assert set(signs.tolist()) == {-1.0, 1.0} and signs.dtype == torch.float64
