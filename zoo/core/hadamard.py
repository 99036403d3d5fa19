"""Fast Walsh-Hadamard transform and the block PHD frame (ZOMBORG, source 000, section 2.3: the
structured PHD family).

``fwht(x)`` is the normalized Walsh-Hadamard transform over the last dimension (a power of two), an
O(n log n) butterfly batched over any leading shape. ``block_hadamard(x, b)`` applies
``blockdiag(H_b, ..., H_b)``; on tensor-core hardware a batched matmul with the b x b matrix beats the
butterfly for b <= 1024 by a wide margin (measured on an H100 at Llama-3.1-8B's down_proj input,
16k x 14336 in bf16, b = 512: 0.42 ms vs 13.1 ms), so ``method="auto"`` takes the matmul there and
the butterfly above.
``method="kernel"`` runs the CUDA kernel of the optional ``fast-hadamard-transform`` package on CUDA
tensors; ``auto`` never picks it, since no GPU measurement here has shown it winning yet
(``benchmarks/phd_forward.py`` times it per shape where it is installed).

``PHDFrame(n, block, seed)`` is the orthogonal frame ``T = blockdiag_b(H) · P · D`` (D random signs,
P a random permutation, H the normalized b x b Hadamard matrix), all fixed by the seed. The
permutation sits *before* the Hadamard blocks, not after them as the name PHD reads
(``P · blockdiag(H) · D``): the PHD layers pick their coordinates (rows of T) by data, and a
permutation applied after H only relabels rows, which such a choice undoes, whereas a permutation
before H decides which input coordinates share a Hadamard block, so it changes what the frame can do.

Widths that are not a multiple of the block: with ``fit="divide"`` (default) the block is the largest
power of two <= b that divides the width (the embedded teacher's 576 = 9 x 64 gets blocks of 64,
its 1536 = 3 x 512 blocks of 512); with ``fit="pad"`` the width is zero-padded to a multiple of b and
T is n_pad x n with orthonormal columns (T^T T = I; T T^T is then a projection, not I).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .errors import ZooError, check_choice
from .seeds import generator

FITS = ("divide", "pad")
METHODS = ("auto", "matmul", "butterfly", "kernel")
#: largest block the ``auto`` method applies as a dense matmul
MATMUL_MAX_BLOCK = 1024


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform of the last dimension (length a power of two), O(n log n).

    Computed in ``x``'s dtype; bf16 inputs are transformed in fp32 and cast back, since log2(n)
    rounding steps in bf16 would add up.
    """
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ZooError(f"fwht needs a power-of-two length, got {n}")
    dtype = x.dtype
    y = x.float() if dtype in (torch.bfloat16, torch.float16) else x
    lead = y.shape[:-1]
    h = 1
    while h < n:
        # pairs (a, b) at distance h -> (a + b, a - b)
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).to(dtype)


@functools.lru_cache(maxsize=64)
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return fwht(torch.eye(n, dtype=torch.float64)).to(device=device, dtype=dtype)


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The normalized n x n Sylvester-Hadamard matrix (symmetric and orthogonal); cached per
    (n, dtype, device) so a forward pass does not rebuild or copy it."""
    if not is_power_of_two(n):
        raise ZooError(f"a Hadamard matrix needs a power-of-two size, got {n}")
    return _hadamard(n, dtype, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=1)  # asked on every kernel transform; the answer holds for the process
def kernel_unavailable() -> str | None:
    """Why ``method="kernel"`` cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device (the fast-hadamard-transform kernel is CUDA-only)"
    try:
        import fast_hadamard_transform  # noqa: F401
    except ImportError as exc:  # an extension built for another torch/CUDA fails here too
        return f"fast_hadamard_transform is not importable: {exc}"
    return None


def _kernel_transform(blocks: torch.Tensor) -> torch.Tensor:
    if not blocks.is_cuda:
        raise ZooError(f"Hadamard method 'kernel' runs on CUDA tensors only; got a tensor on {blocks.device}")
    reason = kernel_unavailable()
    if reason:
        raise ZooError(f"Hadamard method 'kernel' is unavailable: {reason}")
    from fast_hadamard_transform import hadamard_transform

    # the kernel computes x @ H unnormalized in the same (Sylvester) order as fwht
    return hadamard_transform(blocks.contiguous(), 1 / math.sqrt(blocks.shape[-1]))


def block_hadamard(x: torch.Tensor, block: int, method: str = "auto") -> torch.Tensor:
    """``x @ blockdiag(H_b, ...)`` over the last dimension (a multiple of ``block``).

    H_b is symmetric, so this is also its own transpose and its own inverse.
    """
    check_choice("method", method, METHODS)
    n = x.shape[-1]
    if n % block:
        raise ZooError(f"width {n} is not a multiple of the Hadamard block {block}")
    if method == "auto":
        method = "matmul" if block <= MATMUL_MAX_BLOCK else "butterfly"
    blocks = x.reshape(*x.shape[:-1], n // block, block)
    if method == "butterfly":
        out = fwht(blocks)
    elif method == "kernel":
        out = _kernel_transform(blocks)
    else:
        out = blocks @ hadamard_matrix(block, x.dtype, x.device)
    return out.reshape(x.shape)


def fit_block(width: int, block: int, fit: str = "divide") -> tuple[int, int]:
    """(block size used, padded width) for a frame of ``width`` with requested ``block``."""
    check_choice("fit", fit, FITS)
    if not is_power_of_two(block):
        raise ZooError(f"block must be a power of two, got {block}")
    if width < 1:
        raise ZooError(f"width must be positive, got {width}")
    if fit == "pad":
        b = min(block, 1 << (width - 1).bit_length())  # a width below the block pads to a power of two
        return b, -(-width // b) * b
    b = block
    while width % b:
        b //= 2
    return b, width


def largest_block(width: int) -> int:
    """The largest power of two dividing ``width`` (1536 -> 512, 576 -> 64, odd -> 1): the block that
    ``fit_block`` reaches from any requested block at least that large."""
    if width < 1:
        raise ZooError(f"width must be positive, got {width}")
    return width & -width


def block_hadamard_matrix(width: int, block: int, dtype=torch.float64) -> torch.Tensor:
    """``blockdiag(H_b, ..., H_b)`` as a dense [width, width] matrix (symmetric and orthogonal)."""
    if width % block:
        raise ZooError(f"width {width} is not a multiple of the Hadamard block {block}")
    return torch.block_diag(*[hadamard_matrix(block, dtype)] * (width // block))


def frame_draws(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The random parts of a PHD frame of width n, drawn from ``g`` in this order: the signs D
    (fp64, +-1) and the permutation P."""
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs, torch.randperm(n, generator=g)


class PHDFrame(nn.Module):
    """The orthogonal frame T = blockdiag_b(H) · P · D of width ``n``, fixed by ``seed``.

    ``forward(x)`` computes ``x @ T^T`` (coordinates of x in the frame, [..., n_pad]);
    ``transpose(y)`` computes ``y @ T`` (back to [..., n]). Buffers are rebuilt from (n, block, seed,
    fit) and are not saved with a repair state.
    """

    def __init__(self, n: int, block: int = 512, seed: int = 0, fit: str = "divide", method: str = "auto"):
        super().__init__()
        self.n, self.seed, self.fit = n, seed, fit
        self.block, self.n_pad = fit_block(n, block, fit)
        self.method = check_choice("method", method, METHODS)
        signs, perm = frame_draws(self.n_pad, generator(seed))
        self.register_buffer("signs", signs.float(), persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse_perm", torch.argsort(perm), persistent=False)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.n_pad == self.n else nn.functional.pad(x, (0, self.n_pad - self.n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] -> [..., n_pad]: T x for each row x."""
        y = self._pad(x) * self.signs.to(x.dtype)
        y = y.index_select(-1, self.perm)
        return block_hadamard(y, self.block, self.method)

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        """[..., n_pad] -> [..., n]: T^T y for each row y."""
        z = block_hadamard(y, self.block, self.method)
        z = z.index_select(-1, self.inverse_perm) * self.signs.to(y.dtype)
        return z[..., : self.n]

    def rows(self, index: torch.Tensor | None = None, dtype=torch.float64) -> torch.Tensor:
        """The rows ``T[index, :]`` as a dense [len(index), n] matrix (all rows by default)."""
        index = torch.arange(self.n_pad) if index is None else index.long().cpu()
        one_hot = torch.zeros(len(index), self.n_pad, dtype=dtype)
        one_hot[torch.arange(len(index)), index] = 1  # only the rows asked for: n can be 14336
        return self.transpose(one_hot.to(self.signs.device))

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """T as a dense [n_pad, n] matrix."""
        return self.rows(None, dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, block={self.block}, n_pad={self.n_pad}, seed={self.seed}"
