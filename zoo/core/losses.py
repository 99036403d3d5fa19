"""Distillation loss (source 000, section 2.4).

Forward KL(teacher || student) per next-token prediction, averaged over the predictions that
``loss_mask`` selects. A custom autograd function computes it in sequence chunks: the forward keeps
only a running fp32 sum, and the backward writes d loss / d student logits chunk by chunk into one
tensor of the logits' own dtype (q - p, scaled). Neither pass ever holds an fp32
[batch, seq, vocab] tensor — only one chunk's worth at a time — so peak memory falls as chunks
shrink instead of growing with their number.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_mask(attention_mask: torch.Tensor | None, loss_mask: torch.Tensor | None, shape) -> torch.Tensor:
    """Mask over the predictions made at positions 0..T-2 (prediction t is for token t+1).

    ``loss_mask[b, t] = 1`` marks token t as a counted target (e.g. a response token); a target also
    needs to be a real token (``attention_mask``).
    """
    batch, seq = shape
    mask = torch.ones(batch, seq, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    if attention_mask is not None:
        mask = mask.to(attention_mask.device) & attention_mask.bool()
    return mask[:, 1:]


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, teacher, student, mask, temperature, chunk, count):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[1], chunk):
            sl = slice(start, start + chunk)
            log_p, log_q = _log_probs(teacher[:, sl], temperature), _log_probs(student[:, sl], temperature)
            per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
            total += (per_token * mask[:, sl]).sum()
        ctx.save_for_backward(teacher, student, mask)
        ctx.temperature, ctx.chunk, ctx.count = temperature, chunk, count
        return total * temperature**2 / count

    @staticmethod
    def backward(ctx, grad_out):
        teacher, student, mask = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(student)
        scale = grad_out.float() * t / ctx.count  # d/ds of T^2/N * KL(p || softmax(s/T)) = T/N (q - p)
        for start in range(0, student.shape[1], chunk):
            sl = slice(start, start + chunk)
            q = _log_probs(student[:, sl], t).exp_()
            q -= _log_probs(teacher[:, sl], t).exp_()
            grad[:, sl] = (q * (mask[:, sl, None] * scale)).to(grad.dtype)
        return None, grad, None, None, None, None


def token_kl(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int = 256,
) -> torch.Tensor:
    """Mean forward KL(teacher || student) over counted next-token predictions, in fp32.

    Logits are [batch, seq, vocab]; position t predicts token t+1, so the last position is dropped
    and ``loss_mask``/``attention_mask`` (both [batch, seq], aligned with the input tokens) select
    the targets 1..T-1. With ``temperature`` T the KL is of the softened distributions, times T^2
    (Hinton et al.), so gradients keep their scale. Returns 0 when nothing is counted.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student logits {tuple(student_logits.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    batch, seq, _ = student_logits.shape
    mask = prediction_mask(attention_mask, loss_mask, (batch, seq)).to(student_logits.device, torch.float32)
    count = float(mask.sum().clamp_min(1.0))
    return _ChunkedKL.apply(teacher_logits[:, :-1].detach(), student_logits[:, :-1], mask, float(temperature),
                            int(chunk), count)


# --------------------------------------------------------------------------------------------------
# KL from final hidden states through the LM head (issue 9, "Speed": logit memory)


class _ChunkedHeadKL(torch.autograd.Function):
    """``_ChunkedKL`` with the LM head folded in: logits exist one sequence chunk at a time.

    The gradient w.r.t. the student's hidden states is computed in the forward, chunk by chunk,
    while both chunks' logits are at hand (as fused linear cross-entropy kernels do): the backward
    then only scales it, so the head's matmuls run three times per chunk (teacher, student, the
    gradient) as on the logits path, and neither [batch, seq, vocab] logits tensor nor their
    gradient ever exists. The loss is a scalar, so d loss / d hidden = grad_out x the stored gradient.
    """

    @staticmethod
    def forward(ctx, teacher_hidden, student_hidden, weight, bias, mask, temperature, chunk, count, want_grad):
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        grad = torch.empty_like(student_hidden) if want_grad else None
        scale = temperature / count  # d/ds of T^2/N * KL(p || softmax(s/T)) = T/N (q - p)
        kind = student_hidden.device.type
        if torch.is_autocast_enabled(kind):  # cast the (frozen) head once, not in each chunk's matmuls
            weight = weight.to(torch.get_autocast_dtype(kind))
        for start in range(0, student_hidden.shape[1], chunk):
            sl = slice(start, start + chunk)
            log_p = _log_probs(F.linear(teacher_hidden[:, sl], weight, bias), temperature)
            log_q = _log_probs(F.linear(student_hidden[:, sl], weight, bias), temperature)
            per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
            total += (per_token * mask[:, sl]).sum()
            if want_grad:
                g = log_q.exp_().sub_(log_p.exp_()).mul_(mask[:, sl, None] * scale)
                grad[:, sl] = torch.matmul(g.to(student_hidden.dtype), weight.to(student_hidden.dtype))
        ctx.save_for_backward(grad)
        return total * temperature**2 / count

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return None, grad * grad_out.to(grad.dtype), None, None, None, None, None, None, None


def hidden_token_kl(
    teacher_hidden: torch.Tensor,
    student_hidden: torch.Tensor,
    head: torch.nn.Linear,
    loss_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int = 256,
) -> torch.Tensor:
    """``token_kl(head(teacher_hidden), head(student_hidden), ...)`` without either full logits tensor.

    Takes the final hidden states [batch, seq, hidden] of both models (after the final norm) and a
    frozen linear LM head shared by both. Each sequence chunk's logits are computed, compared and
    dropped, so the memory of this loss is one chunk's [batch, chunk, vocab] working set instead of
    three full [batch, seq, vocab] tensors (teacher logits, student logits, their gradient) — at
    a 49k vocabulary and 8 x 2048 tokens that is 4.5 GiB in bf16, more than the activations. Same
    value and gradient as ``token_kl`` on the head's logits, to float rounding.
    """
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher hidden {tuple(teacher_hidden.shape)} != student hidden {tuple(student_hidden.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if head.weight.requires_grad:
        raise ValueError("hidden_token_kl needs a frozen LM head (its weight gets no gradient here)")
    batch, seq, _ = student_hidden.shape
    mask = prediction_mask(attention_mask, loss_mask, (batch, seq)).to(student_hidden.device, torch.float32)
    count = float(mask.sum().clamp_min(1.0))
    want_grad = torch.is_grad_enabled() and student_hidden.requires_grad
    return _ChunkedHeadKL.apply(teacher_hidden[:, :-1].detach(), student_hidden[:, :-1], head.weight, head.bias,
                                mask, float(temperature), int(chunk), count, want_grad)


# --------------------------------------------------------------------------------------------------
# KL against a cached top-k teacher distribution (issue 9, "Teacher-logit cache")


def teacher_top_k(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                  chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the teacher-logit cache keeps of each prediction: (log-probs of the k most likely tokens
    [.., k] fp32, their ids [.., k] int64, log of the remaining mass [..] fp32), of softmax(logits / T).

    Together they are the teacher's distribution coarsened to k + 1 outcomes: the top-k tokens and
    one "rest" bucket. Computed per sequence chunk in fp32.
    """
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, vocab={teacher_logits.shape[-1]}], got {k}")
    values, ids, rest = [], [], []
    for start in range(0, teacher_logits.shape[1], chunk):
        log_p = _log_probs(teacher_logits[:, start:start + chunk], temperature)
        top, idx = log_p.topk(k, dim=-1)
        values.append(top)
        ids.append(idx)
        rest.append(_log_rest(log_p, idx))
    return torch.cat(values, 1), torch.cat(ids, 1), torch.cat(rest, 1)


def _log_rest(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``ids`` (-inf when ``ids`` cover the vocabulary)."""
    return log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)


def _xlogx_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a (log a - log b), with 0 where a = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))


class _ChunkedTopKKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, top_logp, top_ids, rest_logp, student, mask, temperature, chunk, count):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[1], chunk):
            sl = slice(start, start + chunk)
            log_q = _log_probs(student[:, sl], temperature)
            per_token = (_xlogx_ratio(top_logp[:, sl], log_q.gather(-1, top_ids[:, sl])).sum(-1)
                         + _xlogx_ratio(rest_logp[:, sl], _log_rest(log_q, top_ids[:, sl])))
            total += (per_token * mask[:, sl]).sum()
        ctx.save_for_backward(top_logp, top_ids, rest_logp, student, mask)
        ctx.temperature, ctx.chunk, ctx.count = temperature, chunk, count
        return total * temperature**2 / count

    @staticmethod
    def backward(ctx, grad_out):
        top_logp, top_ids, rest_logp, student, mask = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(student)
        scale = grad_out.float() * t / ctx.count
        for start in range(0, student.shape[1], chunk):
            sl = slice(start, start + chunk)
            log_q = _log_probs(student[:, sl], t)
            # the target the student is pulled to: p_i on the top-k tokens, and the rest bucket's
            # mass spread over the other tokens as the student itself spreads it (p_rest q_j / q_rest)
            log_q_rest = _log_rest(log_q, top_ids[:, sl])
            rest = rest_logp[:, sl]
            share = torch.where(torch.isneginf(rest), rest, rest - log_q_rest)  # log(p_rest / q_rest)
            target = share[..., None] + log_q
            target = target.exp_().scatter_(-1, top_ids[:, sl], top_logp[:, sl].exp())
            grad[:, sl] = ((log_q.exp_() - target) * (mask[:, sl, None] * scale)).to(grad.dtype)
        return None, None, None, grad, None, None, None, None


def cached_token_kl(
    top_logp: torch.Tensor,
    top_ids: torch.Tensor,
    rest_logp: torch.Tensor,
    student_logits: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk: int = 256,
) -> torch.Tensor:
    """``token_kl`` against a cached top-k teacher (``teacher_top_k`` of positions 0..T-2): an approximation.

    It is the exact KL between the two distributions coarsened to k + 1 outcomes — the teacher's top-k
    tokens and one "rest" bucket holding every other token:

        sum_{i in top-k} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest),   q_rest = 1 - sum_{i in top-k} q_i

    By the chain rule of KL, the exact KL is this plus p_rest * KL(p(.|rest) || q(.|rest)), so the
    cached KL is a lower bound that misses only how the two models spread the rest mass among the
    other tokens; it is exact when k is the vocabulary size. Cached tensors are [batch, T-1, k] (ids
    any integer dtype) and [batch, T-1]; masks and scaling are those of ``token_kl``.
    """
    batch, seq, _ = student_logits.shape
    if top_logp.shape[:2] != (batch, seq - 1) or top_ids.shape != top_logp.shape or rest_logp.shape != (batch, seq - 1):
        raise ValueError(f"cached teacher tensors {tuple(top_logp.shape)}, {tuple(top_ids.shape)}, "
                         f"{tuple(rest_logp.shape)} do not fit student logits {tuple(student_logits.shape)}")
    mask = prediction_mask(attention_mask, loss_mask, (batch, seq)).to(student_logits.device, torch.float32)
    count = float(mask.sum().clamp_min(1.0))
    return _ChunkedTopKKL.apply(top_logp.float(), top_ids.long(), rest_logp.float(), student_logits[:, :-1],
                                mask, float(temperature), int(chunk), count)


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed -log p(token t+1) over the counted predictions, their number), fp32 per sequence chunk.

    The predictions counted are those ``token_kl`` counts (``prediction_mask``); exp(sum / count) is the
    token-weighted perplexity.
    """
    mask = prediction_mask(attention_mask, loss_mask, input_ids.shape).to(logits.device)
    targets = input_ids[:, 1:].to(logits.device)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, targets.shape[1], chunk):
        sl = slice(start, start + chunk)
        log_p = torch.log_softmax(logits[:, sl].float(), dim=-1)  # logits[:, t] predicts token t + 1
        nll = -log_p.gather(-1, targets[:, sl, None]).squeeze(-1)
        total += (nll * mask[:, sl]).sum()
    return total, mask.sum()
