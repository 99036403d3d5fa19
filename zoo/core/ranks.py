"""Ranks of low-rank maps under a parameter budget (ZOMBORG, source 000, section 4.1: whole-model baselines at
a parameter ratio): the rank a ratio gives one map, and per-target ranks that spend the budget of a uniform
ratio where the data says it matters (``allocate_ranks`` on weighted spectra, ``allocate_by_gain`` on
measured loss sensitivities; ``zoo.FisherSVD``'s ``allocation``)."""
from __future__ import annotations

import heapq

import torch

from .errors import ZooError


def check_rank(rank: int | float, name: str = "") -> int | float:
    """``rank`` if it can be a rank at all (an int >= 1, or a parameter ratio in (0, 1]): what a spec checks
    when it is made, before any weights load; the bound by the matrix's shape comes in ``resolve_rank``."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ZooError(f"rank must be an int or a parameter-ratio float, got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ZooError(f"rank ratio {rank} for {name or 'layer'} must be in (0, 1]")
    if isinstance(rank, int) and rank < 1:
        raise ZooError(f"rank {rank} for {name or 'every target'} is out of range: it must be at least 1 "
                       "(or a parameter ratio in (0, 1])")
    return rank


def resolve_rank(rank: int | float, out_features: int, in_features: int, name: str = "") -> int:
    """An int rank as given, or a float parameter ratio: r = ratio * in*out / (in + out)."""
    limit = min(in_features, out_features)
    check_rank(rank, name)
    if isinstance(rank, float):
        r = max(1, int(rank * in_features * out_features / (in_features + out_features)))
        return min(r, limit)
    if not 1 <= rank <= limit:
        raise ZooError(
            f"rank {rank} for {name or 'layer'} is out of range: it must be between 1 and "
            f"min(out_features={out_features}, in_features={in_features}) = {limit}"
        )
    return rank


def allocate_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """Per-target ranks under the parameter budget of a uniform ``ratio``, spent where it removes the most
    relative weighted error per parameter.

    Component i of target t removes s_i^2 / sum(s^2) of t's relative weighted error and costs out + in
    parameters; components are taken greedily by that gain per parameter across all targets (each
    target's gains fall with i, so every target keeps a prefix, and the sum of relative errors is
    minimized up to one component). Every target keeps at least rank 1 and at most the rank at which
    the factorization stops saving parameters. The budget is sum_t resolve_rank(ratio) * (out + in), so a
    ``global`` model has the size of the ``uniform`` one.
    """
    budget = sum(resolve_rank(ratio, o, i, n) * (o + i) for n, (o, i) in shapes.items())
    ranks = {n: 1 for n in shapes}
    spent = sum(o + i for o, i in shapes.values())
    gains, owners, costs = [], [], []
    for k, (name, s) in enumerate(spectra.items()):
        out_f, in_f = shapes[name]
        cap = max(1, min(len(s), out_f * in_f // (out_f + in_f)))
        energy = s.double().pow(2)
        gains.append(energy[1:cap] / energy.sum().clamp_min(1e-300) / (out_f + in_f))
        owners.append(torch.full((cap - 1,), k))
        costs.append(out_f + in_f)
    if not gains:
        return ranks
    gain, owner = torch.cat(gains), torch.cat(owners)
    names = list(spectra)
    for j in torch.argsort(gain, descending=True, stable=True).tolist():
        cost = costs[int(owner[j])]
        if spent + cost <= budget:
            ranks[names[int(owner[j])]] += 1
            spent += cost
    return ranks


def allocate_by_gain(gains: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float,
                     floor: float = 0.25) -> dict[str, int]:
    """Per-target ranks under the parameter budget of a uniform ``ratio`` (sum_t resolve_rank(ratio) * (out +
    in)), each target at least ``floor`` times its uniform rank (and 1), at most the rank at which the
    factorization stops saving parameters. The rest of the budget goes greedily to the target whose next
    component holds the most ``gains`` per parameter (a target keeps a prefix of its components, so gains
    need not fall with i). The ranks' parameters never exceed the budget and fall short of it by less than
    the cost of the cheapest target's next component."""
    uniform = {n: resolve_rank(ratio, o, i, n) for n, (o, i) in shapes.items()}
    budget = sum(uniform[n] * (o + i) for n, (o, i) in shapes.items())
    caps = {n: max(1, min(len(gains[n]), o * i // (o + i))) for n, (o, i) in shapes.items()}
    ranks = {n: min(caps[n], max(1, int(floor * uniform[n]))) for n in shapes}
    spent = sum(ranks[n] * (o + i) for n, (o, i) in shapes.items())
    heap = [(-float(gains[n][ranks[n]]) / sum(shapes[n]), n) for n in shapes if ranks[n] < caps[n]]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        cost = sum(shapes[n])
        if spent + cost > budget:
            continue  # this target's next component does not fit; a cheaper one may
        ranks[n] += 1
        spent += cost
        if ranks[n] < caps[n]:
            heapq.heappush(heap, (-float(gains[n][ranks[n]]) / cost, n))
    return ranks
