"""Teacher-logit cache (issue 9): the top-k + rest KL against a dense reference, exactness at k = vocab,
the lower-bound property, and a repair run that reads the cache instead of running the teacher."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zoo.core.losses import cached_token_kl, teacher_top_k, token_kl
from zoo_cli import write_config, zoo_cli


def coarse_kl_reference(teacher, student, k, loss_mask, temperature):
    """KL between teacher and student coarsened to (teacher's top-k tokens, one rest bucket), densely."""
    log_p = torch.log_softmax(teacher[:, :-1] / temperature, -1)
    log_q = torch.log_softmax(student[:, :-1] / temperature, -1)
    top = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, log_p.topk(k, -1).indices, True)
    p_rest = log_p.masked_fill(top, float("-inf")).logsumexp(-1)
    q_rest = log_q.masked_fill(top, float("-inf")).logsumexp(-1)
    per_top = (log_p.exp() * (log_p - log_q)).masked_fill(~top, 0).sum(-1)
    per_rest = torch.where(p_rest.isneginf(), torch.zeros_like(p_rest), p_rest.exp() * (p_rest - q_rest))
    mask = loss_mask[:, 1:]
    return ((per_top + per_rest) * mask).sum() / mask.sum() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_kl_and_its_gradient_match_the_dense_reference(temperature):
    torch.manual_seed(0)
    teacher = torch.randn(2, 9, 50) * 3
    student = (teacher + torch.randn(2, 9, 50)).requires_grad_()
    loss_mask = torch.ones(2, 9)
    loss_mask[0, :4] = 0
    exact = token_kl(teacher, student, loss_mask, None, temperature, chunk=4)
    for k in (1, 5, 20, 50):
        cached = teacher_top_k(teacher[:, :-1], k, temperature, chunk=3)
        approx = cached_token_kl(*cached, student, loss_mask, None, temperature, chunk=4)
        reference = coarse_kl_reference(teacher, student, k, loss_mask, temperature)
        grad, = torch.autograd.grad(approx, student)
        grad_ref, = torch.autograd.grad(reference, student)
        torch.testing.assert_close(approx, reference, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-7)
        if k < 50:
            assert float(approx.detach()) < float(exact.detach())  # coarsening loses information: a lower bound
        else:
            torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-7)
            grad_exact, = torch.autograd.grad(token_kl(teacher, student, loss_mask, None, temperature, 4), student)
            torch.testing.assert_close(grad, grad_exact, rtol=1e-4, atol=1e-7)


def cached_config(tmp_path, teacher, top_k, **data):
    path = write_config(tmp_path, teacher, max_steps=4)
    config = yaml.safe_load(Path(path).read_text())
    if top_k is not None:
        config["data"]["init_args"]["teacher_logits"] = {"top_k": top_k, "batch_size": 3}
    config["data"]["init_args"].update(data)
    Path(path).write_text(yaml.safe_dump(config))
    return path


def test_repair_from_the_full_vocab_cache_equals_the_exact_repair(tmp_path, tiny_teacher_dir, capsys):
    from zoo.core.models import load_tokenizer

    vocab = len(load_tokenizer(tiny_teacher_dir))
    states = {}
    for name, top_k in (("exact", None), ("cached", vocab)):
        (tmp_path / name).mkdir()
        config = cached_config(tmp_path / name, tiny_teacher_dir, top_k)
        code, _, err = zoo_cli(["fit", "--config", config], capsys)
        assert code == 0, err
        states[name] = load_file(str(tmp_path / name / "run" / "repair_state.safetensors"))
    for key, value in states["exact"].items():
        torch.testing.assert_close(states["cached"][key], value, rtol=1e-4, atol=1e-6)

    # the cache: n_train=8 blocks in shards of 3, the teacher's own top-k; resumable shard by shard
    from recipes.data import CodeConfig, DistillationDataModule, HologramConfig, TeacherLogitsConfig

    config = yaml.safe_load((tmp_path / "cached" / "config.yaml").read_text())["data"]["init_args"]
    config.update(teacher=tiny_teacher_dir, code=CodeConfig(**config["code"]),
                  hologram=HologramConfig(**config["hologram"]),
                  teacher_logits=TeacherLogitsConfig(top_k=16, batch_size=3))
    dm = DistillationDataModule(**config)
    cache = dm.teacher_cache()
    shards = sorted(dm.teacher_cache_dir().glob("shard-*.safetensors"))
    assert len(shards) == 3
    assert cache["teacher_top_logp"].shape == (8, 31, 16) and cache["teacher_rest_logp"].shape == (8, 31)
    from zoo.core.models import load_causal_lm

    model, _ = load_causal_lm(tiny_teacher_dir)
    ids = dm.split_tensors("train")["input_ids"][:2].long()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    expected = teacher_top_k(logits, 16)
    torch.testing.assert_close(cache["teacher_top_logp"][:2], expected[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(cache["teacher_top_ids"][:2].long(), expected[1])
    batch = next(iter(dm.train_dataloader()))
    assert batch["teacher_top_logp"].shape == (2, 31, 16)

    kept = {p: p.stat().st_mtime_ns for p in shards[:2]}
    shards[2].unlink()
    dm._teacher_cache = None
    again = dm.teacher_cache()
    assert shards[2].is_file() and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    torch.testing.assert_close(again["teacher_top_logp"], cache["teacher_top_logp"])


def test_cache_temperature_must_match_the_model(tmp_path, tiny_teacher_dir, capsys):
    config = cached_config(tmp_path, tiny_teacher_dir, 16)
    code, _, err = zoo_cli(["fit", "--config", config, "--model.init_args.temperature", "2.0"], capsys)
    assert code == 2 and "teacher_logits.temperature=1.0" in err and "temperature=2.0" in err, err
