import json

import pytest
import torch
import torch.nn.functional as F

from zoo.core.losses import token_kl


def dense_kl(t, s, mask, temperature=1.0):
    lp = F.log_softmax(t[:, :-1].double() / temperature, -1)
    lq = F.log_softmax(s[:, :-1].double() / temperature, -1)
    per = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    m = mask[:, 1:].double()
    return (per * m).sum() / m.sum() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_token_kl_matches_dense_reference_value_and_gradient(temperature, chunk):
    torch.manual_seed(0)
    t = torch.randn(3, 17, 50, dtype=torch.float64)
    s = torch.randn(3, 17, 50, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, 17) > 0.3).long()
    kl = token_kl(t, s, mask, temperature=temperature, chunk=chunk)
    (g,) = torch.autograd.grad(kl, s)
    ref = dense_kl(t, s, mask, temperature)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert kl.dtype == torch.float32
    assert abs(kl.item() - ref.item()) < 1e-5 * max(1.0, ref.item())
    assert torch.allclose(g, g_ref, atol=1e-7)


def test_token_kl_is_zero_for_identical_logits_and_positive_otherwise():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 30)
    assert token_kl(x, x.clone()).abs().item() < 1e-6
    assert token_kl(x, x + torch.randn_like(x)).item() > 1e-3


def test_token_kl_uses_next_token_positions_and_attention_mask():
    torch.manual_seed(2)
    t, s = torch.randn(1, 5, 7), torch.randn(1, 5, 7)
    # only token 3 counts: the prediction made at position 2
    loss_mask = torch.tensor([[0, 0, 0, 1, 0]])
    expected = F.kl_div(F.log_softmax(s[0, 2], -1), F.log_softmax(t[0, 2], -1), log_target=True, reduction="sum")
    assert torch.allclose(token_kl(t, s, loss_mask), expected, atol=1e-6)
    # a padded target does not count even if loss_mask marks it
    attention = torch.tensor([[1, 1, 1, 0, 0]])
    assert token_kl(t, s, loss_mask, attention).item() == 0.0


def _peak_bytes(fn) -> float:
    """Peak CPU bytes allocated while ``fn`` runs, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.load(open(path))
    totals = [sum(x) for x in sizes]
    return max(totals) - totals[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_chunked_kl_peak_memory_does_not_grow_with_chunk_count():
    torch.manual_seed(3)
    batch, seq, vocab = 2, 257, 4096
    t = torch.randn(batch, seq, vocab).bfloat16()
    s = torch.randn(batch, seq, vocab).bfloat16().requires_grad_(True)

    def step(chunk):
        def run():
            token_kl(t, s, chunk=chunk).backward()
            s.grad = None
        return run

    def naive():
        dense_kl(t.float(), s.float(), torch.ones(batch, seq)).backward()
        s.grad = None

    peaks = {n: _peak_bytes(step(256 // n)) for n in (1, 2, 4, 8)}
    fp32_logits = batch * seq * vocab * 4
    for fewer, more in [(1, 2), (2, 4), (4, 8)]:
        assert peaks[more] <= peaks[fewer] * 1.02, peaks
    assert peaks[8] < fp32_logits, (peaks, fp32_logits)  # never a whole fp32 [batch, seq, vocab]
    assert peaks[8] < _peak_bytes(naive) / 3
