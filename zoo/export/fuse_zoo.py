"""Fusing a ``zoo export`` program at load time (issue 26): each affine run of its ops - matmuls, diagonal scales
(sigma), scalars, biases, sums of low-rank branches - becomes the fewest matmuls by tensors folded in fp64 and
rounded once to the model's dtype, so a low-rank map runs as two matmul calls instead of an op-by-op walk.

Shipped beside ``modeling_zoo.py`` in every export (transformers copies a remote-code file's relative imports):
torch only, no zoo.

Rounding: the stored program computes x @ V in the model dtype, the scale by sigma in fp32 and rounds the result
to the model dtype before the second matmul; the fused one rounds V diag(sigma) (computed in fp64) to the model
dtype once and skips the fp32 step. In fp32 both agree to a few ulps; in bf16 they differ by bf16 rounding (about
2^-8 relative per element), the same size as the stored program's own error against fp32.
"""
from __future__ import annotations

import torch

AFFINE = ("matmul", "scale", "mul", "add")


def _affine_ops(ops: list[dict]) -> bool:
    """Whether ``ops`` is an affine map this module folds: matmul/scale/mul/add and sums of such chains, each
    branch holding a matmul (a branch without one would need an identity matrix)."""
    return all(op["op"] in AFFINE or op["op"] == "sum" and all(
        _affine_ops(b) and any(o["op"] in ("matmul", "sum") for o in b) for b in op["branches"]) for op in ops)


def _through(vector: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    for f in factors:
        vector = vector @ f if f.dim() == 2 else vector * f
    return vector


def _simplify(factors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Matrices [a, b] (x @ M1 @ M2 ...) equal to the chain ``factors`` (matrices, diagonals [a], scalars):
    diagonals folded into a neighbour, neighbours multiplied out while that stores no more numbers."""
    mats, pending = [], None
    for f in factors:
        if f.dim() == 2:
            mats.append(f if pending is None else (pending[:, None] if pending.dim() else pending) * f)
            pending = None
        elif mats:
            mats[-1] = mats[-1] * f
        else:
            pending = f if pending is None else pending * f
    if pending is not None or not mats:
        return None
    i = 0
    while i < len(mats) - 1:
        (a, b), c = mats[i].shape, mats[i + 1].shape[1]
        if a * c <= b * (a + c):
            mats[i:i + 2] = [mats[i] @ mats[i + 1]]
            i = 0
        else:
            i += 1
    return mats


def _chain(ops: list[dict], tensors) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
    """An affine ``ops`` (``_affine_ops``) as (matrices, bias) in fp64: x -> x @ M1 @ ... + bias; None where a
    sum of branches has no form of at most two factors."""
    factors, bias = [], None
    for op in ops:
        kind = op["op"]
        if kind == "add":
            b = op.get("alpha", 1.0) * tensors(op["t"]).double()
            bias = b if bias is None else bias + b
            continue
        if kind == "matmul":
            T = tensors(op["t"]).double()
            new = [T.T if op.get("transpose") else T]
        elif kind == "scale":
            new = [tensors(op["t"]).double()]
        elif kind == "mul":
            new = [torch.tensor(float(op["value"]), dtype=torch.float64)]
        else:  # a sum: each branch at most two factors, joined as one chain of rank r1 + r2 + ... or one dense map
            parts = [_chain(b, tensors) for b in op["branches"]]
            if any(p is None or len(p[0]) > 2 for p in parts):
                return None
            terms = [p[0] for p in parts]
            dense = terms[0][0].shape[0] * terms[0][-1].shape[1]
            if any(len(t) == 1 for t in terms) or dense <= sum(m.numel() for t in terms for m in t):
                new = [sum(t[0] @ t[1] if len(t) == 2 else t[0] for t in terms)]
            else:
                new = [torch.cat([t[0] for t in terms], 1), torch.cat([t[1] for t in terms], 0)]
            branch_bias = [p[1] for p in parts if p[1] is not None]
            if branch_bias:
                bias = _through(bias, new) + sum(branch_bias) if bias is not None else sum(branch_bias)
                factors += new
                continue
        bias = None if bias is None else _through(bias, new)
        factors += new
    mats = _simplify(factors)
    return None if mats is None else (mats, bias)


def fuse_program(program: list[dict], tensors, dtype: torch.dtype) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(program, new tensors) computing what ``program`` does with each affine run (matmuls, diagonal scales,
    scalars, biases, sums of low-rank branches) folded into the fewest ``matmul``s of ``fused<i>`` tensors
    ([out, in], nn.Linear's layout; in fp32 [in, out] where in < out) and one ``add`` of a ``fused<i>`` bias,
    computed in fp64 and rounded once to ``dtype``; other ops (gather, hadamard, qmatmul, topk_relu, ...) are kept as they are, and a sum of
    branches that are not all affine keeps its branches, each fused alone."""
    new: dict[str, torch.Tensor] = {}

    def emit(ops: list[dict], out: list[dict]) -> None:
        chain = _chain(ops, tensors) if any(op["op"] in ("matmul", "sum") for op in ops) else None
        if chain is None:
            out.extend(ops)
            return
        mats, bias = chain
        for m in mats:
            # fp32 GEMV over rows shorter than the output (x @ [out, in] with in < out) runs up to 1.5x below the
            # bandwidth of x @ [in, out] on a CPU's BLAS; bf16 kernels want the [out, in] layout either way
            rows = dtype == torch.float32 and m.shape[0] < m.shape[1]
            new[f"fused{len(new)}"] = (m if rows else m.T).to(dtype).contiguous()
            out.append({"op": "matmul", "t": f"fused{len(new) - 1}", **({} if rows else {"transpose": True})})
        if bias is not None:
            new[f"fused{len(new)}"] = bias.to(dtype).contiguous()
            out.append({"op": "add", "t": f"fused{len(new) - 1}"})

    def walk(ops: list[dict]) -> list[dict]:
        out: list[dict] = []
        run_ops: list[dict] = []
        for op in ops:
            if _affine_ops([op]):
                run_ops.append(op)
                continue
            emit(run_ops, out)
            run_ops = []
            out.append({**op, "branches": [walk(b) for b in op["branches"]]} if op["op"] == "sum" else op)
        emit(run_ops, out)
        return out

    fused = walk(program)
    # a tensor read by two runs would be folded into each: then the stored program is the smaller one
    numbers = lambda names, get: sum(get(n).numel() for n in names if get(n).is_floating_point())  # noqa: E731
    after = numbers(referenced(fused) - set(new), tensors) + numbers(new, new.__getitem__)
    if after > numbers(referenced(program), tensors):
        return program, {}
    return fused, new


def referenced(program: list[dict]) -> set[str]:
    """Names of the stored tensors ``program`` reads."""
    names = set()
    for op in program:
        if op["op"] == "qmatmul":
            names |= {op["t"] + "_codes", op["t"] + "_scales"} | (set() if op["symmetric"] else {op["t"] + "_zeros"})
        elif "t" in op:
            names.add(op["t"])
        for branch in op.get("branches", ()):
            names |= referenced(branch)
    return names
