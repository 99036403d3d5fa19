"""Sizing a recipe on a model without loading it (issue 9, "zoo plan"; source 000, section 2.4: one
model, two views).

``plan_student`` counts what a recipe's student holds, from the model's shapes (a ``meta:`` model:
no storage) and each technique's ``Technique.footprint``: the original parameters of every target,
its replacement's trainable, frozen and rebuilt-buffer tensors, the repair state (the trainable
tensors, as ``save_repair_state`` writes them) and the memory they take.

``estimate_peak_memory`` adds what one repair step needs per GPU. It is an *estimate* of the peak
that ``torch.cuda.max_memory_allocated`` would report (the CUDA context, cuBLAS workspaces and the
allocator's fragmentation come on top: typically 0.5-1 GiB), as the sum of:

- **weights**: every parameter of the model (the teacher's originals stay: the student is the same
  object) and of the replacements, in the model dtype — the load dtype (``dtype``), or bf16 under
  ``bf16-true`` (Lightning casts the model); tensors a technique keeps in fp32 stay fp32. Buffers the
  replacements rebuild (frame rows) are counted too; they are never sharded.
  Under ``fsdp`` the parameters are sharded over the GPUs (shards in the model dtype) and, wrapping one unit per decoder layer, the root unit (embeddings, final norm, LM head) and two
  decoder layers (the one running and the one prefetched) are gathered at a time in FSDP's
  ``param_dtype`` (bf16 under ``bf16-*``, the load dtype under ``32``; on one GPU without a dtype change
  the shard itself serves).
- **training state**: gradients and the two AdamW moments of the trainable tensors, in their own
  dtype (3 x trainable bytes), sharded under ``fsdp``; ``ddp`` adds its gradient buckets (1 x). Under
  ``fsdp`` a wrapped unit that holds a trainable tensor gets a gradient over *all* its parameters
  (FSDP flattens the unit; with ``use_orig_params`` frozen parameters beside trainable ones still cost
  gradient memory): sharded, in the model dtype, plus one unit's unsharded gradient in ``param_dtype``
  during its backward.
- **logits**: teacher and student logits [batch, seq, vocab] in the compute dtype (bf16 under
  ``bf16-*``, else the load dtype) plus d loss / d student logits of the same size, all alive when the
  KL's backward runs (``zoo.core.losses.token_kl``), plus its fp32 working set: four [batch, chunk,
  vocab] fp32 tensors (log-softmaxes of both sides, their difference, the scaled gradient chunk). With
  ``fused_head`` (``DistillationModule``'s default; ``zoo.core.losses.hidden_token_kl``) no full logits
  exist: three [batch, seq, hidden] tensors (both final hidden states, the gradient) in the compute dtype,
  and per chunk both models' [batch, chunk, vocab] logits in the compute dtype plus the four fp32 ones. No
  fp32 [batch, seq, vocab] tensor exists on this path.
- **activations** saved for the student's backward. Nothing below the first replaced layer needs a
  gradient, so autograd records from there upward: in that layer, only what runs after its earliest
  target (nothing after a ``down_proj``); each later layer in full. Per token, a Llama decoder layer
  with frozen weights saves the fp32 inputs of its two RMSNorms (2 x 4 H bytes), the attention
  kernel's q, k, v and output ((2 q_dim + 2 kv_dim) c bytes: a fused SDPA kernel, no [seq, seq]
  matrix, GQA not expanded) and the MLP's gate, up and SiLU outputs (3 I c bytes); the final norm
  saves 4 H bytes. What a replacement saves itself (its rank-r intermediates) is left out. Checked
  against the tensors autograd saves on a CPU model in fp32 (tests/test_plan.py). Under
  ``bf16-mixed`` with fp32 weights (and no FSDP, whose gathered parameters are already bf16),
  autocast's bf16 copies of every weight the recorded layers use are saved for the backward too
  (autocast caches casts of trainable leaves only): 2 bytes per weight of the recorded layers
  (replaced originals excepted) and of the LM head.
- **peak** = weights + training state + activations + max(logits, the backward working set of one
  decoder layer: n (3 I c + 2 x 4 H) bytes for n = batch x seq tokens).

Batch is per GPU (Lightning's ``batch_size`` is per process): DDP and FSDP run ``batch`` sequences on
each GPU. Calibration (``build_student``) is a separate phase with its own, smaller peak (a no-grad
forward and the statistics), not estimated here.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .calibration import stats_bytes
from .errors import ZooError, check_choice
from .technique import Technique, TensorSize

#: Lightning precision -> (model dtype override, compute dtype override); None: the load dtype
PRECISIONS = {
    "bf16-mixed": (None, torch.bfloat16), "bf16-true": (torch.bfloat16, torch.bfloat16),
    "16-mixed": (None, torch.float16), "16-true": (torch.float16, torch.float16),
    "32-true": (None, None), "32": (None, None),
}
STRATEGIES = ("ddp", "fsdp")
#: a decoder layer in a module name; names without one belong to the FSDP root unit (embeddings, head)
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
GIB = 1024**3


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def layer_of(name: str) -> int | None:
    """The decoder-layer index of a module name (``model.layers.14.mlp.down_proj`` -> 14), else None."""
    match = LAYER.search(name + ".")
    return int(match.group(1)) if match else None


@dataclass
class TargetPlan:
    """One replaced module: its original parameters and its replacement's tensors by role."""

    name: str
    part: str
    original: int
    trainable: int
    frozen: int
    buffer: int
    trainable_bytes: int
    frozen_bytes: int
    buffer_bytes: int
    merged: int = 0  # trainable parameters folded into others on export (``TensorSize.exported`` False)

    @property
    def replacement(self) -> int:
        """Parameters of the exported replacement (trainable + frozen, less those merged on export; buffers
        are rebuilt, not parameters)."""
        return self.trainable + self.frozen - self.merged


@dataclass
class StudentPlan:
    model_parameters: int
    model_parameter_bytes: int
    targets: list[TargetPlan]
    notes: list[str] = field(default_factory=list)

    @property
    def original(self) -> int:
        return sum(t.original for t in self.targets)

    @property
    def trainable(self) -> int:
        return sum(t.trainable for t in self.targets)

    @property
    def student_parameters(self) -> int:
        """Parameters of the exported student (originals dropped)."""
        return self.model_parameters - self.original + sum(t.replacement for t in self.targets)

    @property
    def repair_state_bytes(self) -> int:
        return sum(t.trainable_bytes for t in self.targets)


def tensor_bytes(size: TensorSize, model_dtype: torch.dtype) -> int:
    per = {"model": _bytes(model_dtype), "float32": 4, "int64": 8, "uint8": 1}[size.kind]
    return size.numel * per


def footprints(model: nn.Module, parts: list[Technique], resolved: list[list[str]]) -> dict[str, tuple[int, dict]]:
    """{target: (part index, its footprint)} for every target of every part."""
    found = {}
    for i, (part, names) in enumerate(zip(parts, resolved)):
        for name in names:
            found[name] = (i, part.footprint(name, model.get_submodule(name)))
    return found


def plan_student(model: nn.Module, parts: list[Technique], resolved: list[list[str]],
                 model_dtype: torch.dtype) -> StudentPlan:
    """Parameter counts and sizes of the student that ``parts`` make of ``model`` (targets ``resolved``
    per part, as ``DistillationModule.resolve_targets`` gives them), tensors sized in ``model_dtype``."""
    targets = []
    for name, (i, sizes) in footprints(model, parts, resolved).items():
        original = sum(p.numel() for p in model.get_submodule(name).parameters())
        count = {role: sum(s.numel for s in sizes.values() if s.role == role) for role in ("trainable", "frozen", "buffer")}
        nbytes = {role: sum(tensor_bytes(s, model_dtype) for s in sizes.values() if s.role == role)
                  for role in ("trainable", "frozen", "buffer")}
        merged = sum(s.numel for s in sizes.values() if not s.exported and s.role != "buffer")
        targets.append(TargetPlan(name, f"{i}:{type(parts[i]).__name__}", original, count["trainable"],
                                  count["frozen"], count["buffer"], nbytes["trainable"], nbytes["frozen"],
                                  nbytes["buffer"], merged))
    if any(p.trains for p in parts) and not sum(t.trainable for t in targets):
        raise ZooError("the student would have no trainable tensors; check the technique's options")
    notes = [n for n in dict.fromkeys(p.footprint_note() for p in parts) if n]
    n_params = sum(p.numel() for p in model.parameters())
    return StudentPlan(n_params, n_params * _bytes(model_dtype), targets, notes)


@dataclass
class MemoryPlan:
    """Per-GPU peak memory estimate of one repair step, in bytes, by term (see the module docstring)."""

    weights: int
    training_state: int
    activations: int
    logits: int
    backward_working_set: int
    settings: dict

    @property
    def peak(self) -> int:
        return self.weights + self.training_state + self.activations + max(self.logits, self.backward_working_set)

    def to_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak, "peak_gib": round(self.peak / GIB, 2)}


def decoder_dims(config) -> dict[str, int]:
    """Llama-style decoder dimensions from a transformers config, naming what is missing."""
    def get(*keys):
        return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)

    dims = {"hidden": get("hidden_size", "n_embd"), "intermediate": get("intermediate_size"),
            "layers": get("num_hidden_layers", "n_layer"), "heads": get("num_attention_heads"),
            "vocab": get("vocab_size")}
    missing = [k for k, v in dims.items() if v is None]
    if missing:
        raise ZooError(f"the activation estimate assumes a Llama-style decoder; config "
                       f"({getattr(config, 'model_type', '?')}) lacks {', '.join(missing)}")
    dims["kv_heads"] = get("num_key_value_heads") or dims["heads"]
    dims["head_dim"] = get("head_dim") or dims["hidden"] // dims["heads"]
    return dims


def estimate_peak_memory(model: nn.Module, student: StudentPlan, parts: list[Technique],
                         resolved: list[list[str]], *, load_dtype: torch.dtype, batch_size: int, seq_len: int,
                         precision: str = "bf16-mixed", strategy: str = "ddp", devices: int = 1,
                         kl_chunk: int = 256, fused_head: bool = False) -> MemoryPlan:
    """Per-GPU peak memory of one repair step of ``student`` on ``model`` (an estimate; formula in the
    module docstring). ``model`` may be on the meta device; ``student`` must be planned in the model
    dtype this precision implies (``model_dtype``)."""
    check_choice("precision", precision, PRECISIONS)
    check_choice("strategy", strategy, STRATEGIES)
    for what, value in (("batch_size", batch_size), ("seq_len", seq_len), ("devices", devices), ("kl_chunk", kl_chunk)):
        if value < 1:
            raise ZooError(f"{what}={value} must be at least 1")
    model_dtype, compute = precision_dtypes(precision, load_dtype)
    # FSDP gathers in its param_dtype, which Lightning sets to the compute dtype
    c, w = _bytes(compute), _bytes(model_dtype)
    fsdp = strategy == "fsdp"
    d = decoder_dims(model.config)
    n = batch_size * seq_len
    sizes = footprints(model, parts, resolved)

    # -- weights (parameters of model + replacements; rebuilt buffers replicated)
    repl_params = sum(t.trainable_bytes + t.frozen_bytes for t in student.targets)
    buffers = sum(t.buffer_bytes for t in student.targets)
    per_layer = [0] * d["layers"]  # parameters per FSDP unit: decoder layers, and the root
    root = 0
    for name, p in model.named_parameters():
        idx = layer_of(name)
        if idx is None:
            root += p.numel()
        else:
            per_layer[idx] += p.numel()
    for name, (_, fp) in sizes.items():
        extra = sum(s.numel for s in fp.values() if s.role != "buffer")
        idx = layer_of(name)
        if idx is None:
            root += extra
        else:
            per_layer[idx] += extra
    if fsdp:
        # one GPU in the model's own dtype: the "gathered" unit is the shard itself, no copy
        gathered = 0 if devices == 1 and c == w else (root + 2 * max(per_layer)) * c
        weights = (student.model_parameter_bytes + repl_params) / devices + gathered + buffers
    else:
        weights = student.model_parameter_bytes + repl_params + buffers

    # -- gradients + AdamW moments (+ DDP buckets / FSDP flat-unit gradients)
    trainable = student.repair_state_bytes
    if fsdp:
        units = [root if u is None else per_layer[u] for u in {layer_of(name) for name in sizes}]
        unsharded = 0 if devices == 1 and c == w else max(units) * c  # one unit's gradient before reduce-scatter
        state = 2 * trainable / devices + sum(units) * w / devices + unsharded
    else:
        state = 4 * trainable

    # -- activations saved for the student's backward, from the first replaced layer up
    layers = [layer_of(name) for name in sizes]
    first = 0 if any(i is None for i in layers) else min(layers)
    recorded = d["layers"] - first
    q_dim, kv_dim = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    pieces = [2 * 4 * d["hidden"], (2 * q_dim + 2 * kv_dim) * c, 3 * d["intermediate"] * c]
    per_token = sum(pieces)
    if any(i is None for i in layers):
        first_layer = per_token
    else:  # the first replaced layer records only what runs after its earliest target
        first_layer = _after_targets([name for name in sizes if layer_of(name) == first], pieces)
    activations = n * ((recorded - 1) * per_token + first_layer + 4 * d["hidden"])
    if precision.endswith("-mixed") and model_dtype != compute and not fsdp:
        # autocast's copies of the weights the student's recorded forward uses (not the replaced originals)
        lm_head = model.get_output_embeddings()
        head = lm_head.weight.numel() if lm_head is not None else 0
        activations += (sum(per_layer[first:]) - student.original + head) * c

    # -- logits: teacher + student + d loss / d student, and the chunked fp32 KL working set
    chunk = batch_size * min(kl_chunk, seq_len) * d["vocab"]
    if fused_head:
        logits = 3 * n * d["hidden"] * c + chunk * (2 * c + 4 * 4)
    else:
        logits = 3 * n * d["vocab"] * c + chunk * 4 * 4
    working = n * (3 * d["intermediate"] * c + 2 * 4 * d["hidden"])
    settings = {"batch_size": batch_size, "seq_len": seq_len, "precision": precision, "strategy": strategy,
                "devices": devices, "kl_chunk": kl_chunk, "fused_head": fused_head, "load_dtype": str(load_dtype).removeprefix("torch."),
                "model_dtype": str(model_dtype).removeprefix("torch."),
                "compute_dtype": str(compute).removeprefix("torch."), "recorded_layers": recorded,
                "first_recorded_layer": first}
    return MemoryPlan(int(weights), int(state), int(activations), int(logits), int(working), settings)


def _after_targets(names: list[str], pieces: list[int]) -> float:
    """Bytes per token the first replaced layer saves for the backward, given its targets ``names``: what
    runs downstream of the earliest one. In the MLP a * u (a = silu(gate)) saves only the factors whose
    partner needs a gradient: a replaced ``up_proj`` alone records a, a ``gate_proj`` alone g and u.
    A module this does not know counts the whole layer."""
    norms, attention, mlp = pieces
    suffixes = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in names}
    if suffixes & {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}:
        return attention + norms / 2 + mlp
    if "self_attn.o_proj" in suffixes:
        return norms / 2 + mlp
    if {"mlp.gate_proj", "mlp.up_proj"} <= suffixes:
        return mlp
    if "mlp.gate_proj" in suffixes:
        return mlp * 2 / 3
    if "mlp.up_proj" in suffixes:
        return mlp / 3
    if suffixes <= {"mlp.down_proj"}:
        return 0
    return norms + attention + mlp


def precision_dtypes(precision: str, load_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(model dtype, compute dtype) of a Lightning precision for weights loaded in ``load_dtype``."""
    check_choice("precision", precision, PRECISIONS)
    model_dtype, compute = PRECISIONS[precision]
    return model_dtype or load_dtype, compute or model_dtype or load_dtype


@dataclass
class CalibrationPlan:
    """Bytes ``Student.build`` holds at its calibration's peak (source 000, section 2.2; issue 16's bound):

    - **weights**: the model in its load dtype, and the replacements built so far (all of them at the end);
    - **statistics**: every target's fp64 input moments (``once``: all targets at once; ``sequential``: one
      decoder layer's, plus the cross moments with the teacher's inputs, since each layer's are dropped once it is
      built); ``full_cov_max`` decides full matrices or diagonals;
    - **hidden_states** (``sequential``): the teacher's, the student's and the teacher's next stream of one
      depth over every calibration token (``zoo.core.sequential.LayerInputs``), and each batch's rotary
      embeddings and attention mask;
    - **forward**: one batch through one decoder layer without grad (its MLP's three intermediates and a few
      hidden-width tensors).

    Statistics that need the loss's backward (FWSVD's Fisher) run the whole model with grad instead; not
    estimated here.
    """

    calibration: str
    tokens: int
    weights: int
    statistics: int
    hidden_states: int
    forward: int

    @property
    def peak(self) -> int:
        return self.weights + self.statistics + self.hidden_states + self.forward

    def to_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak, "peak_gib": round(self.peak / GIB, 2)}


def estimate_calibration_memory(model: nn.Module, student: StudentPlan, parts: list[Technique],
                                resolved: list[list[str]], calibration: str, tokens: int, batch_size: int,
                                seq_len: int, full_cov_max: int, load_dtype: torch.dtype) -> CalibrationPlan:
    """The ``CalibrationPlan`` of calibrating each part's ``resolved`` targets over ``tokens`` tokens of
    ``batch_size`` x ``seq_len`` batches, the model loaded in ``load_dtype``. Input moments only (of linear
    targets whose part reads them); under ``sequential`` the larger of one layer's and, where a part's
    ``plan`` reads statistics (a rank allocation), the one-pass ones it reads first."""
    d = decoder_dims(model.config)
    c = _bytes(load_dtype)

    def moments(name: str, cross: bool) -> int:
        width = getattr(model.get_submodule(name), "in_features", None)
        if width is None:  # not a linear (an attention block): its statistics are taps, not sized here
            return 0
        full = width <= full_cov_max
        return stats_bytes(width, full) + (8 * (width * width if full else width) if cross else 0)

    reads = [n for part, names in zip(parts, resolved) if "input" in part.needs() for n in names]
    if calibration == "sequential":
        per_layer: dict[int | None, int] = {}
        for n in reads:
            per_layer[layer_of(n)] = per_layer.get(layer_of(n), 0) + moments(n, True)
        planned = sum(moments(n, False) for part, names in zip(parts, resolved) if "input" in part.plan_needs()
                      for n in names)
        statistics = max(max(per_layer.values(), default=0), planned)
        hidden = 3 * tokens * d["hidden"] * c + 2 * tokens * d["head_dim"] * 4 + tokens * seq_len
    else:
        statistics, hidden = sum(moments(n, False) for n in reads), 0
    replaced = sum(t.trainable_bytes + t.frozen_bytes + t.buffer_bytes for t in student.targets)
    forward = batch_size * seq_len * (3 * d["intermediate"] + 6 * d["hidden"]) * c
    return CalibrationPlan(calibration, int(tokens), int(student.model_parameter_bytes + replaced), int(statistics),
                           int(hidden), int(forward))
