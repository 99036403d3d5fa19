"""The fast repair step (issue 9, "Speed"): the shared prefix and the KL through the LM head give the
plain path's logits, loss and gradients; with both off the step is the plain one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo import FisherSVD
from zoo_cli import repair
from zoo.core.losses import hidden_token_kl, token_kl
from zoo.core.prefix import SharedPrefix
from zoo.core.surgery import teacher_view


def _batch(vocab, batch=3, seq=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 13:] = 0  # a padded row
    loss_mask = (torch.rand(batch, seq, generator=g) > 0.3).long()
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def _module(teacher, targets="model.layers.1.mlp.down_proj", **options):
    torch.manual_seed(0)
    module = repair(FisherSVD, targets=targets, rank=8, weighting="none", train_factors=True, teacher=teacher,
                             temperature=2.0, kl_chunk=5, **options)
    module.build_student()
    with torch.no_grad():  # move the student away from the teacher so the KL and its gradient are not ~0
        for name, p in module.trainable_parameters().items():
            p.add_(0.5 * p.abs().mean() * torch.randn_like(p))
            if name.endswith("sigma"):
                p.mul_(30.0)
    return module


def _loss_and_grads(module, batch):
    for p in module.trainable_parameters().values():
        p.grad = None
    kl, count = module.distillation_loss(batch)
    kl.backward()
    return kl.detach(), count, {n: p.grad.clone() for n, p in module.trainable_parameters().items()}


def test_hidden_token_kl_equals_token_kl_value_and_grad():
    torch.manual_seed(0)
    head = nn.Linear(16, 37, bias=False).requires_grad_(False)
    teacher = torch.randn(3, 11, 16)
    student = (teacher + 0.3 * torch.randn(3, 11, 16)).requires_grad_(True)
    batch = _batch(37, 3, 11)
    args = (batch["loss_mask"], batch["attention_mask"], 1.7, 4)
    ref = token_kl(head(teacher), head(student), *args)
    (ref_grad,) = torch.autograd.grad(ref * 3.0, student)  # a non-unit upstream gradient
    got = hidden_token_kl(teacher, student, head, *args)
    (got_grad,) = torch.autograd.grad(got * 3.0, student)
    assert ref.item() > 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-8)
    with torch.no_grad():  # validation: no gradient is computed, same value
        torch.testing.assert_close(hidden_token_kl(teacher, student, head, *args), ref, rtol=1e-5, atol=1e-7)


def test_hidden_token_kl_rejects_a_trainable_head():
    head = nn.Linear(4, 5)
    with pytest.raises(ValueError, match="frozen LM head"):
        hidden_token_kl(torch.randn(1, 3, 4), torch.randn(1, 3, 4), head)


@pytest.mark.parametrize("shared_prefix,fused_head", [(True, False), (False, True), (True, True)])
def test_fast_step_equals_plain_step(tiny_teacher_dir, shared_prefix, fused_head):
    batch = _batch(384)
    plain = _module(tiny_teacher_dir, shared_prefix=False, fused_head=False)
    fast = _module(tiny_teacher_dir, shared_prefix=shared_prefix, fused_head=fused_head)
    kl0, n0, g0 = _loss_and_grads(plain, batch)
    kl1, n1, g1 = _loss_and_grads(fast, batch)
    assert kl0.item() > 1e-2 and n0 == n1
    torch.testing.assert_close(kl1, kl0, rtol=1e-4, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == 3
    for name in g0:
        assert g0[name].abs().max() > 0
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-7, msg=name)


def test_shared_prefix_student_logits_equal_plain(tiny_teacher_dir):
    batch = _batch(384)
    module = _module(tiny_teacher_dir, shared_prefix=True)
    _, _, teacher, student = module.distillation_outputs(batch)
    assert module._prefix.active and module._prefix.start == 1
    with torch.no_grad():
        plain_student = module(batch["input_ids"], batch["attention_mask"])
        with teacher_view(module.model):
            plain_teacher = module(batch["input_ids"], batch["attention_mask"])
    assert (plain_student - plain_teacher).abs().max() > 1e-4  # the replaced layer does change the output
    torch.testing.assert_close(teacher, plain_teacher, rtol=0, atol=0)
    torch.testing.assert_close(student, plain_student, rtol=1e-5, atol=1e-6)
    assert student.requires_grad


def _count_calls(module):
    calls = [0]
    layer0 = module.model.model.layers[0]
    return calls, layer0.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))


@pytest.mark.parametrize("shared_prefix,expected", [(True, 1), (False, 2)])
def test_shared_prefix_runs_lower_layers_once(tiny_teacher_dir, shared_prefix, expected):
    module = _module(tiny_teacher_dir, shared_prefix=shared_prefix)
    calls, handle = _count_calls(module)
    module.distillation_loss(_batch(384))
    handle.remove()
    assert calls[0] == expected
    # the layers are restored after the step: a plain forward runs layer 0 again
    calls, handle = _count_calls(module)
    module(_batch(384)["input_ids"])
    handle.remove()
    assert calls[0] == 1


def test_everything_off_is_the_plain_path(tiny_teacher_dir):
    """With both levers off the loss is token_kl of the teacher-view logits and the student's logits."""
    batch = _batch(384)
    module = _module(tiny_teacher_dir, shared_prefix=False, fused_head=False)
    kl, count = module.distillation_loss(batch)
    assert module._prefix is None
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad(), teacher_view(module.model):
        t = module.model(input_ids=ids, attention_mask=attn).logits
    s = module.model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(kl, token_kl(t, s, batch["loss_mask"], attn, 2.0, 5))


def test_shared_prefix_off_when_first_layer_is_replaced(tiny_teacher_dir):
    module = _module(tiny_teacher_dir, targets="model.layers.{0..1}.mlp.down_proj")
    prefix = SharedPrefix(module.model)
    assert prefix.reason is None and prefix.start == 0 and not prefix.active
    calls, handle = _count_calls(module)
    module.distillation_loss(_batch(384))
    handle.remove()
    assert calls[0] == 2


def test_shared_prefix_off_for_unsupported_models(tiny_teacher_dir, caplog):
    module = _module(tiny_teacher_dir)
    module.model.config.model_type = "something_else"
    with caplog.at_level("INFO", logger="zoo.core.prefix"):
        prefix = SharedPrefix(module.model)
    assert prefix.reason and not prefix.active and "something_else" in caplog.text


def test_calibration_skips_the_head_only_when_no_statistic_needs_it(tiny_model):
    """Calibration asks for the last position's logits only, unless a hooked module is the LM head."""
    from zoo.core import calibration as calib

    batch = _batch(384)
    seen = []
    handle = tiny_model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    stats = calib.collect(tiny_model, [batch], ["model.layers.0.mlp.down_proj"], progress=False)
    assert seen == [1]
    seen.clear()
    head = calib.collect(tiny_model, [batch], ["lm_head"], progress=False)
    handle.remove()
    assert seen == [batch["input_ids"].shape[1]]
    real = int(batch["attention_mask"].sum())
    assert stats["model.layers.0.mlp.down_proj"].count == real and head["lm_head"].count == real
    # the sums are the dense ones over the real tokens
    got = []
    handle = tiny_model.lm_head.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    with torch.no_grad():
        tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    x = got[0][batch["attention_mask"].bool()].double()
    torch.testing.assert_close(head["lm_head"].second_moment, x.T @ x / real, rtol=1e-5, atol=1e-7)


def test_hidden_token_kl_under_bf16_autocast_matches_token_kl():
    """Under autocast the head runs in bf16 on both paths; the two stay close."""
    torch.manual_seed(0)
    head = nn.Linear(16, 37, bias=False).requires_grad_(False)
    teacher = torch.randn(2, 9, 16)
    student = (teacher + 0.3 * torch.randn(2, 9, 16)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = token_kl(head(teacher), head(student), chunk=4)
        got = hidden_token_kl(teacher, student, head, chunk=4)
    (ref_grad,) = torch.autograd.grad(ref, student)
    (got_grad,) = torch.autograd.grad(got, student)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(got_grad, ref_grad, rtol=5e-2, atol=1e-4)
