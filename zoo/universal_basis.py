"""Universal basis from a LoRA delta bank: canonicalization, basis extraction, projection, controls, and
coefficient-only adapters (WIZORB; source 001, sections 2.2, 4, 5, 6 phases 4-14: steps 2-6 of the pipeline).

Per module, with a bank of LoRA adapters (``zoo.lora``; step 1):

2. ``canonicalize``: dW = scale B A = U S V^T; a_j = sqrt(S_j) V_j, b_j = sqrt(S_j) U_j; with
   s = sqrt(||a_j|| / ||b_j||): a_j /= s, b_j *= s; v_j = [a_j; b_j]. The SVD is taken of the small
   r x r core between QR factors of B and A^T, so it costs O((in + out) r^2), never a dense dW. One
   gauge freedom remains after the SVD: the joint sign of (a_j, b_j). It is fixed (largest-magnitude
   entry of v_j positive) so that the same dW always gives the same rows; dW is unchanged
   (sum_j b_j a_j^T = U S V^T).
3. ``fit_subspace``: stack the rows of all adapters, center by their mean mu, SVD; the components are the
   right singular vectors with their singular values (the explained-variance spectrum). ``separate`` mode
   fits the a halves and the b halves apart; ``joint`` mode fits v = [a; b].
4. ``UniversalBasisLoRA`` (in ``zoo.universal_basis_lora``): rows V = mu_A + c^A C_A,
   U = mu_B + c^B C_B; dW = U^T V; only c^A, c^B (r x k each: 2 r k per module) train. In ``joint``
   mode one c (r x k) drives both halves.
5. ``ModuleBasis.project``: c = (v - mu) C^T, v_hat = mu + c C (orthogonal projection; C has orthonormal
   rows); ``relative_error`` is ||dW - dW_hat||_F / ||dW||_F.
6. Controls at the same k: ``random`` (a seeded random orthonormal basis; ``zoo.core.seeds``, scheme
   ``affine``), ``secondary`` (components k..2k) and ``mean`` (mu alone, k = 0) — the replication
   finding that the uplift came from the bank's mean, not its directions, is why ``mean`` is a control.

Coefficient-only training is ``DistillationModule(parts=[UniversalBasis(...)], objective="next_token")`` (or
the distillation loss); repair states, targets and mixing work as for every technique.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .core.cache import atomic_save
from .core.errors import ZooError, check_choice
from .core.seeds import generator
from .lora import LoraAdapter, lora_scale, read_adapter, save_adapter

log = logging.getLogger(__name__)

MODES = ("separate", "joint")
CONTROLS = ("universal", "random", "secondary", "mean")
FORMAT = "zoo_universal_basis/1"
#: singular values below this fraction of the largest are numerically zero (not basis directions)
RANK_TOL = 1e-10


# --------------------------------------------------------------------------------------------------
# step 2: canonicalization


def canonicalize(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, fix_sign: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical rank rows (a [r, in], b [r, out], fp64) of dW = scale * B @ A, with dW = b^T a.

    Rows come in decreasing singular value; a zero singular value gives zero rows.
    """
    r = A.shape[0]
    if B.shape[1] != r:
        raise ZooError(f"canonicalize: A is {tuple(A.shape)} and B is {tuple(B.shape)}; B must be [out, {r}]")
    if r > min(A.shape[1], B.shape[0]):
        raise ZooError(f"canonicalize: rank {r} exceeds min(in={A.shape[1]}, out={B.shape[0]})")
    Qa, Ra = torch.linalg.qr(A.double().T)  # A^T = Qa Ra
    Qb, Rb = torch.linalg.qr(B.double())  # B = Qb Rb
    Uc, S, Vch = torch.linalg.svd(scale * Rb @ Ra.T)  # dW = Qb (Uc S Vc^T) Qa^T
    root = S.clamp_min(0).sqrt()
    a = root[:, None] * (Qa @ Vch.T).T
    b = root[:, None] * (Qb @ Uc).T
    na, nb = a.norm(dim=1), b.norm(dim=1)
    ok = (na > 0) & (nb > 0)
    s = torch.where(ok, (na / torch.where(ok, nb, 1.0)).sqrt(), torch.ones_like(na))
    a, b = a / s[:, None], b * s[:, None]
    if fix_sign:
        v = torch.cat([a, b], dim=1)
        sign = torch.sign(v.gather(1, v.abs().argmax(dim=1, keepdim=True))).squeeze(1)
        sign[sign == 0] = 1
        a, b = a * sign[:, None], b * sign[:, None]
    return a, b


def delta_from_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dW = b^T a (dense)."""
    return b.T @ a


def frobenius_sq(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """||P^T Q||_F^2 = sum((P P^T) * (Q Q^T)) without forming P^T Q (P [m, out], Q [m, in])."""
    return ((P @ P.T) * (Q @ Q.T)).sum().clamp_min(0)


def delta_error_sq(a: torch.Tensor, b: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor
                   ) -> tuple[float, float]:
    """(||dW - dW_hat||_F^2, ||dW||_F^2) for dW = b^T a, dW_hat = b_hat^T a_hat."""
    err = frobenius_sq(torch.cat([b, -b_hat]), torch.cat([a, a_hat]))
    return float(err), float(frobenius_sq(b, a))


# --------------------------------------------------------------------------------------------------
# step 3: a subspace per module (half)


@dataclass
class Subspace:
    """Mean and orthonormal components (rows) of a set of row vectors, with their singular values."""

    mean: torch.Tensor  # [D]
    components: torch.Tensor  # [K, D], orthonormal rows, by decreasing singular value
    singular_values: torch.Tensor  # [K]

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def rank(self) -> int:
        return self.components.shape[0]

    def explained_variance(self) -> torch.Tensor:
        """Fraction of the centered variance along each component."""
        energy = self.singular_values.double().pow(2)
        return energy / energy.sum().clamp_min(1e-300)

    def basis(self, k: int, control: str = "universal", seed: int = 0, key: str = "") -> torch.Tensor:
        """The [k', D] rows the projection uses: ``universal`` the top k, ``secondary`` components
        k..2k, ``random`` k seeded random orthonormal rows (seed and ``key`` fix them), ``mean`` none."""
        check_choice("control", control, CONTROLS)
        if k < 0:
            raise ZooError(f"k={k} must be >= 0")
        if control == "mean" or k == 0:
            return self.components.new_zeros((0, self.dim))
        if control == "random":
            if k > self.dim:
                raise ZooError(f"random basis of k={k} rows in dimension {self.dim}: k must be <= {self.dim}")
            gauss = torch.randn(self.dim, k, generator=generator(seed, key, scheme="affine"), dtype=torch.float64)
            Q, R = torch.linalg.qr(gauss)
            Q = Q * torch.sign(torch.diagonal(R))  # Haar-distributed, independent of QR's sign convention
            return Q.T.to(self.components.dtype)
        stop = k if control == "universal" else 2 * k
        if stop > self.rank:
            what = f"components {k}..{2 * k}" if control == "secondary" else f"the top {k} components"
            raise ZooError(f"{key or 'basis'}: {what} requested but the basis has {self.rank} (the bank's rows "
                           f"minus one, at most); lower k")
        return self.components[stop - k:stop]

    def project(self, X: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficients [n, k], reconstruction [n, D]) of rows X in the affine subspace mu + span(C)."""
        mu, C = self.mean.to(X.dtype), C.to(X.dtype)
        coef = (X - mu) @ C.T
        return coef, mu + coef @ C


def fit_subspace(X: torch.Tensor) -> Subspace:
    """Mean-centered SVD of the rows of X [n, D] (fp64); components with numerically zero singular
    values are dropped, so rank <= n - 1."""
    X = X.double()
    mean = X.mean(dim=0)
    _, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    keep = int((S > RANK_TOL * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    return Subspace(mean, Vh[:keep].contiguous(), S[:keep].contiguous())


@dataclass
class ModuleBasis:
    """The basis of one module: subspaces ``A`` and ``B`` (separate) or ``AB`` (joint, v = [a; b])."""

    mode: str
    in_features: int
    out_features: int
    halves: dict[str, Subspace]

    @property
    def rank(self) -> int:
        return min(s.rank for s in self.halves.values())

    def bases(self, k: int, control: str = "universal", seed: int = 0, key: str = "") -> dict[str, torch.Tensor]:
        return {h: s.basis(k, control, seed, f"{key}:{h}") for h, s in self.halves.items()}

    def project_rows(self, a: torch.Tensor, b: torch.Tensor, bases: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(coefficients per half, a_hat, b_hat) of canonical rows a [r, in], b [r, out]."""
        if self.mode == "joint":
            coef, v_hat = self.halves["AB"].project(torch.cat([a, b], dim=1), bases["AB"])
            return {"AB": coef}, v_hat[:, :self.in_features], v_hat[:, self.in_features:]
        coef_a, a_hat = self.halves["A"].project(a, bases["A"])
        coef_b, b_hat = self.halves["B"].project(b, bases["B"])
        return {"A": coef_a, "B": coef_b}, a_hat, b_hat

    def layer_factors(self, bases: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
        """(mean_A [in], C_A [k, in], mean_B [out], C_B [k, out]) for ``UniversalBasisLoRA``."""
        if self.mode == "joint":
            mu, C = self.halves["AB"].mean, bases["AB"]
            n = self.in_features
            return mu[:n], C[:, :n], mu[n:], C[:, n:]
        return self.halves["A"].mean, bases["A"], self.halves["B"].mean, bases["B"]


def fit_module_basis(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], mode: str = "separate") -> ModuleBasis:
    """The basis of one module from the canonical rows (a [r_i, in], b [r_i, out]) of each adapter."""
    check_choice("mode", mode, MODES)
    a = torch.cat([r[0] for r in rows])
    b = torch.cat([r[1] for r in rows])
    halves = {"AB": fit_subspace(torch.cat([a, b], dim=1))} if mode == "joint" else \
        {"A": fit_subspace(a), "B": fit_subspace(b)}
    return ModuleBasis(mode, a.shape[1], b.shape[1], halves)


# --------------------------------------------------------------------------------------------------
# the bank, the basis file


class DeltaBank:
    """LoRA adapters (PEFT directories) over the same modules of the same base model, canonicalized."""

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise ZooError("the delta bank is empty: give at least one PEFT adapter directory")
        self.paths = [str(p) for p in paths]
        self.adapters: list[LoraAdapter] = [read_adapter(p) for p in self.paths]
        first = self.adapters[0]
        self.modules = first.modules
        for adapter in self.adapters[1:]:
            if set(adapter.modules) != set(self.modules):
                extra, missing = set(adapter.modules) - set(self.modules), set(self.modules) - set(adapter.modules)
                raise ZooError(f"adapter {adapter.path!r} covers other modules than {first.path!r}: "
                               f"extra {sorted(extra)[:3]}, missing {sorted(missing)[:3]}")
            for m in self.modules:
                if (adapter.A[m].shape[1], adapter.B[m].shape[0]) != (first.A[m].shape[1], first.B[m].shape[0]):
                    raise ZooError(f"adapter {adapter.path!r}: {m} is {adapter.B[m].shape[0]} x {adapter.A[m].shape[1]}, "
                                   f"in {first.path!r} it is {first.B[m].shape[0]} x {first.A[m].shape[1]}")
        self._rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def names(self) -> list[str]:
        return [Path(p).name for p in self.paths]

    @property
    def rank(self) -> int:
        return max(a.rank(m) for a in self.adapters for m in self.modules)

    def __len__(self) -> int:
        return len(self.adapters)

    def rows(self, module: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Canonical rows of ``module`` for every adapter (cached)."""
        if module not in self._rows:
            self._rows[module] = [canonicalize(ad.A[module], ad.B[module], ad.scale[module]) for ad in self.adapters]
        return self._rows[module]


@dataclass
class UniversalBasisFile:
    """Bases of every module of a bank, with the bank's description (``save`` / ``load_basis``)."""

    mode: str
    rank: int  # rows per adapter (the bank's LoRA rank r)
    modules: dict[str, ModuleBasis]
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for m, basis in self.modules.items():
            for h, s in basis.halves.items():
                tensors[f"{m}.{h}.mean"] = s.mean
                tensors[f"{m}.{h}.components"] = s.components
                tensors[f"{m}.{h}.singular_values"] = s.singular_values
                tensors[f"{m}.{h}.explained_variance"] = s.explained_variance()
        shapes = {m: [b.out_features, b.in_features] for m, b in self.modules.items()}
        header = {"zoo_format": FORMAT, "mode": self.mode, "rank": str(self.rank), "modules": json.dumps(shapes),
                  "meta": json.dumps(self.meta, default=str)}
        atomic_save(tensors, path, header)
        return Path(path)


def load_basis(path: str | Path) -> UniversalBasisFile:
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"basis file {str(path)!r} does not exist (write one with `zoo basis`)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("zoo_format") != FORMAT:
            raise ZooError(f"{str(path)!r} is not a zoo universal basis (format {meta.get('zoo_format')!r})")
        mode = meta["mode"]
        modules = {}
        for m, (out_f, in_f) in json.loads(meta["modules"]).items():
            halves = {}
            for h in (("AB",) if mode == "joint" else ("A", "B")):
                halves[h] = Subspace(f.get_tensor(f"{m}.{h}.mean"), f.get_tensor(f"{m}.{h}.components"),
                                     f.get_tensor(f"{m}.{h}.singular_values"))
            modules[m] = ModuleBasis(mode, in_f, out_f, halves)
    return UniversalBasisFile(mode, int(meta["rank"]), modules, json.loads(meta.get("meta", "{}")))


def extract_basis(bank: DeltaBank, mode: str = "separate", members: Sequence[int] | None = None,
                  progress: bool = False) -> UniversalBasisFile:
    """Per-module bases from the bank's adapters (``members``: indices to use; default all)."""
    from tqdm.auto import tqdm

    check_choice("mode", mode, MODES)
    idx = list(range(len(bank))) if members is None else list(members)
    modules = {}
    for m in tqdm(bank.modules, desc="basis", unit="module", disable=not progress):
        rows = bank.rows(m)
        modules[m] = fit_module_basis([rows[i] for i in idx], mode)
    meta = {"adapters": [bank.paths[i] for i in idx], "base_model": bank.adapters[0].base_model}
    return UniversalBasisFile(mode, bank.rank, modules, meta)


# --------------------------------------------------------------------------------------------------
# step 5: projection and reconstruction error


@dataclass
class Projection:
    """An adapter projected into a basis: canonical rows per module and the relative L2 error of dW."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    coefficients: dict[str, dict[str, torch.Tensor]]
    error_sq: dict[str, float]
    norm_sq: dict[str, float]

    def relative_error(self, module: str | None = None) -> float:
        """||dW - dW_hat|| / ||dW|| of one module, or over all modules together (None)."""
        if module is not None:
            return math.sqrt(self.error_sq[module] / max(self.norm_sq[module], 1e-300))
        return math.sqrt(sum(self.error_sq.values()) / max(sum(self.norm_sq.values()), 1e-300))

    def mean_module_error(self) -> float:
        errors = [self.relative_error(m) for m in self.error_sq]
        return sum(errors) / len(errors)


def project_rows(basis: UniversalBasisFile, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], k: int,
                 control: str = "universal", seed: int = 0) -> Projection:
    """Project canonical rows (per module) into ``basis`` at ``k`` with ``control``."""
    missing = [m for m in rows if m not in basis.modules]
    if missing:
        raise ZooError(f"the basis has no module {missing[0]!r} (and {len(missing) - 1} more); it covers "
                       f"{len(basis.modules)} modules, e.g. {next(iter(basis.modules), '-')}")
    out = Projection({}, {}, {}, {}, {})
    for m, (a, b) in rows.items():
        mb = basis.modules[m]
        coef, a_hat, b_hat = mb.project_rows(a, b, mb.bases(k, control, seed, m))
        out.a[m], out.b[m], out.coefficients[m] = a_hat, b_hat, coef
        out.error_sq[m], out.norm_sq[m] = delta_error_sq(a, b, a_hat, b_hat)
    return out


def project_adapter(basis: UniversalBasisFile, adapter: LoraAdapter | str | Path, k: int,
                    control: str = "universal", seed: int = 0) -> Projection:
    """Project a PEFT adapter into ``basis``: c = (v - mu) C^T per canonical row (source 001, phases 9-14)."""
    adapter = read_adapter(adapter) if not isinstance(adapter, LoraAdapter) else adapter
    rows = {m: canonicalize(adapter.A[m], adapter.B[m], adapter.scale[m]) for m in adapter.modules}
    return project_rows(basis, rows, k, control, seed)


def save_projection(path: str | Path, projection: Projection, alpha: float | None = None,
                    base_model: str | None = None, metadata: dict | None = None) -> Path:
    """Write a projected adapter as a PEFT LoRA adapter: A = a_hat, B = b_hat^T / (alpha / r), so that
    (alpha / r) B A = dW_hat exactly. ``alpha`` defaults to r (scale 1)."""
    ranks = {a.shape[0] for a in projection.a.values()}
    if len(ranks) != 1:
        raise ZooError(f"projected rows have different ranks per module ({sorted(ranks)}); PEFT needs one rank")
    rank = ranks.pop()
    alpha = float(rank) if alpha is None else alpha
    scale = lora_scale(alpha, rank)
    A = {m: a.float() for m, a in projection.a.items()}
    B = {m: (b.T / scale).float() for m, b in projection.b.items()}
    return save_adapter(path, A, B, rank, alpha, base_model, metadata=metadata)


def leave_out_errors(bank: DeltaBank, ks: Sequence[int], mode: str = "separate", holdout: int = 1,
                     controls: Sequence[str] = ("universal",), seed: int = 0, progress: bool = False) -> dict:
    """Train and holdout reconstruction error vs k by leaving adapters out (source 001, phases 4-8).

    The bank is cut into folds of ``holdout`` adapters; each fold's basis is fitted on the other adapters,
    and every adapter is projected into it at every k: the fold's own adapters give the train error, the
    left-out ones the holdout error. An adapter's error is the relative L2 error of its dW over all
    modules together. k is capped at each basis's rank (the capped k is reported as ``k_effective``).

    Returns ``{control: {k: {"train": [..], "holdout": [..], "k_effective": int}}}`` (lists over
    (fold, adapter) pairs).
    """
    from tqdm.auto import tqdm

    n = len(bank)
    if not 1 <= holdout < n:
        raise ZooError(f"holdout={holdout} adapters per fold needs 1 <= holdout < bank size {n}")
    for c in controls:
        check_choice("control", c, CONTROLS)
    folds = [list(range(i, min(i + holdout, n))) for i in range(0, n, holdout)]
    # sums over modules: [control][k][fold][adapter] -> [error_sq, norm_sq]
    sums = {c: {k: [[[0.0, 0.0] for _ in range(n)] for _ in folds] for k in ks} for c in controls}
    k_eff = {c: {k: 0 for k in ks} for c in controls}
    for m in tqdm(bank.modules, desc="leave-out", unit="module", disable=not progress):
        rows = bank.rows(m)
        for f, held in enumerate(folds):
            train = [i for i in range(n) if i not in held]
            mb = fit_module_basis([rows[i] for i in train], mode)
            for c in controls:
                for k in ks:
                    cap = mb.rank // 2 if c == "secondary" else mb.rank
                    k_use = min(k, cap) if c != "random" else k
                    k_eff[c][k] = max(k_eff[c][k], 0 if c == "mean" else k_use)
                    bases = mb.bases(k_use, c, seed, m)
                    for i in range(n):
                        _, a_hat, b_hat = mb.project_rows(*rows[i], bases)
                        e, d = delta_error_sq(*rows[i], a_hat, b_hat)
                        sums[c][k][f][i][0] += e
                        sums[c][k][f][i][1] += d
    result = {}
    for c in controls:
        result[c] = {}
        for k in ks:
            train, held_err = [], []
            for f, held in enumerate(folds):
                for i in range(n):
                    e, d = sums[c][k][f][i]
                    (held_err if i in held else train).append(math.sqrt(e / max(d, 1e-300)))
            result[c][k] = {"train": train, "holdout": held_err, "k_effective": k_eff[c][k]}
    return result
