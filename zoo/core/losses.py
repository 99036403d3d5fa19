"""Distillation loss (source 000, section 2.4; DESIGN.md, Core/losses).

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
