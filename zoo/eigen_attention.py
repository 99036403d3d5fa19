"""EigenAttention: attention computed in a k-dimensional eigenspace, with keys and values stored in the
KV cache in k_K / k_V dimensions per KV-head group (TINY_COMPRESS, source 004, "What's
Missing" gaps 1-3 and "Path Forward" options A/C; Saxena et al., "Eigen Attention: Attention in
Low-Rank Space for KV Cache Compression", EMNLP 2024 Findings).

Per attention layer and KV-head group g, with head_dim d and orthonormal projectors from calibration:

- ``U_K[g]`` (d x k_K): top eigenvectors of the uncentered second moment of the group's *rotated*
  (post-RoPE) keys - jointly with its queries by default (``key_basis="queries_keys"``: the sum of the
  trace-normalized key and query second moments, i.e. the PCA of the concatenated query/key
  representations as in Saxena et al.). The cache holds ``k_rot @ U_K`` and every query head of the
  group is projected by the same ``U_K``: scores are ``(q_rot U_K)(k_rot U_K)^T = q_rot^T P k_rot``.
- ``U_V[g]`` (d x k_V): top eigenvectors of the values' second moment. The cache holds ``v @ U_V``;
  attention averages those, and ``@ U_V^T`` maps each head's output back before ``o_proj``.

Uncentered second moments, not covariances: the scores and the outputs need the vectors themselves,
mean included; ``zoo spectrum`` reports the centered spectra.

**RoPE.** Saxena et al. store low-dimensional *pre-RoPE* keys and, for RoPE models, reconstruct full
keys (``k_low U_K^T``) and rotate them before every attention: the cache shrinks, but the scores are
still computed at head_dim over the whole cache, and the reconstruction re-runs on every cached token at
each decode step (with each token's own position). Here keys are projected *after* RoPE, so the cache
holds rotated low-dimensional keys, the queries are rotated and then projected by the same U_K, and the
scores and the value average run at k_K / k_V - the attention latency drops with the cache, positions
need no bookkeeping, and with ``k = head_dim`` it is exactly the original attention (U orthogonal). The
price: RoPE spreads each key over its rotation planes, so post-RoPE spectra are flatter than pre-RoPE
ones (``zoo spectrum`` reports both) and a variance target keeps more dimensions.

k per layer: explicit (``k`` / ``k_keys`` / ``k_values``: an int, or a list with one per target),
by a ``variance`` target (the smallest k whose eigenvalues hold that fraction of the second moment's
trace, the max over the layer's groups), or by an ``error`` threshold: keys - the relative mean-square
error of the attention logits over (query, key) pairs, ``tr((I-P) C_q (I-P) C_k) / tr(C_q C_k)``;
values - the relative reconstruction error ``1 - variance kept``. ``round_to`` rounds k up (GPU
attention kernels prefer multiples of 8).

Supported: the Llama-family attention of transformers (``SUPPORTED_ATTENTION``): grouped-query
attention with q/k/v/o projections and rotary embeddings (Llama 2/3, SmolLM2, Mistral, Qwen2). Other
families end with an error naming these.

``DistillationModule(parts=[EigenAttention(...)])`` trains the projectors by distillation (``trainable_projectors``; everything
else frozen): source 004's "learnable projectors", with the end-to-end KL as the objective.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .core.calibration import ActivationStats
from .core.compat import layer_cache
from .core.errors import ZooError, check_choice
from .core.linalg import rms
from .core.registry import register
from .core.spectrum import block_diagonal, cumulative_variance, eigh_descending, rank_for_variance
from .core.replacement import Replaced, Replacement
from .core.technique import NO_PLAN, Plan, Technique, TensorSize
from .export.modeling_zoo import eigen_attention_forward

log = logging.getLogger(__name__)

#: attention classes EigenAttention replaces (same q/k/v/o + RoPE + GQA structure)
SUPPORTED_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
KEY_BASES = ("queries_keys", "keys")
#: the streams ``attention_tap`` collects; part of the calibration cache key
TAP_VERSION = "eigen_attention/1:queries,keys,values(post-rope)"


def check_supported(name: str, module: nn.Module) -> nn.Module:
    """``module`` if it is an attention block EigenAttention supports, else a ZooError naming the families."""
    inner = module.original if isinstance(module, Replaced) else module
    kind = type(inner).__name__
    if kind not in SUPPORTED_ATTENTION:
        raise ZooError(f"EigenAttention does not support {name} ({kind}); supported attention families: "
                       f"{', '.join(SUPPORTED_ATTENTION)} (the Llama family: grouped-query attention with "
                       "q/k/v/o projections and rotary embeddings)")
    return inner


def _rotary(module: nn.Module):
    """The family's own ``apply_rotary_pos_emb`` (from the module that defines the attention class)."""
    return sys.modules[type(module).__module__].apply_rotary_pos_emb


def attention_streams(module: nn.Module, hidden: torch.Tensor, position_embeddings) -> dict[str, torch.Tensor]:
    """The queries and keys after RoPE, the keys before RoPE and the values of one attention block, as
    [batch, seq, ...] streams for calibration: ``keys``/``keys_pre_rope``/``values`` are [b, s, kv*d]
    (KV-head group g in columns g*d..(g+1)*d); ``queries`` is [b, s, n_rep, kv*d], each query head a
    sample of its group's distribution (head h is in group h // n_rep, as in ``repeat_kv``)."""
    b, s, _ = hidden.shape
    d, n_rep = module.head_dim, module.num_key_value_groups
    q = module.q_proj(hidden).view(b, s, -1, d).transpose(1, 2)
    k = module.k_proj(hidden).view(b, s, -1, d).transpose(1, 2)
    v = module.v_proj(hidden).view(b, s, -1, d)
    cos, sin = position_embeddings
    q_rot, k_rot = _rotary(module)(q, k, cos, sin)
    n_kv = k.shape[1]
    queries = q_rot.view(b, n_kv, n_rep, s, d).permute(0, 3, 2, 1, 4).reshape(b, s, n_rep, n_kv * d)
    return {"queries": queries, "keys": k_rot.transpose(1, 2).reshape(b, s, n_kv * d),
            "keys_pre_rope": k.transpose(1, 2).reshape(b, s, n_kv * d), "values": v.reshape(b, s, n_kv * d)}


def _hidden_and_positions(args, kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    positions = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
    return hidden, positions


def attention_tap(module, args, kwargs, output) -> dict[str, torch.Tensor]:
    """Calibration tap of an attention block: its post-RoPE queries and keys and its values."""
    hidden, positions = _hidden_and_positions(args, kwargs)
    streams = attention_streams(module, hidden, positions)
    return {k: streams[k] for k in ("queries", "keys", "values")}


class EigenAttentionLayer(Replacement):
    """Drop-in forward of a Llama-family attention block whose KV cache holds k_K-dim keys and k_V-dim
    values per KV-head group. Shares (and never changes) the original's projections; the only
    parameters of its own are the projectors ``U_keys`` [kv, d, k_K] and ``U_values`` [kv, d, k_V]."""

    def __init__(self, original: nn.Module, U_keys: torch.Tensor, U_values: torch.Tensor,
                 trainable: bool = True):
        super().__init__()
        self.config = original.config
        self.layer_idx = original.layer_idx
        self.head_dim = original.head_dim
        self.num_key_value_groups = original.num_key_value_groups
        self.scaling = original.scaling
        self.attention_dropout = original.attention_dropout
        self.is_causal = True
        self.sliding_window = getattr(original, "sliding_window", getattr(self.config, "sliding_window", None))
        self.family = type(original).__name__
        self.rotary = _rotary(original)
        # the original's frozen projections, shared: no copy of the weights
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (original.q_proj, original.k_proj, original.v_proj,
                                                              original.o_proj)
        self.num_key_value_heads = U_keys.shape[0]
        for U, what in ((U_keys, "keys"), (U_values, "values")):
            if U.shape[0] != self.num_key_value_heads or U.shape[1] != self.head_dim:
                raise ZooError(f"{what} projector of shape {tuple(U.shape)} does not fit "
                               f"[{self.num_key_value_heads}, head_dim={self.head_dim}, k]")
            if not 1 <= U.shape[2] <= self.head_dim:
                raise ZooError(f"k for {what} = {U.shape[2]} is out of range: it must be between 1 and "
                               f"head_dim = {self.head_dim}")
        self.U_keys = nn.Parameter(U_keys.clone(), requires_grad=trainable)
        self.U_values = nn.Parameter(U_values.clone(), requires_grad=trainable)
        # relative step: an orthonormal d x k projector has entries of RMS 1/sqrt(d)
        self.lr_scales = {n: rms(p) for n, p in self.named_parameters(recurse=False)}

    @property
    def k_keys(self) -> int:
        return self.U_keys.shape[2]

    @property
    def k_values(self) -> int:
        return self.U_values.shape[2]

    def kv_bytes_per_token(self, element_size: int) -> tuple[int, int]:
        """(this layer's KV-cache bytes per token, the original's) at ``element_size`` bytes per number."""
        kv = self.num_key_value_heads
        return kv * (self.k_keys + self.k_values) * element_size, kv * 2 * self.head_dim * element_size

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        # one implementation for the zoo and the exported model (``zoo.export.modeling_zoo``)
        return eigen_attention_forward(self, hidden_states, position_embeddings, attention_mask,
                                       layer_cache(cache, past_key_values), **kwargs)

    def export_spec(self) -> dict:
        """The block's own projections (stored as they are) and the two projectors."""
        tensors = {f"{p}.{t}": "model" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                   for t, v in getattr(self, p).named_parameters()}
        return {"module": "attention", "program": [], "tensors": tensors | {"U_keys": "model", "U_values": "model"},
                "ranks": {"k_keys": self.k_keys, "k_values": self.k_values}}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{p}.{t}": v for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                   for t, v in getattr(self, p).named_parameters()}
        return tensors | {"U_keys": self.U_keys, "U_values": self.U_values}

    def extra_repr(self) -> str:
        return (f"family={self.family}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"k_keys={self.k_keys}, k_values={self.k_values}")


def kv_cache_report(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, float]:
    """KV-cache bytes per token of ``model`` as it runs now, against the same model with the original
    attention everywhere (``dtype``: the cache's dtype; default the model's)."""
    dtype = dtype or next(model.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    compressed = original = 0
    n_eigen = 0
    for name, module in model.named_modules():
        if name.endswith((".original", ".replacement")):
            continue
        layer = module
        if isinstance(module, Replaced):
            layer = module.original if module.use_original else module.replacement
        if isinstance(layer, EigenAttentionLayer):
            c, o = layer.kv_bytes_per_token(size)
            n_eigen += 1
        elif type(layer).__name__.endswith("Attention") and hasattr(layer, "k_proj"):
            o = 2 * layer.k_proj.out_features * size
            c = o
        else:
            continue
        compressed += c
        original += o
    return {"kv_cache_bytes_per_token": compressed, "kv_cache_bytes_per_token_original": original,
            "kv_cache_ratio": compressed / original if original else 1.0, "eigen_attention_layers": n_eigen}


def cache_bytes(cache) -> int:
    """Bytes the key and value tensors of a transformers ``Cache`` hold now (measured, not computed)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


# ---- projectors and k from calibration ----------------------------------------------------------------


def score_error_curve(basis: torch.Tensor, c_queries: torch.Tensor, c_keys: torch.Tensor) -> torch.Tensor:
    """Relative mean-square logit error ``tr((I-P) Cq (I-P) Ck) / tr(Cq Ck)`` for P = the first k columns
    of ``basis`` (orthonormal, d x d), for k = 0..d: entry k. Exact for (query, key) pairs drawn
    independently from their calibration distributions."""
    A = basis.T @ c_queries.double() @ basis
    B = basis.T @ c_keys.double() @ basis
    E = A * B  # (I-P) keeps the trailing coordinates T: the error is the sum of E over T x T
    tail = E.flip(0).flip(1).cumsum(0).cumsum(1).flip(0).flip(1)  # tail[k, k] = sum of E[k:, k:]
    total = float((c_queries.double() * c_keys.double()).sum())
    errors = torch.cat([tail.diagonal(), torch.zeros(1, dtype=tail.dtype)])
    return errors / total if total > 0 else errors


def group_second_moments(stats: dict[str, ActivationStats], name: str, n_groups: int) -> dict[str, list[torch.Tensor]]:
    """Per-KV-group uncentered second moments of the tapped ``queries``, ``keys`` and ``values`` of ``name``."""
    out = {}
    for stream in ("queries", "keys", "values"):
        s = stats.get(f"{name}:{stream}")
        if s is None or s.second_moment is None:
            raise ZooError(f"EigenAttention needs the full second moment of {name}:{stream} from calibration; "
                           "raise full_cov_max to at least num_key_value_heads * head_dim")
        out[stream] = block_diagonal(s.second_moment, n_groups)
    return out


def _per_target(value, index: int, n: int, what: str):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ZooError(f"{what} has {len(value)} entries but the spec has {n} targets; give one per target "
                           "or a single int")
        return value[index]
    return value


@register("eigen_attention", version=1)
@dataclass(eq=False, repr=False)
class EigenAttention(Technique):
    """Spec: replace each target attention block by an ``EigenAttentionLayer`` with PCA projectors.

    Args:
        targets: attention-module patterns, e.g. ``model.layers.*.self_attn`` or
            ``model.layers.{10..20}.self_attn``.
        variance: fraction of the second moment's trace that k keeps (per KV group; the layer takes the max
            over its groups). Default 0.95 when neither ``k``/``k_keys``/``k_values`` nor ``error`` is given.
        error: relative error threshold instead: keys - mean-square logit error, values - reconstruction
            error (see the module docstring).
        k: k_K = k_V for every target (an int, or a list with one per target in model order).
        k_keys: k_K alone (overrides ``k``); int or list.
        k_values: k_V alone (overrides ``k``); int or list.
        key_basis: ``queries_keys`` (joint PCA of rotated queries and keys, as in Saxena et al.) or ``keys``.
        round_to: round each k up to a multiple of this (capped at head_dim).
        trainable_projectors: the projectors train in repair (else the student has nothing to train).
    """

    target_kind = "attention"
    tap = staticmethod(attention_tap)
    tap_version = TAP_VERSION

    targets: str | list[str] = "model.layers.*.self_attn"
    variance: float | None = None
    error: float | None = None
    k: int | list[int] | None = None
    k_keys: int | list[int] | None = None
    k_values: int | list[int] | None = None
    key_basis: str = "queries_keys"
    round_to: int = 1
    trainable_projectors: bool = True

    def __post_init__(self):
        super().__post_init__()
        variance, error = self.variance, self.error
        if variance is not None and error is not None:
            raise ZooError("give a variance target or an error threshold, not both")
        if variance is not None and not 0 < variance <= 1:
            raise ZooError(f"variance target must be in (0, 1], got {variance}")
        if error is not None and not 0 <= error < 1:
            raise ZooError(f"error threshold must be in [0, 1), got {error}")
        if self.round_to < 1:
            raise ZooError(f"round_to must be at least 1, got {self.round_to}")
        for what, value in (("k", self.k), ("k_keys", self.k_keys), ("k_values", self.k_values)):
            for x in value if isinstance(value, (list, tuple)) else [value]:
                if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
                    raise ZooError(f"{what} must be a positive int (or a list of them), got {x!r}")
        self._explicit = any(x is not None for x in (self.k, self.k_keys, self.k_values))
        if variance is None and error is None and not (self.k_keys is not None and self.k_values is not None
                                                        or self.k is not None):
            self._threshold = ("variance", 0.95)
        else:
            self._threshold = ("error", error) if error is not None else ("variance", variance)
        check_choice("key basis", self.key_basis, KEY_BASES)

    def needs(self) -> set[str]:
        return {"taps"}

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        """The projectors U_keys [kv, d, k_K] and U_values [kv, d, k_V] (trainable unless frozen) and the
        original's q/k/v/o projections, shared (frozen). Where a variance or error threshold picks k, the
        data decides it: sized at head_dim, an upper bound (``footprint_note``)."""
        attn = check_supported(name, module)
        d, n_kv = attn.head_dim, attn.k_proj.out_features // attn.head_dim

        def k_of(value):  # a per-target list is sized at its largest entry (footprint sees one target)
            value = max(value) if isinstance(value, (list, tuple)) else value
            return d if value is None else min(value, d)

        kk = k_of(self.k_keys if self.k_keys is not None else self.k)
        kv = k_of(self.k_values if self.k_values is not None else self.k)
        role = "trainable" if self.trainable_projectors else "frozen"
        sizes = {"U_keys": TensorSize((n_kv, d, kk), role), "U_values": TensorSize((n_kv, d, kv), role)}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(attn, proj)
            sizes[f"{proj}.weight"] = TensorSize((linear.out_features, linear.in_features), "frozen")
            if getattr(linear, "bias", None) is not None:
                sizes[f"{proj}.bias"] = TensorSize((linear.out_features,), "frozen")
        return sizes

    def footprint_note(self) -> str | None:
        if self._explicit and not any(isinstance(v, (list, tuple)) for v in (self.k, self.k_keys, self.k_values)):
            return None
        return ("EigenAttention with a variance/error threshold or a per-layer k list: the projectors are sized "
                "at head_dim or the list's largest k (an upper bound)")

    def resolve(self, model: nn.Module) -> list[str]:
        names = super().resolve(model)
        for n in names:
            check_supported(n, model.get_submodule(n))
        return names

    def _round(self, k: int, d: int) -> int:
        return min(d, -(-k // self.round_to) * self.round_to)

    def _choose(self, kind: str, eigs: list[torch.Tensor], errs: list[torch.Tensor]) -> int:
        """The smallest k meeting the threshold in every KV group of a layer."""
        mode, value = self._threshold
        if mode == "variance":
            return max(rank_for_variance(e, value) for e in eigs)
        if kind == "values":  # reconstruction error = 1 - variance kept
            return max(int(torch.nonzero(1 - cumulative_variance(e) <= value + 1e-12)[0]) + 1 for e in eigs)
        return max(max(1, int(torch.nonzero(err <= value + 1e-12)[0])) for err in errs)

    def plan(self, modules: dict[str, nn.Module], stats: dict[str, ActivationStats]) -> Plan:
        """Projectors and (k_K, k_V) of every target from the tapped second moments: {target: dict}."""
        planned = {}
        n = len(modules)
        for index, (name, module) in enumerate(modules.items()):
            attn = check_supported(name, module)
            d, n_kv = attn.head_dim, attn.k_proj.out_features // attn.head_dim
            moments = group_second_moments(stats, name, n_kv)
            U_k, U_v, eig_k, eig_v, err_k = [], [], [], [], []
            for g in range(n_kv):
                Cq, Ck, Cv = moments["queries"][g], moments["keys"][g], moments["values"][g]
                M = Ck if self.key_basis == "keys" else (Ck / Ck.trace().clamp_min(1e-300)
                                                         + Cq / Cq.trace().clamp_min(1e-300))
                vals, vecs = eigh_descending(M)
                U_k.append(vecs)
                eig_k.append(vals)
                err_k.append(score_error_curve(vecs, Cq, Ck))
                vals, vecs = eigh_descending(Cv)
                U_v.append(vecs)
                eig_v.append(vals)
            kk = _per_target(self.k_keys if self.k_keys is not None else self.k, index, n, "k_keys")
            kv = _per_target(self.k_values if self.k_values is not None else self.k, index, n, "k_values")
            for what, value in (("k_keys", kk), ("k_values", kv)):
                if value is not None and value > d:
                    raise ZooError(f"{what}={value} for {name} is above head_dim={d}; k must be between 1 and {d}")
            kk = kk if kk is not None else self._round(self._choose("keys", eig_k, err_k), d)
            kv = kv if kv is not None else self._round(self._choose("values", eig_v, []), d)
            planned[name] = {
                "U_keys": torch.stack([u[:, :kk] for u in U_k]), "U_values": torch.stack([u[:, :kv] for u in U_v]),
                "k_keys": kk, "k_values": kv,
                "variance_keys": min(float(cumulative_variance(e)[kk - 1]) for e in eig_k),
                "variance_values": min(float(cumulative_variance(e)[kv - 1]) for e in eig_v),
                "logit_error": max(float(e[kk]) for e in err_k),
            }
        if planned:
            ks = [(p["k_keys"], p["k_values"]) for p in planned.values()]
            log.info("EigenAttention over %d layers: k_K %d..%d, k_V %d..%d (head_dim %d)", len(ks),
                     min(k for k, _ in ks), max(k for k, _ in ks), min(v for _, v in ks), max(v for _, v in ks), d)
        return Plan(planned)

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None,
              plan: Plan = NO_PLAN) -> EigenAttentionLayer:
        p = plan.require(name, self)
        attn = check_supported(name, module)
        dtype, device = attn.k_proj.weight.dtype, attn.k_proj.weight.device
        return EigenAttentionLayer(attn, p["U_keys"].to(device, dtype), p["U_values"].to(device, dtype),
                                   self.trainable_projectors)

    def report(self, model: nn.Module) -> dict[str, float]:
        report = kv_cache_report(model)
        log.info("KV cache: %d bytes/token vs %d for the original attention (%.1f%%)",
                 report["kv_cache_bytes_per_token"], report["kv_cache_bytes_per_token_original"],
                 100 * report["kv_cache_ratio"])
        return report
