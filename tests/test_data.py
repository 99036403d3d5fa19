"""recipes.data: packing and splits, response-only masks, determinism, hologram generation and resume,
the code/hologram mix, and errors for bad input. CPU only, tiny teacher from conftest."""
from __future__ import annotations

import random

import datasets
import pytest
import torch

import recipes.data as data
from recipes.data import (
    CodeConfig,
    CodeDataModule,
    DistillationDataModule,
    HologramConfig,
    HologramDataModule,
    Source,
    hologram_documents,
    hologram_samples,
    render_conversation,
    sample_tokens,
    split_and_pack,
)
from zoo.core.errors import ZooError
from zoo.core.models import load_causal_lm, load_tokenizer

EOS = 2
TINY_HOLOGRAM = HologramConfig(n_samples=6, max_new_tokens=6, gen_batch_size=3)


def make_tree(root, n=24):
    """A small source tree of distinct Python files."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "".join(f"    value_{i}_{k} = {i} * {k} + 1\n" for k in range(6))
        (root / f"module_{i:02d}.py").write_text(f"def function_{i}(x):\n{body}    return x\n")
    (root / "notes.txt").write_text("not python\n")
    return root


def small(teacher, **kw):
    return dict(teacher=teacher, seq_len=32, n_calibration=2, n_train=6, n_heldout=2, **kw)


# --- packing and splits


def test_split_and_pack_blocks_are_exact_and_splits_disjoint_by_document():
    rng = random.Random(0)
    # document j is made of token 10 + j only, so a token tells which document it came from
    docs = [([10 + j] * rng.randint(3, 40), [j % 2] * 40) for j in range(80)]
    docs = [(ids, mask[: len(ids)]) for ids, mask in docs]
    blocks = {"heldout": 3, "calibration": 2, "train": 8}
    packed = split_and_pack([Source("toy", 1.0, docs, "")], blocks, seq_len=16, eos_id=EOS, seed=0)
    seen = {}
    for split, n in blocks.items():
        ids, mask = packed[split]["input_ids"], packed[split]["loss_mask"]
        assert ids.shape == mask.shape == (n, 16)
        seen[split] = set(ids.flatten().tolist()) - {EOS}
        # the loss mask travels with the tokens: document j has mask j % 2
        for t, m in zip(ids.flatten().tolist(), mask.flatten().tolist()):
            if t != EOS:
                assert m == (t - 10) % 2
        assert EOS in ids  # documents are joined by EOS
    assert not seen["heldout"] & seen["train"]
    assert not seen["heldout"] & seen["calibration"]
    assert not seen["calibration"] & seen["train"]


def test_a_mix_with_twice_the_heldout_blocks_holds_out_the_code_only_heldout_documents():
    """configs/commands/frontier_ood.yaml scores a 50/50 mix item on the code-only recipe's heldout blocks: the
    mix holds out twice the tokens (in blocks of its own length), so its heldout code is the same documents and
    none of them is trained or calibrated on (the heldout is dealt first, from the same shuffle of the same source
    name)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]

    rng = random.Random(1)
    code = [([10 + j] * rng.randint(3, 40), [1] * 40) for j in range(200)]
    code = [(ids, mask[: len(ids)]) for ids, mask in code]
    holo = [([1000 + j] * rng.randint(3, 40), [1] * 40) for j in range(200)]
    holo = [(ids, mask[: len(ids)]) for ids, mask in holo]
    study = yaml.safe_load((root / "configs/commands/frontier_ood.yaml").read_text())
    opts = lambda overrides: dict(zip(overrides[::2], overrides[1::2]))  # noqa: E731
    n = int(opts(study["overrides"])["--data.init_args.n_heldout"])
    for method in (m for m in study["methods"] if m.get("heldout")):
        own, scored = opts(method["overrides"]), opts(method["heldout"])
        seq_len = yaml.safe_load((root / method["config"]).read_text())["data"]["init_args"]["seq_len"]
        seq_len = int(own.get("--data.init_args.seq_len", seq_len))
        code_seq_len = int(scored["--data.init_args.heldout_data.init_args.seq_len"])
        assert int(own["--data.init_args.n_heldout"]) * seq_len == 2 * n * code_seq_len, method["name"]
        assert int(scored["--data.init_args.heldout_data.init_args.n_heldout"]) == n
    n = 3
    code_only = split_and_pack([Source("code", 1.0, code, "")], {"heldout": n, "calibration": 2, "train": 8},
                               seq_len=16, eos_id=EOS, seed=5)
    mix = split_and_pack([Source("code", 0.5, code, ""), Source("hologram", 0.5, holo, "")],
                         {"heldout": 2 * n, "calibration": 4, "train": 16}, seq_len=16, eos_id=EOS, seed=5)
    docs = lambda split, packed: set(packed[split]["input_ids"].flatten().tolist()) - {EOS}  # noqa: E731
    scored = docs("heldout", code_only)
    assert scored == {t for t in docs("heldout", mix) if t < 1000}
    assert not scored & (docs("train", mix) | docs("calibration", mix))
    # a mix in blocks twice as long holds out half the blocks: the same tokens, the same documents
    long = split_and_pack([Source("code", 0.5, code, ""), Source("hologram", 0.5, holo, "")],
                          {"heldout": n, "calibration": 2, "train": 8}, seq_len=32, eos_id=EOS, seed=5)
    assert scored == {t for t in docs("heldout", long) if t < 1000}
    assert not scored & (docs("train", long) | docs("calibration", long))


def test_code_datamodule_batches(tmp_path, tiny_teacher_dir):
    code = CodeConfig(source=str(make_tree(tmp_path / "src")))
    dm = CodeDataModule(code=code, batch_size=4, **small(tiny_teacher_dir))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    for v in batch.values():
        assert v.shape == (4, 32) and v.dtype == torch.long
    assert batch["attention_mask"].eq(1).all() and batch["loss_mask"].eq(1).all()  # plain code: all targets
    heldout = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    assert torch.equal(heldout, dm.split_tensors("heldout")["input_ids"].long())  # no shuffle
    assert torch.equal(torch.cat([b["input_ids"] for b in dm.test_dataloader()]), heldout)
    assert len(dm.calibration_dataloader().dataset) == 2
    decoded = load_tokenizer(tiny_teacher_dir).decode(dm.split_tensors("train")["input_ids"][0].tolist())
    assert "value_" in decoded and "not python" not in decoded


def test_response_only_mask_from_chat_template(tiny_teacher_dir):
    tok = load_tokenizer(tiny_teacher_dir)
    messages = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."},
                {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}]
    ids, mask = render_conversation(messages, tok)
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
    targets = tok.decode([i for i, m in zip(ids, mask) if m])
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert targets == "It is four.<|im_end|>\nSix.<|im_end|>\n"
    assert "two plus two" in context and "three plus three" in context and "four" not in context


def _chat_dataset(path, n=40):
    rows = {
        "messages": [[{"role": "user", "content": f"Question {i}: what is {i} squared?"},
                      {"role": "assistant", "content": f"answer {i * i}"}] for i in range(n)],
        "prompt": [f"Question {i}?" for i in range(n)],
        "response": [f"answer {i}" for i in range(n)],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fields", [{}, {"prompt_field": "prompt", "response_field": "response"}])
def test_instruction_dataset_is_response_only_after_packing(tmp_path, tiny_teacher_dir, fields):
    path = _chat_dataset(tmp_path / "chat")
    dm = CodeDataModule(code=CodeConfig(dataset=path, **fields), **small(tiny_teacher_dir))
    tok = load_tokenizer(tiny_teacher_dir)
    for split in ("train", "heldout"):
        t = dm.split_tensors(split)
        ids, mask = t["input_ids"].flatten().tolist(), t["loss_mask"].flatten().tolist()
        assert 0 < sum(mask) < len(mask)
        targets = tok.decode([i for i, m in zip(ids, mask) if m])
        assert "answer" in targets and "Question" not in targets and "user" not in targets


# --- determinism and caching


def test_same_config_same_tensors_different_seed_different(tmp_path, tiny_teacher_dir):
    code = CodeConfig(source=str(make_tree(tmp_path / "src")))
    a = CodeDataModule(code=code, cache_dir=str(tmp_path / "a"), **small(tiny_teacher_dir))
    b = CodeDataModule(code=code, cache_dir=str(tmp_path / "b"), **small(tiny_teacher_dir))
    c = CodeDataModule(code=code, cache_dir=str(tmp_path / "a"), **small(tiny_teacher_dir, seed=1))
    for dm in (a, b, c):
        dm.setup("fit")
        dm.setup("validate")  # idempotent
    for split in ("calibration", "train", "heldout"):
        assert torch.equal(a.split_tensors(split)["input_ids"], b.split_tensors(split)["input_ids"])
        assert a.fingerprint(split) == b.fingerprint(split)
        assert a.fingerprint(split) != c.fingerprint(split)
    assert not torch.equal(a.split_tensors("train")["input_ids"], c.split_tensors("train")["input_ids"])
    assert len({a.fingerprint(s) for s in ("calibration", "train", "heldout")}) == 3
    # the seeded train order is reproducible
    order_a = torch.cat([x["input_ids"] for x in a.train_dataloader()])
    order_b = torch.cat([x["input_ids"] for x in b.train_dataloader()])
    assert torch.equal(order_a, order_b)
    # a second run with the same cache reads the packed splits back instead of rebuilding them
    packed = list((tmp_path / "a" / "packed").iterdir())
    assert len(packed) == 2  # seeds 0 and 1
    d = CodeDataModule(code=code, cache_dir=str(tmp_path / "a"), **small(tiny_teacher_dir))
    d._sources = lambda tokenizer: pytest.fail("rebuilt instead of reading the cache")
    d.setup("validate")
    assert torch.equal(d.split_tensors("heldout")["input_ids"], a.split_tensors("heldout")["input_ids"])


def test_heldout_does_not_move_when_n_train_changes(tmp_path, tiny_teacher_dir):
    code = CodeConfig(source=str(make_tree(tmp_path / "src")))
    a = CodeDataModule(code=code, **small(tiny_teacher_dir))
    b = CodeDataModule(code=code, **small(tiny_teacher_dir) | {"n_train": 3})
    assert a.fingerprint("heldout") == b.fingerprint("heldout")
    assert a.fingerprint("train") != b.fingerprint("train")


# --- hologram


def test_sample_tokens_applies_per_row_temperature_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 50).repeat(4, 1)
    top = int(logits[0].argmax())
    u = torch.rand(150)
    picks = [
        sample_tokens(logits, torch.tensor([1e-3, 5.0, 5.0, 5.0]), torch.tensor([1.0, 1e-6, 1.0, 0.9]), x.repeat(4))
        for x in u
    ]
    picks = torch.stack(picks)  # [300, 4]
    assert picks[:, 0].eq(top).all()  # near-zero temperature: argmax
    assert picks[:, 1].eq(top).all()  # tiny nucleus: argmax
    assert len(set(picks[:, 2].tolist())) > 20  # hot and full: spread over the vocabulary
    # the top-k shortcut and the full sort pick the same tokens
    t, p = torch.tensor([0.7, 1.1, 0.9, 1.0]), torch.tensor([0.85, 0.99, 1.0, 0.9])
    for x in u[:50]:
        assert torch.equal(sample_tokens(logits, t, p, x.repeat(4), top_k_first=2),
                           sample_tokens(logits, t, p, x.repeat(4), top_k_first=50))


def test_hologram_is_deterministic_with_per_row_sampling(tmp_path, tiny_teacher_dir):
    a = hologram_samples(TINY_HOLOGRAM, tiny_teacher_dir, 0, tmp_path / "a")
    b = hologram_samples(TINY_HOLOGRAM, tiny_teacher_dir, 0, tmp_path / "b")
    c = hologram_samples(TINY_HOLOGRAM, tiny_teacher_dir, 1, tmp_path / "c")
    assert a["token_ids"] == b["token_ids"] and a["prompt"] == b["prompt"]
    assert a["token_ids"] != c["token_ids"]
    assert all(1 <= len(g) <= 6 for g in a["token_ids"])
    temps, top_ps = a["temperature"], a["top_p"]
    assert len(set(temps)) == 6 and all(0.7 <= t <= 1.1 for t in temps)
    assert len(set(top_ps)) == 6 and all(0.85 <= p <= 1.0 for p in top_ps)
    tok = load_tokenizer(tiny_teacher_dir)
    bos_only = [ids == [tok.bos_token_id] for ids in a["prompt_ids"]]
    assert sum(bos_only) == 3  # bos_fraction=0.5
    assert any("<|im_start|>user" in p for p in a["prompt"])  # prompts use the chat template
    # documents: the prompt is context, the generated tokens are targets
    docs = hologram_documents(TINY_HOLOGRAM, tiny_teacher_dir, 0, tmp_path / "a")
    for (ids, mask), p, g in zip(docs, a["prompt_ids"], a["token_ids"]):
        assert ids == p + g and mask == [0] * len(p) + [1] * len(g)
    config = (next((tmp_path / "a" / "hologram").iterdir()) / "config.json").read_text()
    assert tiny_teacher_dir in config and '"max_new_tokens": 6' in config


def test_hologram_generation_resumes_after_interruption(tmp_path, tiny_teacher_dir, monkeypatch):
    cfg = HologramConfig(n_samples=6, max_new_tokens=6, gen_batch_size=2)  # three shards
    uninterrupted = hologram_samples(cfg, tiny_teacher_dir, 0, tmp_path / "full")

    real, calls = data.generate_shard, []

    def interrupted_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data.hologram, "generate_shard", interrupted_after_one)
    with pytest.raises(KeyboardInterrupt):
        hologram_samples(cfg, tiny_teacher_dir, 0, tmp_path / "resume")
    model, _ = load_causal_lm(tiny_teacher_dir)
    assert not model.training  # state restored after the interruption
    (root,) = (tmp_path / "resume" / "hologram").iterdir()
    assert sorted(p.name for p in root.glob("shard-*")) == ["shard-00000"]

    resumed_calls = []
    monkeypatch.setattr(data.hologram, "generate_shard", lambda *a, **k: resumed_calls.append(1) or real(*a, **k))
    resumed = hologram_samples(cfg, tiny_teacher_dir, 0, tmp_path / "resume")
    assert len(resumed_calls) == 2  # only the missing shards
    assert resumed.to_dict() == uninterrupted.to_dict()
    # a larger run reuses the existing shards too
    more = hologram_samples(HologramConfig(n_samples=8, max_new_tokens=6, gen_batch_size=2), tiny_teacher_dir, 0,
                            tmp_path / "resume")
    assert len(resumed_calls) == 3 and more["token_ids"][:6] == uninterrupted["token_ids"]


def test_hologram_datamodule(tmp_path, tiny_teacher_dir):
    dm = HologramDataModule(hologram=HologramConfig(n_samples=12, max_new_tokens=8, gen_batch_size=6),
                            **small(tiny_teacher_dir) | {"seq_len": 16, "n_train": 4})
    t = dm.split_tensors("train")
    assert t["input_ids"].shape == (4, 16)
    assert 0 < int(t["loss_mask"].sum()) < t["loss_mask"].numel()  # prompts are context


def test_generation_runs_on_the_trainers_root_device(tmp_path, tiny_teacher_dir, monkeypatch):
    from types import SimpleNamespace

    seen = []
    real = data.hologram_documents
    monkeypatch.setattr(data.modules, "hologram_documents", lambda *a, **k: seen.append(a[-1]) or real(*a, **k))
    dm = HologramDataModule(hologram=HologramConfig(n_samples=12, max_new_tokens=8, gen_batch_size=6),
                            **small(tiny_teacher_dir) | {"seq_len": 16, "n_train": 4})
    assert dm.generation_device() == torch.device("cpu")  # no trainer attached
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu", 0)))
    dm.prepare_data()
    dm.setup("fit")
    assert seen == [torch.device("cpu", 0)]  # built once, on the trainer's device


# --- the mix


def test_the_whole_model_mix_recipe_yields_both_sources_in_its_shares(tmp_path, tiny_teacher_dir, monkeypatch):
    """configs/recipes/compress_zoo.yaml's own data module (on a tiny teacher, small sizes): every split
    is code and hologram in the recipe's ``code_fraction`` (issue 27; source 000, section 2.5)."""
    from pathlib import Path

    from recipes.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    small_sizes = [f"--data.init_args.{k}={v}" for k, v in small(tiny_teacher_dir).items() if k != "teacher"]
    recipe = load_recipe("configs/recipes/compress_zoo.yaml", [
        "--model.init_args.teacher", tiny_teacher_dir, *small_sizes, "--data.init_args.cache_dir", str(tmp_path),
        "--data.init_args.code.source", str(make_tree(tmp_path / "src")),
        "--data.init_args.hologram.n_samples=12", "--data.init_args.hologram.max_new_tokens=12",
        "--data.init_args.hologram.gen_batch_size=6"], build=False)
    dm = recipe.data
    assert isinstance(dm, DistillationDataModule) and dm.code_fraction == 0.5 and dm.teacher == tiny_teacher_dir
    dm.setup("fit")
    for split in ("calibration", "train", "heldout"):
        shares = dm.token_shares(split)
        assert set(shares) == {"code", "hologram"}, shares
        assert shares["code"] == pytest.approx(0.5, abs=0.05) and shares["hologram"] == pytest.approx(0.5, abs=0.05)

def test_mixture_has_the_configured_token_split(tmp_path, tiny_teacher_dir):
    dm = DistillationDataModule(
        code_fraction=0.3, code=CodeConfig(source=str(make_tree(tmp_path / "src"))),
        hologram=HologramConfig(n_samples=12, max_new_tokens=12, gen_batch_size=6), **small(tiny_teacher_dir),
    )
    dm.setup("fit")
    for split in ("calibration", "train", "heldout"):
        shares = dm.token_shares(split)
        assert shares["code"] == pytest.approx(0.3, abs=0.05), (split, shares)
        assert shares["hologram"] == pytest.approx(0.7, abs=0.05), (split, shares)
    t = dm.split_tensors("train")
    code_tokens = t["source"] == 0
    assert t["loss_mask"][code_tokens].eq(1).all()
    assert t["loss_mask"][~code_tokens].eq(0).any() and t["loss_mask"][~code_tokens].eq(1).any()


def test_datamodules_build_from_nested_config():
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    cfg = parser.parse_object({"data": {"class_path": "recipes.data.DistillationDataModule", "init_args": {
        "seq_len": 64, "code_fraction": 0.25, "code": {"max_files": 7},
        "hologram": {"n_samples": 5, "temperature": [0.5, 0.9]}}}})
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, DistillationDataModule)
    assert (dm.seq_len, dm.code_fraction, dm.code.max_files, dm.hologram.n_samples) == (64, 0.25, 7, 5)
    assert tuple(dm.hologram.temperature) == (0.5, 0.9) and dm.hologram.max_new_tokens == 128


# --- bad input


def test_bad_inputs_raise_helpful_errors(tmp_path, tiny_teacher_dir):
    missing = str(tmp_path / "no_such_tree")
    with pytest.raises(ZooError, match="no_such_tree.*stdlib"):
        CodeDataModule(code=CodeConfig(source=missing), teacher=tiny_teacher_dir)
    with pytest.raises(ZooError, match=r"code_fraction=1\.5 is outside \[0\.0, 1\.0\]"):
        DistillationDataModule(code_fraction=1.5, teacher=tiny_teacher_dir)
    with pytest.raises(ZooError, match="hologram.temperature"):
        HologramDataModule(hologram=HologramConfig(temperature=(1.2, 0.5)), teacher=tiny_teacher_dir)
    with pytest.raises(ZooError, match="set both"):
        CodeDataModule(code=CodeConfig(prompt_field="prompt"), teacher=tiny_teacher_dir)
    dm = CodeDataModule(code=CodeConfig(source=str(make_tree(tmp_path / "src", n=3))),
                        **small(tiny_teacher_dir) | {"n_train": 500})
    short = r"not enough code data: \d+ tokens in 3 documents.*Lower n_train=500.*max_repeat >= \d+"
    with pytest.raises(ZooError, match=short):
        dm.setup("fit")
    with pytest.raises(ZooError, match="valid choices: heldout, calibration, train"):
        dm.fingerprint("validation")
    path = _chat_dataset(tmp_path / "chat", n=4)
    with pytest.raises(ZooError, match="code.messages_field='conversation'.*columns: messages, prompt, response"):
        CodeDataModule(code=CodeConfig(dataset=path, messages_field="conversation"), **small(tiny_teacher_dir)).setup()


def test_max_repeat_fills_a_short_source(tmp_path, tiny_teacher_dir):
    code = CodeConfig(source=str(make_tree(tmp_path / "src", n=3)))
    dm = CodeDataModule(code=code, max_repeat=20.0, **small(tiny_teacher_dir) | {"n_train": 12})
    assert dm.split_tensors("train")["input_ids"].shape == (12, 32)
