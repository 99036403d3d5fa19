"""A zoo-compressed causal LM for transformers' ``trust_remote_code`` loading (issue 15): torch and
transformers only, so an exported directory loads where the zoo is not installed.

``zoo export`` copies this file into the export directory as ``modeling_zoo.py``, with ``BASE`` set to
the teacher's model class. ``config.json`` names ``ZooForCausalLM`` in ``auto_map`` and carries a ``zoo``
block; for each replaced module the block holds a small *program* over the primitive ops below and the
shapes of the tensors it reads. ``ZooForCausalLM.__init__`` builds the teacher's architecture, swaps each
listed module for a ``ZooLinear`` (or ``ZooEigenAttention``) running that program, and transformers then
loads ``model.safetensors`` into it as into any model. ``zoo.from_pretrained`` imports this same file.

Each zoo replacement describes itself in these ops (its ``export_spec``): a new technique exports by
writing its program, not by editing this file. The ops mirror the replacements' own forwards operation
by operation (matmuls in the input dtype, fp32 diagonal scales), so the numbers match the in-zoo student.

The program is the export's description; what runs is its fused form (issue 26): after the weights load,
``fuse_model`` rewrites each program by ``fuse_zoo.fuse_program`` (affine runs folded into the fewest matmuls,
e.g. a low-rank map with sigma folded into a factor: two matmul calls, no per-call walk, cast or fp32
round trip) and folds EigenAttention's value projector into v_proj and o_proj. Other ops (PHD's
gather/Hadamard/scatter around the fused core, ``qmatmul``, ``topk_relu``) run through ``run`` below. The rewritten
programs replace the config's, so ``save_pretrained`` of a fused model writes an export of what runs.

``pack_model`` (``from_pretrained(..., zoo_onednn=True)``) makes every matmul with ``nn.Linear``'s layout (the fused
factors, and the teacher's own ``nn.Linear``s left in place, lm_head among them) run oneDNN's linear on a copy of
its weight reordered once, in inference on a CPU. It applies to any model, so a dense teacher is measured the same
way; the copies double the weights' memory.

A program is a list of ops applied in turn to x [..., in]; each op is a dict with ``op`` and:

- ``matmul`` ``t`` [, ``transpose``]: x @ T (x @ T^T), T cast to x's dtype
- ``scale`` ``t``: (x.float() * T.float()).to(x.dtype), a per-channel scale in fp32
- ``mul`` ``value``: x * value (a scalar, e.g. LoRA's alpha / r)
- ``add`` ``t`` [, ``alpha``]: x + alpha * T (a bias, or -center)
- ``gather`` ``t``: x[..., T] (T int64); ``scatter`` ``t`` ``size``: zeros [..., size] with x at columns T
- ``pad`` ``size``: zero-pad the last dimension to ``size``; ``slice`` ``size``: keep its first ``size``
- ``hadamard`` ``block``: x @ blockdiag(H_b, ...) with H_b the normalized Sylvester-Hadamard matrix
  (rebuilt, never stored: it is fixed by b)
- ``topk_relu`` ``k``: the k largest entries of relu(x) per token, the rest zero
- ``sum`` ``branches``: the sum of several programs applied to the same x
- ``qmatmul`` ``t`` ``bits`` ``group`` ``in`` ``symmetric``: x @ W^T with W a low-bit grid: codes packed 8 per
  ``bits`` bytes in ``<t>_codes``, fp16 group scales ``<t>_scales``, packed zero points ``<t>_zeros`` (absent
  when symmetric: 2^(bits-1)); W = (codes - zeros) * scales. While the module does not train, a 4-bit grid
  of whole groups of 32-256 runs torch's int4 weight-only CPU kernel on bf16 inputs (it reads a quarter of the
  bytes: faster than dense at batch 1); otherwise W is dequantized once per dtype and device and read as a
  dense matrix
"""
from __future__ import annotations

import functools
import math
import sys

import torch
import transformers
from torch import nn
from torch.nn import functional as F

from .fuse_zoo import fuse_program, referenced

#: the teacher's model class (a transformers class name); ``zoo export`` writes the real one here
BASE = "LlamaForCausalLM"
FORMAT = "zoo-export/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "uint8": torch.uint8}

_HADAMARD: dict = {}


def hadamard_matrix(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The normalized n x n Sylvester-Hadamard matrix (n a power of two), built in fp64 and cached."""
    key = (n, dtype, str(device))
    if key not in _HADAMARD:
        if n < 1 or n & (n - 1):
            raise ValueError(f"a Hadamard block must be a power of two, got {n}")
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < n:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        _HADAMARD[key] = (H / math.sqrt(n)).to(device=device, dtype=dtype)
    return _HADAMARD[key]


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """uint8 codes [out, in_features] from ``packed`` [out, ceil(in / 8) * bits]: each run of ``bits`` bytes
    holds 8 codes of ``bits`` bits, little-endian (int64 arithmetic wraps, and the masks keep the low bits)."""
    out = packed.shape[0]
    word = (packed.long().reshape(out, -1, bits) << (8 * torch.arange(bits, device=packed.device))).sum(-1)
    codes = (word[..., None] >> (bits * torch.arange(8, device=packed.device))) & (2 ** bits - 1)
    return codes.reshape(out, -1)[:, :in_features].to(torch.uint8)


def zero_points(op: dict, tensors, scales: torch.Tensor) -> torch.Tensor:
    """A ``qmatmul``'s zero points [out, G] in fp32: stored packed, or 2^(bits-1) for a symmetric grid."""
    if op["symmetric"]:
        return torch.full_like(scales, 2.0 ** (op["bits"] - 1))
    return unpack(tensors(op["t"] + "_zeros"), op["bits"], scales.shape[1]).float()


def dequantize_op(op: dict, tensors, dtype: torch.dtype) -> torch.Tensor:
    """The dense [out, in] weight of a ``qmatmul`` op, in ``dtype`` (computed in fp32)."""
    t, bits, group, n = op["t"], op["bits"], op["group"], op["in"]
    scales = tensors(t + "_scales").float()
    codes = unpack(tensors(t + "_codes"), bits, n).float()
    zeros = zero_points(op, tensors, scales)
    return ((codes - (zeros.repeat_interleave(group, -1)[:, :n])) * scales.repeat_interleave(group, -1)[:, :n]).to(dtype)


def int4_kernel(op: dict, x: torch.Tensor, out: int) -> bool:
    """Whether torch's int4 weight-only CPU kernel computes this ``qmatmul``: bf16 inputs on the CPU (in fp32
    the kernel is slower than a dense matmul), 4 bits, whole groups of a size the kernel takes, outputs in
    multiples of 16 (its packing; a quantized low-rank factor of rank 8 has not)."""
    return (op["bits"] == 4 and x.device.type == "cpu" and x.dtype == torch.bfloat16 and op["group"] in (32, 64, 128, 256)
            and op["in"] % op["group"] == 0 and out % 16 == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def int4_operands(op: dict, tensors, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, [G, out, 2] scales and zeros) of a 4-bit ``qmatmul`` in the kernel's layout, which reads
    w = (q - 8) * scale + zero: a zero point z becomes zero = (8 - z) * scale."""
    t, n = op["t"], op["in"]
    codes = unpack(tensors(t + "_codes"), 4, n).to(torch.int32)
    scales = tensors(t + "_scales").float()
    zeros = zero_points(op, tensors, scales)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return packed, torch.stack([scales.T, ((8 - zeros) * scales).T], -1).to(dtype).contiguous()


def run(program: list[dict], x: torch.Tensor, tensors, qmatmul=None) -> torch.Tensor:
    """Apply ``program`` to ``x``; ``tensors(name)`` returns a stored tensor, ``qmatmul(op, x)`` computes a
    ``qmatmul`` op (default: with the weight dequantized at each call)."""
    for op in program:
        kind = op["op"]
        if kind == "matmul":
            T = tensors(op["t"]).to(x.dtype)
            x = x @ (T.T if op.get("transpose") else T)
        elif kind == "scale":
            x = (x.float() * tensors(op["t"]).float()).to(x.dtype)
        elif kind == "mul":
            x = x * op["value"]
        elif kind == "add":
            x = x + op.get("alpha", 1.0) * tensors(op["t"]).to(x.dtype)
        elif kind == "gather":
            x = x.index_select(-1, tensors(op["t"]))
        elif kind == "scatter":
            x = x.new_zeros(*x.shape[:-1], op["size"]).index_copy(-1, tensors(op["t"]), x)
        elif kind == "pad":
            x = F.pad(x, (0, op["size"] - x.shape[-1]))
        elif kind == "slice":
            x = x[..., : op["size"]]
        elif kind == "hadamard":
            b = op["block"]
            blocks = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
            x = (blocks @ hadamard_matrix(b, x.dtype, x.device)).reshape(x.shape)
        elif kind == "topk_relu":
            a = F.relu(x)
            if op["k"] < a.shape[-1]:
                values, index = a.topk(op["k"], dim=-1)
                a = torch.zeros_like(a).scatter(-1, index, values)
            x = a
        elif kind == "qmatmul":
            x = qmatmul(op, x) if qmatmul else x @ dequantize_op(op, tensors, x.dtype).T
        elif kind == "sum":
            x = sum(run(branch, x, tensors, qmatmul) for branch in op["branches"])
        else:
            raise ValueError(f"unknown zoo op {kind!r}: this modeling_zoo.py is older than the export")
    return x


@functools.cache  # on the hot path of every packed matmul: asked once per dtype
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether this torch runs oneDNN's linear on a CPU in ``dtype`` (bf16 also needs the CPU's bf16 support)."""
    return torch.backends.mkldnn.is_available() and (dtype == torch.float32 or dtype == torch.bfloat16 and
                                                     torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_linear(module: nn.Module, x: torch.Tensor, name: str = "weight", bias=None,
                  transposed: bool = False) -> torch.Tensor:
    """``F.linear(x, module.<name>, bias)`` (``transposed``: a weight stored [in, out], ``x @ W + bias``); for a module
    ``pack_model`` marked, in inference (no grad, no autocast) on a CPU in fp32 or bf16, oneDNN's linear on a copy of
    the weight reordered once for it (the ops torch's inductor uses on a CPU). The copy follows the weight's object,
    storage and version: a load or an in-place write reorders it again; a write through ``.data.copy_`` is not seen
    (``pack_model`` again after one)."""
    weight, packs = module._parameters[name], module.__dict__.get("_onednn")
    if packs is None or torch.is_grad_enabled() or x.dtype != weight.dtype or x.device.type != "cpu" or \
            weight.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not onednn_available(weight.dtype):
        if not transposed:
            return F.linear(x, weight, bias)
        return x @ weight if bias is None else x @ weight + bias
    key = (weight.data_ptr(), -1 if weight.is_inference() else weight._version)  # inference tensors keep no version
    packed = packs.get(name)
    if packed is None or packed[0] is not weight or packed[1] != key:
        w = weight.detach().T.contiguous() if transposed else weight.detach()
        packed = packs[name] = (weight, key, torch.ops.mkldnn._reorder_linear_weight(w, None))
    return torch.ops.mkldnn._linear_pointwise(x, packed[2], bias, "none", [], "")


class Packable:
    """A module that may hold ``onednn_linear``'s packed copies (in ``_onednn``): a move or cast drops them, and a
    copy or pickle leaves them out (oneDNN's layout has no storage to copy)."""

    def _apply(self, fn, recurse=True):
        if "_onednn" in self.__dict__:
            self.__dict__["_onednn"] = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        return state | {"_onednn": {}} if "_onednn" in state else state


class PackedLinear(Packable, nn.Linear):
    """An ``nn.Linear`` whose forward is ``onednn_linear`` (``pack_model`` swaps the class; its state is unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(self, x, "weight", self.bias)


def pack_model(model: nn.Module) -> nn.Module:
    """Mark every ``nn.Linear`` and exported map of ``model`` (any model: a dense teacher too) to run
    ``onednn_linear``; unchanged where this torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return model
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
        if isinstance(module, Packable) or type(module).__name__ == "ZooLinear":  # a remote-code copy's class too
            module.__dict__["_onednn"] = {}
    return model


def unpack_model(model: nn.Module) -> nn.Module:
    """Undo ``pack_model``: every module back on ``F.linear``, the packed copies freed."""
    for module in model.modules():
        module.__dict__.pop("_onednn", None)
        if type(module) is PackedLinear:
            module.__class__ = nn.Linear
    return model


class ZooLinear(Packable, nn.Module):
    """A replaced linear map: its stored tensors and the program that applies them."""

    def __init__(self, spec: dict):
        super().__init__()
        self.in_features, self.out_features = spec["in_features"], spec["out_features"]
        self.kind, self.program = spec["kind"], spec["program"]
        for name, meta in spec["tensors"].items():
            dtype = DTYPES.get(meta["dtype"])  # "model": the dtype the model is built in
            value = torch.empty(meta["shape"], dtype=dtype)
            if value.is_floating_point():
                self.register_parameter(name, nn.Parameter(value, requires_grad=False))
            else:
                self.register_buffer(name, value)
        self.spec = spec
        self._dense: dict = {}
        self._fixed = None  # ([(name, nn.Linear's layout?)] of one or two matmuls, bias name or None): fused form

    def fuse(self, dtype: torch.dtype) -> None:
        """Rewrite the program and its tensors by ``fuse_program`` (the stored tensors it no longer reads are
        dropped; ``spec``, the config's entry, is rewritten too, so ``save_pretrained`` writes what runs); a
        program that becomes one or two matmuls (+ a bias) then runs as fixed calls (``F.linear``, or ``x @ T``
        for a factor stored [in, out])."""
        program, new = fuse_program(self.program, lambda name: getattr(self, name), dtype)
        kept = referenced(program) - set(new)
        for name in [*self._parameters, *self._buffers]:
            if name not in kept:
                delattr(self, name)
        for name, value in new.items():
            self.register_parameter(name, nn.Parameter(value, requires_grad=False))
        self.spec["tensors"] = ({n: m for n, m in self.spec["tensors"].items() if n in kept}
                                | {n: {"shape": list(v.shape), "dtype": "model"} for n, v in new.items()})
        self.spec["program"] = self.program = program
        self._dense = {}
        if "_onednn" in self.__dict__:
            self.__dict__["_onednn"] = {}
        ops = [op["op"] for op in program]
        bias = program[-1]["t"] if ops[-1:] == ["add"] else None
        if ops[:len(ops) - bool(bias)] in (["matmul"], ["matmul", "matmul"]):
            self._fixed = ([(op["t"], bool(op.get("transpose"))) for op in program if op["op"] == "matmul"], bias)

    def _qmatmul(self, op: dict, x: torch.Tensor) -> torch.Tensor:
        tensor = lambda name: getattr(self, name)  # noqa: E731
        # a grid's weight is rebuilt per call only while training could change its scales
        if self.training or torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return x @ dequantize_op(op, tensor, x.dtype).T
        key = (op["t"], x.dtype, x.device)
        if key not in self._dense:
            self._dense[key] = (int4_operands(op, tensor, x.dtype)
                                if int4_kernel(op, x, tensor(op["t"] + "_scales").shape[0])
                                else dequantize_op(op, tensor, x.dtype))
        cached = self._dense[key]
        if isinstance(cached, tuple):
            packed, scale_zeros = cached
            flat = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), packed, op["group"], scale_zeros)
            return flat.reshape(*x.shape[:-1], flat.shape[-1])
        return x @ cached.T

    def _apply(self, fn, recurse=True):
        self._dense = {}  # a move or cast invalidates the dequantized copies
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fixed is not None and x.dtype == self._parameters[self._fixed[0][0][0]].dtype:
            factors, bias = self._fixed
            for name, linear in factors:  # one or two
                x = onednn_linear(self, x, name, transposed=not linear)
            return x + self._parameters[bias] if bias else x
        return run(self.program, x, lambda name: getattr(self, name), self._qmatmul)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}"


def eigen_attention_forward(layer, hidden_states, position_embeddings, attention_mask, cache, **kwargs):
    """Llama-family attention with the KV cache in k_K / k_V dimensions per KV-head group (EigenAttention,
    Saxena et al. 2024, keys projected after RoPE): ``layer`` has the attention block's q/k/v/o
    projections and fields, the projectors ``U_keys`` [kv, d, k_K] and ``U_values`` [kv, d, k_V], and
    ``rotary`` (the family's ``apply_rotary_pos_emb``). ``zoo.EigenAttentionLayer`` runs this too."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    b, s, _ = hidden_states.shape
    d, kv, n_rep = layer.head_dim, layer.num_key_value_heads, layer.num_key_value_groups
    q = layer.q_proj(hidden_states).view(b, s, -1, d).transpose(1, 2)  # [b, H, s, d]
    k = layer.k_proj(hidden_states).view(b, s, -1, d).transpose(1, 2)  # [b, kv, s, d]
    cos, sin = position_embeddings
    q, k = layer.rotary(q, k, cos, sin)
    U_k = layer.U_keys.to(q.dtype)
    # every query head of group g is projected by the group's key projector (heads g*n_rep.. are
    # contiguous, so a [b, kv, n_rep*s, d] view meets U_k [kv, d, k] in one batched matmul)
    q_low = (q.reshape(b, kv, n_rep * s, d) @ U_k).view(b, kv * n_rep, s, -1)
    k_low = k @ U_k
    # values are not rotated: a fused export has U_v folded into v_proj (and o_proj), which then give k_V per head
    folded = getattr(layer, "values_folded", False)
    v = layer.v_proj(hidden_states).view(b, s, kv, -1).transpose(1, 2)
    v_low = v if folded else v @ layer.U_values.to(v.dtype)
    if cache is not None:  # the library's cache stores what it is given: the low-dim K, V
        k_low, v_low = cache.update(k_low, v_low, layer.layer_idx)
    # eager, or else sdpa: flash kernels want equal q/k and v widths, which k_K != k_V breaks
    attention = (eager_attention_forward if layer.config._attn_implementation == "eager"
                 else ALL_ATTENTION_FUNCTIONS["sdpa"])
    out, weights = attention(layer, q_low, k_low, v_low, attention_mask,
                             dropout=0.0 if not layer.training else layer.attention_dropout,
                             scaling=layer.scaling, sliding_window=layer.sliding_window, **kwargs)
    # out: [b, s, H, k_V] -> each head back to d dimensions through its group's value projector
    if folded:
        return layer.o_proj(out.reshape(b, s, -1)), weights
    U_v = layer.U_values.to(out.dtype)
    out = out.reshape(b, s, kv, n_rep, -1).transpose(1, 2).reshape(b, kv, s * n_rep, -1) @ U_v.transpose(1, 2)
    out = out.view(b, kv, s, n_rep, d).transpose(1, 2).reshape(b, s, kv * n_rep * d)
    return layer.o_proj(out), weights


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` [out, in] and ``bias``, frozen, built without initializing anything."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


class ZooEigenAttention(nn.Module):
    """The teacher's attention block (its projections reused as they are) with EigenAttention's projectors."""

    def __init__(self, original: nn.Module, spec: dict):
        super().__init__()
        self.kind = spec["kind"]
        for field in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout"):
            setattr(self, field, getattr(original, field))
        self.is_causal = True
        self.sliding_window = getattr(original, "sliding_window", getattr(self.config, "sliding_window", None))
        self.rotary = sys.modules[type(original).__module__].apply_rotary_pos_emb
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (original.q_proj, original.k_proj, original.v_proj,
                                                              original.o_proj)
        self.num_key_value_heads = spec["tensors"]["U_keys"]["shape"][0]
        self.spec, self.values_folded = spec, spec.get("values_folded", False)
        if self.values_folded:  # a fused export saved again: v_proj and o_proj have their folded shapes
            for proj in ("v_proj", "o_proj"):
                out, inp = spec["tensors"][f"{proj}.weight"]["shape"]
                setattr(self, proj, nn.Linear(inp, out, bias=f"{proj}.bias" in spec["tensors"]))
        for name in ("U_keys",) if self.values_folded else ("U_keys", "U_values"):
            self.register_parameter(name, nn.Parameter(torch.empty(spec["tensors"][name]["shape"]), requires_grad=False))

    def fuse(self, dtype: torch.dtype) -> None:
        """Fold the value projector into v_proj (k_V rows per KV head: U_g^T W_v,g) and o_proj (k_V columns per
        query head: W_o,h U_g(h)), in fp64 rounded once to ``dtype``; keys are rotated before their projection,
        so U_K stays. The value cache and both maps shrink from d to k_V per head; ``spec`` is rewritten."""
        if self.values_folded:
            return
        kv, d, k_v = self.U_values.shape
        U, v, o = self.U_values.double(), self.v_proj, self.o_proj
        v_weight = torch.einsum("gdn,gdk->gkn", v.weight.double().view(kv, d, -1), U).reshape(kv * k_v, -1)
        v_bias = None if v.bias is None else torch.einsum("gd,gdk->gk", v.bias.double().view(kv, d), U).reshape(-1)
        o_weight = torch.einsum("ngrd,gdk->ngrk", o.weight.double().view(o.out_features, kv, -1, d), U)
        self.v_proj = frozen_linear(v_weight.to(dtype), None if v_bias is None else v_bias.to(dtype))
        self.o_proj = frozen_linear(o_weight.reshape(o.out_features, -1).to(dtype), o.bias)
        self.values_folded = True
        del self.U_values
        tensors = {n: m for n, m in self.spec["tensors"].items() if n != "U_values"}
        for name, t in [*self.v_proj.named_parameters(prefix="v_proj"), *self.o_proj.named_parameters(prefix="o_proj")]:
            tensors[name] = {"shape": list(t.shape), "dtype": "model"}
        self.spec["tensors"], self.spec["values_folded"] = tensors, True

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        return eigen_attention_forward(self, hidden_states, position_embeddings, attention_mask,
                                       cache if cache is not None else past_key_values, **kwargs)


def swap_modules(model: nn.Module, zoo: dict) -> None:
    """Replace every module the ``zoo`` block lists by its exported form (shapes only; weights load later)."""
    if zoo.get("format") != FORMAT:
        raise ValueError(f"config.json's zoo block has format {zoo.get('format')!r}; this file reads {FORMAT!r}")
    for name, spec in zoo["modules"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if spec.get("module") == "attention":
            module = ZooEigenAttention(getattr(parent, child), spec)
        else:
            module = ZooLinear(spec)
        setattr(parent, child, module)


def fuse_model(model: nn.Module) -> nn.Module:
    """Fuse every exported module of ``model`` (``ZooLinear.fuse``, ``ZooEigenAttention.fuse``) in the dtype of its
    embeddings; ``from_pretrained`` does this after loading unless ``zoo_fuse=False``."""
    dtype = model.get_input_embeddings().weight.dtype
    with torch.no_grad():
        for module in list(model.modules()):
            if isinstance(module, (ZooLinear, ZooEigenAttention)):
                module.fuse(dtype)
    return model


def zoo_causal_lm(base: type) -> type:
    """``base`` (a transformers ``...ForCausalLM`` class) with the modules of ``config.zoo`` swapped."""

    class ZooForCausalLM(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            swap_modules(self, config.zoo)

        @classmethod
        def from_pretrained(cls, *args, output_loading_info: bool = False, zoo_fuse: bool = True, zoo_compile=False,
                            zoo_onednn: bool = False, **kwargs):
            """transformers' loader, then ``fuse_model`` (``zoo_fuse=False``: the stored programs run as they are,
            op by op), with ``zoo_onednn`` ``pack_model`` and, with ``zoo_compile`` (True or ``torch.compile``'s
            keyword arguments), the forward compiled."""
            # transformers only warns about missing weights and initializes them at random: an export
            # whose tensors do not fit its program must fail instead
            try:
                model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
            except Exception as exc:  # a torn weights file: safetensors' own error does not name it
                if type(exc).__name__ != "SafetensorError":
                    raise
                where = args[0] if args else kwargs.get("pretrained_model_name_or_path", "")
                raise OSError(f"{where}/model.safetensors is not a readable safetensors file ({exc}); "
                              "the export is damaged or incomplete: export it again") from None
            bad = {k: sorted(info[k])[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
            if bad:
                raise OSError(f"the zoo export's weights do not fit its config.json zoo block: {bad}")
            if zoo_fuse:
                fuse_model(model)
            if zoo_onednn:
                pack_model(model)
            if zoo_compile:
                model.forward = torch.compile(model.forward, **(zoo_compile if isinstance(zoo_compile, dict) else {}))
            return (model, info) if output_loading_info else model

    ZooForCausalLM.__qualname__ = ZooForCausalLM.__name__ = "ZooForCausalLM"
    return ZooForCausalLM


ZooForCausalLM = zoo_causal_lm(getattr(transformers, BASE))
