"""Hadamard subframes and the dense core between them (ZOMBORG, source 000, sections 2.3 and 4.5-4.6): the
layer ``zoo.BlockwisePHD`` builds and ``zoo.CoupledCore`` shares between layers.

A target W (out x in) becomes ``W ~ B^T C A``: A = T_in[I, :] and B = T_out[J, :] are r_in and r_out rows
of structured orthogonal frames ``T = blockdiag_b(H) · P · D`` (``zoo.core.hadamard.PHDFrame``, fixed
by a seed: nothing about them is stored), and C (r_out x r_in) is a small dense core. ``phd_subframe`` picks a
frame's rows by data (``input_energy``, ``frame_energy`` of ``output_moment``); ``init_core`` starts C at the
activation-weighted least squares ``C = B W M A^T (A M A^T)^-1`` or at the plain slice.

``Subframe`` applies the rows as dense [r, n] buffers (``compute: rows``; rebuilt from the seed, never saved)
or as the structured transform and a gather/scatter (``transform``); ``auto`` takes rows when r <= b.
"""
from __future__ import annotations

import torch
from torch import nn

from .calibration import ActivationStats
from .errors import ZooError, check_choice
from .hadamard import PHDFrame, fit_block
from .linalg import rms, solve_psd_right
from .replacement import Replacement
from .seeds import derive_seed
from .technique import TensorSize

CORE_INITS = ("lstsq", "slice")
COMPUTES = ("auto", "rows", "transform")


class Subframe(nn.Module):
    """r coordinates of an orthogonal frame of width n: ``down`` maps [..., n] -> [..., r] (x -> R x)
    and ``up`` maps [..., r] -> [..., n] (v -> R^T v), for rows R [r, n] with orthonormal rows.

    With a ``PHDFrame`` and its chosen ``index``, ``compute="transform"`` runs the structured transform
    instead of the dense rows; both give the same numbers. Buffers are not persistent: they are
    rebuilt from the seed and the calibration statistics, and a repair state holds none of them.
    """

    def __init__(self, rows: torch.Tensor, frame: PHDFrame | None = None, index: torch.Tensor | None = None,
                 compute: str = "rows"):
        super().__init__()
        check_choice("compute", compute, COMPUTES[1:])
        if compute == "transform" and (frame is None or index is None):
            raise ZooError("compute='transform' needs a PHD frame and its index set")
        self.rank, self.width = rows.shape
        self.compute = compute
        self.register_buffer("rows", rows.float(), persistent=False)
        self.frame = frame if compute == "transform" else None
        self.register_buffer("index", None if index is None else index.long(), persistent=False)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        if self.frame is not None:
            return self.frame(x).index_select(-1, self.index)
        return x @ self.rows.T.to(x.dtype)

    def up(self, v: torch.Tensor) -> torch.Tensor:
        if self.frame is not None:
            full = v.new_zeros(*v.shape[:-1], self.frame.n_pad).index_copy(-1, self.index, v)
            return self.frame.transpose(full)
        return v @ self.rows.to(v.dtype)

    def export_ops(self, prefix: str) -> tuple[list[dict], list[dict], dict[str, str], dict[str, torch.Tensor]]:
        """(down program, up program, tensor kinds, tensors) of ``down``/``up`` in ``zoo.export`` ops, tensor
        names starting with ``prefix``: the dense rows, or the structured transform (signs, permutations
        and the kept index stored; the Hadamard blocks rebuilt from their size)."""
        p = prefix
        if self.frame is None:
            return ([{"op": "matmul", "t": p + "rows", "transpose": True}], [{"op": "matmul", "t": p + "rows"}],
                    {p + "rows": "model"}, {p + "rows": self.rows})
        f = self.frame
        pad = [{"op": "pad", "size": f.n_pad}] if f.n_pad != f.n else []
        down = pad + [{"op": "scale", "t": p + "signs"}, {"op": "gather", "t": p + "perm"},
                      {"op": "hadamard", "block": f.block}, {"op": "gather", "t": p + "index"}]
        up = [{"op": "scatter", "t": p + "index", "size": f.n_pad}, {"op": "hadamard", "block": f.block},
              {"op": "gather", "t": p + "inverse_perm"}, {"op": "scale", "t": p + "signs"},
              *([{"op": "slice", "size": f.n}] if f.n_pad != f.n else [])]
        kinds = {p + "signs": "model", p + "perm": "int64", p + "inverse_perm": "int64", p + "index": "int64"}
        tensors = {p + "signs": f.signs, p + "perm": f.perm, p + "inverse_perm": f.inverse_perm, p + "index": self.index}
        return down, up, kinds, tensors

    def extra_repr(self) -> str:
        return f"rank={self.rank}, width={self.width}, compute={self.compute}"


class BlockwisePHDLinear(Replacement):
    """y = B^T C A x + b: frozen frame rows A [r_in, in] and B [r_out, out] (``Subframe``s), a trainable
    dense core C [r_out, r_in] kept in fp32, and the original bias."""

    fp32_params = ("core",)

    def __init__(self, down: Subframe, core: torch.Tensor, up: Subframe, bias: torch.Tensor | None = None,
                 train_bias: bool = True):
        super().__init__()
        if core.shape != (up.rank, down.rank):
            raise ZooError(f"core shape {tuple(core.shape)} does not fit frames of rank {up.rank} x {down.rank}")
        self.in_features, self.out_features = down.width, up.width
        self.down, self.up = down, up
        self.core = nn.Parameter(core.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=train_bias)
        # relative steps (see FisherSVDLinear): one lr suits cores of any scale
        self.lr_scales = {n: rms(p) for n, p in self.named_parameters()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.down.down(x)
        y = self.up.up(u @ self.core.T.to(u.dtype))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        return self.up.rows.double().T @ self.core.double() @ self.down.rows.double()

    def export_parts(self, middle: list[dict] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """(spec, tensors) in ``zoo.export`` ops: down, the core, ``middle`` ops after it, up, the bias."""
        down, _, kinds, tensors = self.down.export_ops("down_")
        _, up, up_kinds, up_tensors = self.up.export_ops("up_")
        program = down + [{"op": "matmul", "t": "core", "transpose": True}] + list(middle or []) + up
        kinds |= up_kinds | {"core": "float32"}
        tensors |= up_tensors | {"core": self.core}
        if self.bias is not None:
            program.append({"op": "add", "t": "bias"})
            kinds["bias"], tensors["bias"] = "model", self.bias
        return ({"program": program, "tensors": kinds,
                 "ranks": {"rank_in": self.down.rank, "rank_out": self.up.rank}}, tensors)

    def export_spec(self) -> dict:
        return self.export_parts()[0]

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return self.export_parts()[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, core={tuple(self.core.shape)}"


# ---- choosing rows and the core from calibration statistics --------------------------------------

def second_moment(stats: ActivationStats | None, name: str = "") -> torch.Tensor:
    """E[x x^T] [in, in] when collected, else its diagonal E[x_i^2] [in] (fp64)."""
    if stats is None:
        raise ZooError(f"{name or 'this target'} needs calibration statistics (its input second moment)")
    if stats.second_moment is not None:
        return stats.second_moment.double()
    return stats.diag.double()


def frame_energy(frame: PHDFrame, moment: torch.Tensor) -> torch.Tensor:
    """diag(T S T^T) [n_pad]: E[(T x)_i^2] for second moment S (full [n, n], or its diagonal [n], in
    which case the cross terms are taken as zero)."""
    S = moment.to(frame.signs.device, torch.float64)
    if S.dim() == 2:
        return frame(frame(S).T).diagonal()
    # T_ik^2 = 1/b for the b source coordinates of row i's block, 0 elsewhere
    padded = nn.functional.pad(S, (0, frame.n_pad - frame.n))[frame.perm]
    return padded.reshape(-1, frame.block).mean(-1).repeat_interleave(frame.block)


def top_index(energy: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the r largest entries, in ascending order (ties: the lower index)."""
    order = torch.argsort(energy, descending=True, stable=True)[:r]
    return torch.sort(order).values


def input_energy(weight: torch.Tensor, frame: PHDFrame, moment: torch.Tensor) -> torch.Tensor:
    """Output energy carried by each input frame coordinate: ||W T^T e_i||^2 * E[(T x)_i^2]."""
    W = weight.detach().to(frame.signs.device, torch.float64)
    return frame(W).pow(2).sum(0) * frame_energy(frame, moment)


def output_moment(weight: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """E[(W x)(W x)^T] = W M W^T (with a diagonal M: W diag(M) W^T) [out, out], fp64."""
    W = weight.detach().double()
    M = moment.to(W.device)
    return (W * M) @ W.T if M.dim() == 1 else W @ M @ W.T


def core_least_squares(weight: torch.Tensor, moment: torch.Tensor, down_rows: torch.Tensor,
                       up_rows: torch.Tensor) -> torch.Tensor:
    """argmin_C E||B W x - C A x||^2 = B W M A^T (A M A^T)^-1 (fp64): the best core for fixed rows
    A = ``down_rows`` [r_in, in], B = ``up_rows`` [r_out, out] under second moment M (full or diagonal)."""
    W = weight.detach().double()
    A, B = down_rows.double().to(W.device), up_rows.double().to(W.device)
    M = moment.to(W.device)
    MAt = M[:, None] * A.T if M.dim() == 1 else M @ A.T  # [in, r_in]
    return solve_psd_right(B @ W @ MAt, A @ MAt)


def init_core(weight, moment, down_rows, up_rows, core_init: str) -> torch.Tensor:
    check_choice("core_init", core_init, CORE_INITS)
    if core_init == "slice":
        return up_rows.double() @ weight.detach().double() @ down_rows.double().T
    return core_least_squares(weight, moment, down_rows, up_rows)


def resolve_compute(compute: str, rank: int, block: int) -> str:
    check_choice("compute", compute, COMPUTES)
    if compute != "auto":
        return compute
    return "rows" if rank <= block else "transform"


def phd_subframe(width: int, rank: int, energy_of, *, block: int, fit: str, seed: int, compute: str,
                 name: str, side: str) -> Subframe:
    """A ``Subframe`` of the PHD frame of ``width`` (seeded by target and side) keeping the ``rank``
    coordinates of highest ``energy_of(frame)``."""
    frame = PHDFrame(width, block, derive_seed(seed, name, side), fit)
    if not 1 <= rank <= frame.n_pad:
        raise ZooError(f"{side} rank {rank} for {name} is out of range: it must be between 1 and {frame.n_pad} "
                       f"(the {side} width{' after padding' if frame.n_pad != width else ''})")
    index = top_index(energy_of(frame), rank)
    rows = frame.rows(index)
    return Subframe(rows, frame, index, resolve_compute(compute, rank, frame.block))


def subframe_footprint(width: int, rank: int, *, block: int, fit: str, compute: str, name: str, side: str,
                       indexed: bool = True) -> dict[str, TensorSize]:
    """The buffers of the ``Subframe`` that ``phd_subframe`` (``indexed``) or a dense ``Subframe(rows)``
    builds: rows [r, n] in the model dtype, the index [r], and with ``compute='transform'`` the frame's
    signs and permutations [n_pad]. Checks the rank as ``phd_subframe`` does."""
    b, n_pad = fit_block(width, block, fit)
    if indexed and not 1 <= rank <= n_pad:
        raise ZooError(f"{side} rank {rank} for {name} is out of range: it must be between 1 and {n_pad} "
                       f"(the {side} width{' after padding' if n_pad != width else ''})")
    sizes = {"rows": TensorSize((rank, width), "buffer")}
    if not indexed:
        return sizes
    sizes["index"] = TensorSize((rank,), "buffer", "int64")
    if resolve_compute(compute, rank, b) == "transform":
        sizes |= {"frame.signs": TensorSize((n_pad,), "buffer"),
                  "frame.perm": TensorSize((n_pad,), "buffer", "int64"),
                  "frame.inverse_perm": TensorSize((n_pad,), "buffer", "int64")}
    return sizes


def core_footprint(down: dict[str, TensorSize], up: dict[str, TensorSize], module: nn.Module,
                   train_bias: bool) -> dict[str, TensorSize]:
    """The tensors of a ``BlockwisePHDLinear`` over subframes of these footprints."""
    sizes = {"core": TensorSize((up["rows"].shape[0], down["rows"].shape[0]), "trainable", "float32")}
    if getattr(module, "bias", None) is not None:
        sizes["bias"] = TensorSize((module.out_features,), "trainable" if train_bias else "frozen")
    sizes |= {f"down.{k}": v for k, v in down.items()}
    sizes |= {f"up.{k}": v for k, v in up.items()}
    return sizes


def check_ranks(rank: int, rank_out: int | None) -> None:
    for label, value in (("rank", rank), ("rank_out", rank_out)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ZooError(f"{label} must be a positive int, got {value!r}")
