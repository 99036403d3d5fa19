"""Calibration: activation statistics of the targets, collected once and cached (ZOMBORG, source 000,
section 2.2: the covariance/Fisher weights of the projection).

For each target, ``collect`` accumulates over the real (attention-masked) tokens of a calibration
loader: the token count, the input mean, and the uncentered input second moment E[x x^T] — the full
matrix when ``in_features <= full_cov_max``, else only its diagonal E[x_i^2]. Sums are kept in fp64.

``taps`` generalize what is collected beyond a linear target's input: a tap is a function of one
module's forward, ``tap(module, args, kwargs, output) -> {stream: tensor [batch, seq, ..., width]}``;
each stream's statistics are stored as ``"<module>:<stream>"`` (any leading dimensions after
[batch, seq] count as further samples, e.g. the query heads of one KV-head group). A stream may be a
pair ``(tensor, keep)`` with ``keep`` a [batch, seq] bool mask that further restricts the tokens. The output of a
linear module is ``output_tap``; EigenAttention taps the rotated queries and keys of an attention block.

Statistics beyond the input moments come from **collectors** (``zoo.core.collectors``: ``Collector``, ``register_collector``): a
named statistic with its own hooks and fp64 sums, which a technique asks for by name in ``needs()``: e.g. the
row Fisher of FWSVD (``fisher``, in ``zoo.core.lowrank``) or ``zoo.kfac``'s output-gradient covariance, each
registered where it is defined; ``build`` finds its tensors in ``stats.extra["<collector>.<key>"]``.

Statistics are cached (``zoo.core.cache``: checked on every read) keyed by (model id, targets, data
fingerprint, token budget, options), so a second run — or ``zoo validate`` rebuilding a student — reuses them.

Under a distributed strategy (``distributed=True``) each process collects on its share of the batches
(batch i goes to rank i mod world) and the fp64 sums are all-reduced before normalizing, so every
process gets the statistics a single process computes over the same batches (to float rounding).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .cache import Entry
from .collectors import COLLECTORS, Collector, _rows, register_collector  # noqa: F401 - re-exported
from .distributed import all_reduce_sum_, rank_world
from .errors import ZooError
from .surgery import teacher_view

log = logging.getLogger(__name__)


@dataclass
class ActivationStats:
    """Statistics of one target's inputs, and of its named collectors (``extra``)."""

    count: int
    mean: torch.Tensor  # [in] fp64
    diag: torch.Tensor  # [in] fp64, E[x_i^2]
    second_moment: torch.Tensor | None = None  # [in, in] fp64, E[x x^T]; None above full_cov_max
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def fisher_rows(self) -> torch.Tensor | None:
        """[out] fp64, the ``fisher`` collector's summed squared gradients per weight row, if collected."""
        return self.extra.get("fisher.rows")

    def covariance(self) -> torch.Tensor | None:
        """Centered covariance E[x x^T] - mu mu^T, when the full second moment is available."""
        if self.second_moment is None:
            return None
        return self.second_moment - torch.outer(self.mean, self.mean)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64), f"{prefix}.mean": self.mean,
               f"{prefix}.diag": self.diag}
        if self.second_moment is not None:
            out[f"{prefix}.second_moment"] = self.second_moment
        for k, v in self.extra.items():
            out[f"{prefix}.extra.{k}"] = v
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "ActivationStats":
        extra_prefix = f"{prefix}.extra."
        extra = {k[len(extra_prefix):]: v for k, v in tensors.items() if k.startswith(extra_prefix)}
        if f"{prefix}.fisher_rows" in tensors:  # cache entries written when the row Fisher was a field of its own
            extra["fisher.rows"] = tensors[f"{prefix}.fisher_rows"]
        return cls(
            count=int(tensors[f"{prefix}.count"][0]),
            mean=tensors[f"{prefix}.mean"],
            diag=tensors[f"{prefix}.diag"],
            second_moment=tensors.get(f"{prefix}.second_moment"),
            extra=extra,
        )


class _Accumulator:
    """fp64 running sums on ``device``: the device of the activations when ``collect`` finds room
    there, so no batch copies its sums to the host (a copy per batch and target synchronizes the
    device every time; issue 9, "Speed": calibration throughput). ``result`` moves them to the CPU."""

    def __init__(self, in_features: int, full: bool, device: torch.device | str = "cpu"):
        self.in_features, self.full = in_features, full
        self.count = 0
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if full else None

    @staticmethod
    def nbytes(in_features: int, full: bool) -> int:
        return 8 * (2 * in_features + (in_features**2 if full else 0))

    def add(self, x: torch.Tensor) -> None:
        self.add_products(self.products(x))

    def products(self, x: torch.Tensor) -> tuple:
        """This batch's rows' count, sum, sum of squares and (full) gram, on the rows' device."""
        x = x.detach().float()
        return x.shape[0], x.sum(0), x.pow(2).sum(0), (x.T @ x) if self.gram is not None else None

    def add_products(self, products: tuple) -> None:
        count, total, sq, gram = products
        home = self.sum.device
        self.count += count
        self.sum += total.to(home)
        self.sq += sq.to(home)
        if self.gram is not None:
            self.gram += gram.to(home)

    def all_reduce(self) -> None:
        """Sum the running sums of every process (they are plain sums, so the order does not matter)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64)
        for t in (count, self.sum, self.sq, self.gram):
            if t is not None:
                all_reduce_sum_(t)
        self.count = int(count.item())

    def result(self) -> ActivationStats:
        n = max(self.count, 1)
        return ActivationStats(
            count=self.count,
            mean=self.sum.cpu() / n,
            diag=self.sq.cpu() / n,
            second_moment=None if self.gram is None else self.gram.cpu() / n,
        )




def stats_to_tensors(stats: dict[str, ActivationStats]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, extra) of ``stats`` for a cache entry (``zoo.core.cache``)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, s in stats.items():
        tensors.update(s.to_tensors(name))
    return tensors, {"targets": list(stats)}


def stats_from_tensors(tensors: dict[str, torch.Tensor], extra: dict) -> dict[str, ActivationStats]:
    return {name: ActivationStats.from_tensors(tensors, name) for name in extra["targets"]}


def cached_stats(entry: Entry, compute: Callable[[], dict[str, ActivationStats]],
                 store: bool = True) -> dict[str, ActivationStats]:
    """The statistics of cache ``entry``, or ``compute()``'s (stored when ``store``)."""
    return stats_from_tensors(*entry.get(lambda: stats_to_tensors(compute()), store=store))


def stats_bytes(in_features: int, full: bool) -> int:
    """Bytes of one target's statistics (fp64 mean and second moment, full or diagonal)."""
    return _Accumulator.nbytes(in_features, full)


def _copied_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """fp32 rows that are not a view of ``x`` (kept until the student's pass, after ``x`` may have changed)."""
    rows = _rows(x, mask).detach().float()
    return rows.clone() if rows.data_ptr() == x.data_ptr() else rows


def _real_tokens(loader) -> int | None:
    """The loader's real tokens, where its dataset says (packed data: every token is real), for a bar's total."""
    mask = getattr(getattr(loader, "dataset", None), "attention_mask", None)
    return int(mask.sum()) if torch.is_tensor(mask) else None


def output_tap(module, args, kwargs, output) -> dict[str, torch.Tensor]:
    """The tap of a module's output (e.g. ``k_proj``'s keys before RoPE): stream ``output``."""
    return {"output": output[0] if isinstance(output, tuple) else output}


@torch.no_grad()
def _forward(model, batch, last_logit_only: bool = False):
    """The statistics come from hooks; the model's logits are not used. ``last_logit_only`` asks a
    transformers causal LM for the last position's logits only (``logits_to_keep=1``), which skips
    almost all of the LM head's matmul and its [batch, seq, vocab] output."""
    extra = {"logits_to_keep": 1} if last_logit_only else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **extra)


def device_room(device: torch.device) -> float:
    """Bytes of fp64 sums ``collect`` keeps on ``device``: all of them on the CPU; on a GPU a quarter
    of its free memory (the rest stays for the forward), the sums beyond it on the CPU."""
    if device.type == "cpu":
        return float("inf")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 4
    return 0.0  # e.g. mps: no fp64


def _head_skippable(model: nn.Module, hooked: list[str]) -> bool:
    """Whether ``model`` takes ``logits_to_keep`` and no hooked module is (or is inside) its LM head."""
    import inspect

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if head is None or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return False
    return all(not any(m is head for m in model.get_submodule(n).modules()) and
               not any(m is model.get_submodule(n) for m in head.modules()) for n in hooked)


def collect(
    model: nn.Module,
    loader,
    targets: list[str],
    full_cov_max: int = 8192,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    distributed: bool = False,
    taps: dict[str, Callable] | None = None,
    collectors: dict[str, list[str]] | None = None,
    cross: bool = False,
    forward: Callable[[dict, bool], None] | None = None,
) -> dict[str, ActivationStats]:
    """Statistics of the inputs of each module in ``targets`` over the real tokens of ``loader``.

    Batches are dicts with ``input_ids`` and ``attention_mask``. Stops after ``max_tokens`` real
    tokens (whole batches). With ``distributed`` and a process group, every process must call this with the same loader:
    each runs the model on batches ``i % world == rank`` only, the token budget counts every
    process's batches, and the sums are all-reduced (the collectors' sums too).
    ``taps`` maps module names to tap functions (see the module docstring); their streams come back
    as ``"<module>:<stream>"``, the full second moment when a stream is at most ``full_cov_max`` wide.
    ``collectors`` maps registered collector names (``COLLECTORS``) to the targets they run on (each also
    in ``targets``); one whose stream is the loss's gradient runs a backward pass per batch.
    ``cross``: each batch also runs in the teacher view first (``zoo.core.surgery.teacher_view``: every
    replaced module as its original) and every target accumulates E[x_teacher x^T] against its input x in
    the model as it is (``extra["cross.second_moment"]``, or ``"cross.diag"`` above ``full_cov_max``): what
    a refit onto the teacher's outputs needs when replaced layers below change the target's inputs.
    ``forward(batch, teacher)``: runs a batch in place of the model (``zoo.core.sequential.LayerInputs``
    runs one decoder layer on cached hidden states), ``teacher=True`` for the teacher-view pass of ``cross``;
    forward-only collectors then.
    """
    taps = dict(taps or {})
    wanted = {k: list(v) for k, v in (collectors or {}).items()}
    unknown = sorted(set(wanted) - set(COLLECTORS))
    if unknown:
        raise ZooError(f"unknown calibration collector(s) {unknown}; registered: {sorted(COLLECTORS)}")
    if not targets and not taps:
        return {}
    if forward is not None and any(COLLECTORS[k].stream != "input" for k in wanted):
        raise ZooError(f"collectors {sorted(wanted)} need more than the targets' inputs (the loss's backward), "
                       "which a layer-by-layer forward does not have")
    rank, world = rank_world() if distributed else (0, 1)
    if world > 1 and hasattr(loader, "__len__") and len(loader) < world:
        # every process must run a batch: taps create their accumulators at first use
        raise ZooError(f"calibration over {world} processes needs at least {world} batches, got {len(loader)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    modules = {name: model.get_submodule(name) for name in targets}
    room = [device_room(device)]

    def new_acc(width: int) -> _Accumulator:
        full = width <= full_cov_max
        size = _Accumulator.nbytes(width, full)
        home = device if size <= room[0] else torch.device("cpu")
        room[0] -= size if home == device else 0
        return _Accumulator(width, full, home)

    accs = {name: new_acc(m.in_features) for name, m in modules.items()}
    current_mask: list[torch.Tensor | None] = [None]

    # the last stream a target's hook saw, with what was computed from it: q, k and v (gate and up) read one
    # tensor, whose products are then computed once (the memo holds the tensor, so its id is not reused)
    memo: dict[str, tuple] = {}

    def once(kind: str, key: tuple, compute: Callable):
        if kind in memo and len(memo[kind][0]) == len(key) and all(a is b for a, b in zip(memo[kind][0], key)):
            return memo[kind][1]
        memo[kind] = (key, compute())
        return memo[kind][1]

    def add(key, x):
        mask = current_mask[0]
        if isinstance(x, tuple):  # (stream, tokens to keep)
            x, keep = x
            keep = keep.to(x.device).bool().expand(x.shape[:2])
            mask = keep if mask is None else mask & keep
        if key not in accs:  # a tap's width is known at its first call
            accs[key] = new_acc(x.shape[-1])
        acc = accs[key]
        acc.add_products(once(f"products{acc.gram is not None}", (x, mask), lambda: acc.products(_rows(x, mask))))

    teacher_rows: dict[str, torch.Tensor] = {}  # this batch's teacher-view inputs (``cross``)
    crosses: dict[str, torch.Tensor] = {}
    in_teacher_pass = [False]

    def make_hook(name):
        def hook(_module, args, _kwargs=None):
            x, mask = args[0], current_mask[0]
            if in_teacher_pass[0]:
                teacher_rows[name] = once("teacher", (x, mask), lambda: _copied_rows(x, mask))
                return
            add(name, x)
            if cross:
                x_t = teacher_rows.pop(name)
                full = accs[name].gram is not None

                def product():
                    x_s = _rows(x, mask).detach().float()
                    return x_t.T @ x_s if full else (x_t * x_s).sum(0)

                update = once(f"cross{full}", (x, mask, x_t), product)
                if name not in crosses:
                    crosses[name] = torch.zeros(update.shape, dtype=torch.float64, device=accs[name].sum.device)
                crosses[name] += update.to(crosses[name].device)

        return hook

    def make_tap(name, tap):
        def hook(module, args, kwargs, output):
            for stream, x in tap(module, args, kwargs, output).items():
                add(f"{name}:{stream}", x)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    handles += [model.get_submodule(n).register_forward_hook(make_tap(n, t), with_kwargs=True) for n, t in taps.items()]
    extras = {(kind, name): COLLECTORS[kind](modules[name], accs[name].sum.device)
              for kind in sorted(wanted) for name in wanted[kind]}
    handles += [h for c in extras.values() for h in c.attach()]
    weights = {name: modules[name].weight for (kind, name), c in extras.items() if c.backward}
    skip_head = _head_skippable(model, [*targets, *taps])
    seen = 0
    available = _real_tokens(loader)
    total = min(x for x in (max_tokens, available) if x is not None) if (max_tokens or available) else None
    bar = tqdm(total=total, desc="calibration", unit="tok", disable=not progress or rank != 0)
    try:
        for i, batch in enumerate(loader):
            mask = batch.get("attention_mask")
            n = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            if i % world == rank:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                mask = batch.get("attention_mask")
                current_mask[0] = mask.bool() if mask is not None else None
                for c in extras.values():
                    c.mask = current_mask[0]
                if cross:
                    in_teacher_pass[0] = True
                    for c in extras.values():
                        c.paused = True
                    try:
                        if forward is not None:
                            forward(batch, True)
                        else:
                            with teacher_view(model):
                                _forward(model, batch, skip_head)
                    finally:
                        in_teacher_pass[0] = False
                        for c in extras.values():
                            c.paused = False
                if weights:
                    _backward_step(model, batch, weights, [c for c in extras.values() if c.backward])
                elif forward is not None:
                    forward(batch, False)
                else:
                    _forward(model, batch, skip_head)
            seen += n
            bar.update(n)
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        bar.close()
    if seen == 0:
        raise ZooError("the calibration loader produced no tokens")
    if world > 1:
        for key in sorted(accs):  # the same order on every process
            accs[key].all_reduce()
        for key in sorted(extras):
            for t in extras[key].sums():
                all_reduce_sum_(t)
        for key in sorted(crosses):
            all_reduce_sum_(crosses[key])
    stats = {name: acc.result() for name, acc in accs.items()}
    for name, total in crosses.items():
        key = "cross.second_moment" if total.dim() == 2 else "cross.diag"
        stats[name].extra[key] = total.cpu() / max(stats[name].count, 1)
    for (kind, name), c in extras.items():
        for key, value in c.result().items():
            stats[name].extra[f"{kind}.{key}"] = value
    return stats


def _backward_step(model, batch, weights: dict[str, nn.Parameter], collectors: list[Collector]) -> None:
    """One forward and backward of the mean next-token loss with ``weights`` requiring grad; then each
    collector reads what the pass left (gradients, or what its hooks saw)."""
    flags = {name: w.requires_grad for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            labels = batch["input_ids"][:, 1:]
            mask = batch.get("attention_mask")
            valid = mask[:, 1:].bool() if mask is not None else torch.ones_like(labels, dtype=torch.bool)
            loss = F.cross_entropy(logits[:, :-1][valid].float(), labels[valid])
            loss.backward()
        for c in collectors:
            c.after_backward()
    finally:
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(flags[name])


def conditioning(stats: dict[str, ActivationStats], rtol: float = 1e-6) -> dict[str, tuple[int, int]]:
    """{target: (effective rank, width)} of every full input second moment: the eigenvalues above ``rtol``
    times the mean one (below that they are the fp32 batch products' noise), and at most the number of
    tokens: the moment of 12 tokens has rank 12, and its 13th eigenvalue, at 1.4e-6 x the mean, is noise.
    (A floor relative to the largest eigenvalue would count the real model's massive-activation inputs as
    rank 20 of 1536.) Fewer than the width means the calibration tokens did not span the inputs (too few
    tokens for a full covariance): whitening then leans on jitter."""
    out, seen = {}, []  # q, k and v (gate and up) share one input: its eigenvalues are computed once
    for name, s in stats.items():
        if s.second_moment is not None and ":" not in name:
            moment = s.second_moment
            same = next((r for m, r in seen if m.shape == moment.shape and torch.equal(m, moment)), None)
            if same is None:
                eig = torch.linalg.eigvalsh(moment.double())
                rank = int((eig > rtol * eig.mean().clamp_min(1e-300)).sum())
                same = (min(rank, s.count), len(eig))
                seen.append((moment, same))
            out[name] = same
    return out
