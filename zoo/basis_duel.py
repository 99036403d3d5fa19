"""The basis duel (source 000, section 4.2 "Phase 1.5: Structured Basis Duel" and section 6, items 1-2,
and section 7.3, reproduction A).

For one linear layer W (out x in) and a rank r, each basis gives a rank-r map ``U diag(sigma) V^T``
and the duel measures how well it reproduces the layer's outputs on held-out calibration activations,
before and after sigma-only tuning.

Bases (``BASES``):

- ``covariance``, ``diagonal``, ``fisher``, ``svd``: the weighted SVDs of ``zoo.fisher_svd.weighted_svd``
  (SVD-LLM whitening, ASVD, FWSVD, plain). Their sigma starts at the weighted singular values; their
  columns are orthonormal in the metric the weighting defines (``Basis.metric_in``/``metric_out``:
  V^T E[x x^T] V = I for ``covariance``, V^T diag(d)^2 V = I for ``diagonal``, U^T diag(f)^2 U = I for
  ``fisher``), and in that metric sigma = diag(U^T M_out W M_in V), the same rule as below.
- ``hadamard``, ``permuted_hadamard``, ``random_orthogonal``: a fixed orthonormal frame F on each side
  (columns are basis vectors). sigma starts at diag(U^T W V). r (output, input) column pairs are taken
  from the frames greedily by the output energy of the transformed weight M = F_out^T W F_in under the
  calibration statistics, M[j, i]^2 E[(F_in[:, i]^T x)^2], each row and column used once — the same
  selection for every frame, so the frames are compared and not the selection rules.

Hadamard frames here are block-diagonal: normalized Sylvester Hadamard blocks of size b = the largest
power of two dividing the width (1536 = 3 x 512 and 576 = 9 x 64 for the embedded teacher's down_proj;
an odd width gets b = 1, the identity). ``permuted_hadamard`` is ``T = blockdiag_b(H) . P . D`` (random
signs D, a random permutation P of the coordinates, then the blocks): with the permutation after the
blocks, as the name PHD reads (``P . H . D``), P would only reorder basis vectors, which the energy
selection ignores, so the duel mixes coordinates across blocks instead. The blocks, the block size and
the seeded draws of D and P are ``zoo.core.hadamard``'s (``block_hadamard_matrix``, ``largest_block``,
``frame_draws``); the duel's P is applied as a column gather of the dense matrix, where
``zoo.core.hadamard.PHDFrame`` gathers the coordinates (its P is the inverse of this one), and each
frame's seed comes from ``zoo.core.seeds`` (scheme ``sha256``).

Sigma-only tuning: Adam on sigma alone (U, V frozen), minimizing the relative output MSE on minibatches
of the calibration activations drawn with a seeded generator; the learning rate is relative to the RMS
of the initial sigma (as ``FisherSVDLinear`` does). After each step the full training MSE is evaluated
(exactly, in r dimensions) and the best sigma so far is kept, so tuning never increases the training
MSE. The closed-form sigma that minimizes the training MSE (the limit of any sigma-only tuning) is
reported beside it. Metrics on held-out activations: relative output MSE ||Y - Y_hat||^2 / ||Y||^2 and
the mean per-token cosine of y and y_hat (bias included in both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .core import calibration as calib
from .core.calibration import ActivationStats
from .core.errors import ZooError, check_choice
from .core.hadamard import block_hadamard_matrix, frame_draws, largest_block
from .core.record import Recorder, model_device, record
from .core.seeds import derive_seed, generator
from .fisher_svd import diagonal_scale, fisher_scale, weighted_svd

#: basis name -> weighting of ``weighted_svd`` (weighted bases) or None (fixed frames)
WEIGHTED = {"covariance": "covariance", "svd": "none", "diagonal": "diagonal", "fisher": "fisher"}
FRAMES = ("hadamard", "permuted_hadamard", "random_orthogonal")
BASES = (*WEIGHTED, *FRAMES)
DEFAULT_BASES = ("covariance", "svd", "diagonal", "hadamard", "permuted_hadamard", "random_orthogonal")
DEFAULT_STEPS = (0, 100, 1000)
#: two bases are "about equal" when their held-out relative MSEs differ by at most this fraction
SIMILAR = 0.10


# --------------------------------------------------------------------------------------------------
# frames


def frame(kind: str, n: int, seed: int = 0, side: str = "in") -> torch.Tensor:
    """An n x n orthogonal matrix whose columns are the basis vectors of ``kind`` (fp64, deterministic)."""
    check_choice("frame", kind, FRAMES)
    # each (basis, side) draws from its own stream: adding or removing a basis changes no other's numbers
    g = generator(seed, kind, side, n, scheme="sha256")
    H = block_hadamard_matrix(n, largest_block(n))
    if kind == "hadamard":
        return H
    if kind == "permuted_hadamard":
        signs, perm = frame_draws(n, g)
        T = H[:, perm] * signs  # T = H . P . D; rows of T are the basis vectors
        return T.T.contiguous()
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))  # sign fix: Haar-distributed (Mezzadri 2007)


def input_energy(F: torch.Tensor, stats: ActivationStats | None) -> torch.Tensor:
    """E[(F[:, i]^T x)^2] per column of F (ones without statistics)."""
    if stats is None:
        return torch.ones(F.shape[1], dtype=torch.float64)
    if stats.second_moment is not None:
        return ((stats.second_moment.double() @ F) * F).sum(0)
    return (F.pow(2) * stats.diag.double()[:, None]).sum(0)


def select_pairs(score: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (row, column) pairs of largest ``score``, each row and column at most once."""
    score = score.clone()
    rows, cols = [], []
    for _ in range(rank):
        flat = int(torch.argmax(score))
        j, i = divmod(flat, score.shape[1])
        rows.append(j)
        cols.append(i)
        score[j, :] = -math.inf
        score[:, i] = -math.inf
    return torch.tensor(rows), torch.tensor(cols)


# --------------------------------------------------------------------------------------------------
# bases


@dataclass
class Basis:
    """A rank-r basis of one layer: ``W ~ U diag(sigma) V^T`` (fp64).

    ``metric_out``/``metric_in`` are the inner products in which U's and V's columns are orthonormal
    (None: the Euclidean one): U^T metric_out U = I and V^T metric_in V = I.
    """

    name: str
    U: torch.Tensor  # [out, r]
    sigma: torch.Tensor  # [r], the initial sigma
    V: torch.Tensor  # [in, r]
    metric_out: torch.Tensor | None = None
    metric_in: torch.Tensor | None = None
    weighting_used: str | None = None

    def orthonormality_error(self) -> float:
        """max |U^T M_out U - I| and |V^T M_in V - I| over both sides."""
        worst = 0.0
        for A, M in ((self.U, self.metric_out), (self.V, self.metric_in)):
            gram = A.T @ (A if M is None else M @ A)
            worst = max(worst, float((gram - torch.eye(len(gram), dtype=gram.dtype)).abs().max()))
        return worst


def build_basis(name: str, weight: torch.Tensor, rank: int, stats: ActivationStats | None = None, seed: int = 0,
                alpha: float = 0.5) -> Basis:
    """The rank-``rank`` basis ``name`` (see ``BASES``) of ``weight`` [out, in]."""
    check_choice("basis", name, BASES)
    W = weight.detach().double().cpu()
    out_f, in_f = W.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise ZooError(f"rank {rank} is out of range: it must be between 1 and min(out={out_f}, in={in_f})")
    if name in WEIGHTED:
        U, sigma, V, used = weighted_svd(W, rank, WEIGHTED[name], stats, alpha, name)
        metric_out = metric_in = None
        if used == "covariance":
            metric_in = stats.second_moment.double()
        elif used == "diagonal":
            metric_in = torch.diag(diagonal_scale(stats, alpha).pow(2))
        elif used == "fisher":
            metric_out = torch.diag(fisher_scale(stats).pow(2))
        return Basis(name, U.cpu(), sigma.cpu(), V.cpu(), metric_out, metric_in, used)
    F_out, F_in = frame(name, out_f, seed, "out"), frame(name, in_f, seed, "in")
    M = F_out.T @ W @ F_in
    rows, cols = select_pairs(M.pow(2) * input_energy(F_in, stats)[None, :], rank)
    U, V = F_out[:, rows], F_in[:, cols]
    return Basis(name, U, torch.diagonal(U.T @ W @ V).clone(), V)


# --------------------------------------------------------------------------------------------------
# metrics and sigma-only tuning


def output_metrics(X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, basis: Basis,
                   sigma: torch.Tensor) -> dict[str, float]:
    """Relative output MSE and mean per-token cosine of the basis's outputs on inputs X [n, in]."""
    X = X.double()
    b = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    Y = X @ weight.detach().double().cpu().T + b
    Y_hat = ((X @ basis.V) * sigma) @ basis.U.T + b
    rel = float((Y - Y_hat).pow(2).sum() / Y.pow(2).sum().clamp_min(1e-300))
    cos = float(nn.functional.cosine_similarity(Y, Y_hat, dim=-1, eps=1e-12).mean())
    return {"rel_mse": rel, "cosine": cos}


class SigmaObjective:
    """The relative output MSE on inputs X as a quadratic in sigma, for U, V fixed (exact, fp64).

    ||Y - (X V) diag(sigma) U^T||^2 = ||Y||^2 - 2 sigma . c + sigma^T A sigma with H = X V,
    A = (H^T H) * (U^T U) elementwise and c = diag(U^T Y^T H).
    """

    def __init__(self, X: torch.Tensor, weight: torch.Tensor, basis: Basis):
        X = X.double()
        Y = X @ weight.detach().double().cpu().T  # the bias cancels in Y - Y_hat
        self.H = X @ basis.V  # [n, r]
        self.YU = Y @ basis.U  # [n, r]
        self.y2 = Y.pow(2).sum(-1)  # [n]
        self.G = basis.U.T @ basis.U
        self.A = (self.H.T @ self.H) * self.G
        self.c = (self.H * self.YU).sum(0)
        self.total = float(self.y2.sum())

    def __call__(self, sigma: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Relative MSE over all rows, or over the rows ``index`` (differentiable in sigma)."""
        if index is None:
            A, c, total = self.A, self.c, self.total
        else:
            H = self.H[index]
            A, c, total = (H.T @ H) * self.G, (H * self.YU[index]).sum(0), self.y2[index].sum()
        return (total - 2 * sigma @ c + sigma @ A @ sigma) / total

    def optimum(self) -> torch.Tensor:
        """The sigma of least training MSE (a tiny ridge keeps dead directions finite)."""
        ridge = 1e-12 * self.A.diagonal().mean().clamp_min(1e-300)
        return torch.linalg.solve(self.A + ridge * torch.eye(len(self.A), dtype=self.A.dtype), self.c)


def tune_sigma(objective: SigmaObjective, sigma0: torch.Tensor, steps, lr: float = 0.01,
               batch_tokens: int | None = 512, seed: int = 0) -> tuple[dict[int, torch.Tensor], list[float]]:
    """Sigma-only Adam on the relative output MSE; the best sigma (full training MSE) after each step count.

    Returns ({step count: sigma}, training MSE of the best sigma after every step, step 0 first).
    """
    steps = sorted(set(int(s) for s in steps))
    if not steps or steps[0] < 0:
        raise ZooError(f"steps must be non-negative step counts, got {steps}")
    n = objective.H.shape[0]
    sigma = nn.Parameter(sigma0.double().clone())
    # relative step size: the same lr moves a basis whose sigma is 1e-3 or 10 by the same fraction
    scale = float(sigma0.double().pow(2).mean().sqrt()) or 1.0
    optimizer = torch.optim.Adam([sigma], lr=lr * scale)
    draws = generator(seed)
    best = sigma.detach().clone()
    best_mse = float(objective(best))
    curve = [best_mse]
    snapshots = {}
    threads = torch.get_num_threads()
    # thousands of tiny ops: one thread is ~100x faster than several contending for busy cores, and
    # the result does not depend on the machine's core count
    torch.set_num_threads(1)
    try:
        for step in range(steps[-1] + 1):
            if step in steps:
                snapshots[step] = best.clone()
            if step == steps[-1]:
                break
            index = None if batch_tokens is None or batch_tokens >= n else torch.randint(
                0, n, (batch_tokens,), generator=draws)
            optimizer.zero_grad()
            objective(sigma, index).backward()
            optimizer.step()
            with torch.no_grad():
                mse = float(objective(sigma))
            if mse < best_mse:
                best_mse, best = mse, sigma.detach().clone()
            curve.append(best_mse)
    finally:
        torch.set_num_threads(threads)
    return snapshots, curve


# --------------------------------------------------------------------------------------------------
# the duel


@dataclass
class DuelResult:
    """Per basis and step count: held-out relative MSE and cosine, and training relative MSE."""

    target: str
    rank: int
    steps: list[int]
    rows: dict[str, dict] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def mse(self, basis: str, step: int | str) -> float:
        return self.rows[basis]["steps"][str(step)]["heldout_rel_mse"]

    def findings(self) -> dict:
        """What the source claims, as measured: covariance best, Hadamard ~ random, sigma-only limits."""
        last = self.steps[-1]
        out: dict = {}
        others = [b for b in self.rows if b != "covariance"]
        if "covariance" in self.rows and others:
            cov = {s: self.mse("covariance", s) for s in self.steps}
            beaten = [(b, s) for b in others for s in self.steps if self.mse(b, s) < cov[s]]
            out["covariance_best"] = {"holds": not beaten, "violations": [f"{b}@{s}" for b, s in beaten]}
        if "hadamard" in self.rows and "random_orthogonal" in self.rows:
            h, r = self.mse("hadamard", last), self.mse("random_orthogonal", last)
            out["hadamard_vs_random"] = {"hadamard": h, "random_orthogonal": r, "ratio": h / r,
                                         "similar": abs(h / r - 1) <= SIMILAR}
        if len(self.steps) > 1:
            poorest = max(self.rows, key=lambda b: self.mse(b, self.steps[0]))
            before, after = self.mse(poorest, self.steps[0]), self.mse(poorest, last)
            reference = self.mse("covariance", self.steps[0]) if "covariance" in self.rows else 0.0
            gap = before - reference
            out["sigma_only_on_poorest"] = {
                "basis": poorest, "steps": last, "before": before, "after": after,
                "relative_drop": (before - after) / before if before else 0.0,
                "gap_closed": (before - after) / gap if gap > 0 else 0.0,
                "sigma_optimum": self.rows[poorest]["sigma_optimum"]["heldout_rel_mse"],
                "moved": (before - after) / before > SIMILAR if before else False,
            }
        return out

    def to_dict(self) -> dict:
        return {"target": self.target, "rank": self.rank, "steps": self.steps, "config": self.config,
                "bases": self.rows, "findings": self.findings()}


def run_duel(weight: torch.Tensor, bias: torch.Tensor | None, stats: ActivationStats | None, x_train: torch.Tensor,
             x_heldout: torch.Tensor, rank: int, bases=DEFAULT_BASES, steps=DEFAULT_STEPS, lr: float = 0.01,
             batch_tokens: int | None = 512, seed: int = 0, alpha: float = 0.5, target: str = "") -> DuelResult:
    """The duel on one layer: build each basis, tune sigma, measure on ``x_heldout``.

    ``stats`` are the calibration statistics of ``x_train`` (the weighted bases and the frame selection
    use them); tuning minimizes the output MSE on ``x_train``.
    """
    bases = list(bases)
    if not bases:
        raise ZooError(f"no bases to compare; valid choices: {', '.join(BASES)}")
    for name in bases:
        check_choice("basis", name, BASES)
    if len(set(bases)) != len(bases):
        raise ZooError(f"bases {bases} name a basis twice")
    steps = sorted(set(int(s) for s in steps))
    result = DuelResult(target, rank, steps, config={"bases": bases, "lr": lr, "batch_tokens": batch_tokens,
                                                     "seed": seed, "alpha": alpha, "train_tokens": len(x_train),
                                                     "heldout_tokens": len(x_heldout)})
    W = weight.detach().double().cpu()
    for name in bases:
        basis = build_basis(name, W, rank, stats, seed, alpha)
        objective = SigmaObjective(x_train, W, basis)
        snapshots, curve = tune_sigma(objective, basis.sigma, steps, lr, batch_tokens,
                                      derive_seed(seed, name, scheme="sha256_32"))
        row = {"weighting_used": basis.weighting_used, "orthonormality_error": basis.orthonormality_error(),
               "steps": {}, "train_curve": curve[:: max(1, len(curve) // 200)]}
        for step, sigma in snapshots.items():
            held = output_metrics(x_heldout, W, bias, basis, sigma)
            row["steps"][str(step)] = {"heldout_rel_mse": held["rel_mse"], "heldout_cosine": held["cosine"],
                                       "train_rel_mse": float(objective(sigma))}
        optimum = objective.optimum()
        held = output_metrics(x_heldout, W, bias, basis, optimum)
        row["sigma_optimum"] = {"heldout_rel_mse": held["rel_mse"], "heldout_cosine": held["cosine"],
                                "train_rel_mse": float(objective(optimum))}
        result.rows[name] = row
    return result


# --------------------------------------------------------------------------------------------------
# activations


def collect_activations(model: nn.Module, target: str, calibration_loader, heldout_loader, fisher: bool = False,
                        max_tokens: int | None = None, full_cov_max: int = 8192, device=None,
                        progress: bool = False) -> tuple[ActivationStats, torch.Tensor, torch.Tensor]:
    """(calibration statistics, calibration inputs [n, in], held-out inputs [m, in]) of ``target``.

    The statistics come from ``zoo.core.calibration.collect``; the raw inputs are recorded in the same
    forward passes (real tokens only, by the attention mask).
    """
    device = model_device(model, device)
    with Recorder(model, target) as recorder:
        stats = calib.collect(model, recorder.track(calibration_loader), [target], full_cov_max=full_cov_max,
                              max_tokens=max_tokens, collectors={"fisher": [target]} if fisher else None,
                              device=device, progress=progress)[target]
        x_train = recorder.rows().double()
    x_heldout = record(model, target, heldout_loader, device)[1].double()
    if len(x_heldout) == 0:
        raise ZooError("the heldout loader produced no tokens")
    return stats, x_train, x_heldout


def activations_to_tensors(stats: ActivationStats, x_train: torch.Tensor, x_heldout: torch.Tensor) -> dict:
    """The duel's inputs as cache tensors (activations stored in fp32: half the bytes, ample precision)."""
    return {**stats.to_tensors("stats"), "x_train": x_train.float(), "x_heldout": x_heldout.float()}


def activations_from_tensors(tensors: dict) -> tuple[ActivationStats, torch.Tensor, torch.Tensor]:
    return (ActivationStats.from_tensors(tensors, "stats"), tensors["x_train"].double(),
            tensors["x_heldout"].double())


# --------------------------------------------------------------------------------------------------
# reporting


def table_rows(result: DuelResult) -> tuple[list[str], list[list]]:
    """(columns, rows) of the duel table: held-out relative MSE per step count and at the sigma optimum,
    and the cosine before and after tuning."""
    first, last = result.steps[0], result.steps[-1]
    columns = ["basis", *[f"rel MSE @{s}" for s in result.steps], "rel MSE @sigma*", f"cosine @{first}"]
    if last != first:
        columns.append(f"cosine @{last}")
    rows = []
    for name, row in result.rows.items():
        cells = [name, *[row["steps"][str(s)]["heldout_rel_mse"] for s in result.steps],
                 row["sigma_optimum"]["heldout_rel_mse"], row["steps"][str(first)]["heldout_cosine"]]
        if last != first:
            cells.append(row["steps"][str(last)]["heldout_cosine"])
        rows.append(cells)
    return columns, rows


def findings_text(result: DuelResult) -> list[str]:
    """The findings as sentences, stating what was measured whichever way it fell."""
    f = result.findings()
    lines = []
    if "covariance_best" in f:
        c = f["covariance_best"]
        lines.append("covariance has the lowest held-out relative MSE of all bases at every step count: "
                     + ("yes" if c["holds"] else f"NO (beaten by {', '.join(c['violations'])})"))
    if "hadamard_vs_random" in f:
        h = f["hadamard_vs_random"]
        lines.append(f"Hadamard ~ random: {'yes' if h['similar'] else 'no'} (hadamard {h['hadamard']:.4f} vs "
                     f"random_orthogonal {h['random_orthogonal']:.4f}, ratio {h['ratio']:.3f}; "
                     f"'~' means within {SIMILAR:.0%})")
    if "sigma_only_on_poorest" in f:
        s = f["sigma_only_on_poorest"]
        lines.append(f"{s['steps']} sigma-only steps moved the poorest basis ({s['basis']}): "
                     f"{'yes' if s['moved'] else 'no'} (rel MSE {s['before']:.4f} -> {s['after']:.4f}, "
                     f"{s['relative_drop']:.1%} lower, {s['gap_closed']:.1%} of its gap to covariance closed; "
                     f"the best possible sigma reaches {s['sigma_optimum']:.4f}; 'moved' means more than "
                     f"{SIMILAR:.0%} lower)")
    return lines


def format_table(result: DuelResult) -> str:
    """The duel as a markdown table followed by its findings."""
    columns, rows = table_rows(result)
    lines = [f"basis duel: {result.target or 'layer'}, rank {result.rank}, held-out relative output MSE "
             "||Y - Y_hat||^2 / ||Y||^2 and mean per-token cosine", "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for cells in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else f"{c:.4f}" for c in cells) + " |")
    lines.append("")
    lines.extend(f"- {line}" for line in findings_text(result))
    return "\n".join(lines)


def plot(result: DuelResult, path: str | Path) -> Path:
    """Bar chart of the held-out relative MSE per basis, one bar per step count and one at sigma*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.rows)
    series = [(f"{s} steps", [result.mse(b, s) for b in names]) for s in result.steps]
    series.append(("sigma*", [result.rows[b]["sigma_optimum"]["heldout_rel_mse"] for b in names]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 4.2))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("held-out relative output MSE")
    values = [v for _, vs in series for v in vs if v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_title(f"basis duel: {result.target}, rank {result.rank}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
