"""Tiny in-process teachers: a 2-layer Llama with a byte-level BPE tokenizer, saved to a temp dir.

Everything here is built locally in about a second; no network, no downloads.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning  # noqa: F401 - its log handlers bind sys.stderr when imported: here, not to one test's capture
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # a fixed corpus (this file's text as it once was), so the tiny teachers do not change when this file does
    text = [(Path(__file__).parent / "fixtures" / "tokenizer_corpus.txt").read_text()] * 4 + \
        ["def f(x):\n    return x + 1\n", "hello world"]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    return model


@pytest.fixture
def one_thread():
    """One torch thread: results bitwise reproducible, and tiny matmuls do not fight over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> str:
    """Directory with a saved tiny Llama + tokenizer, loadable by ``zoo.core.models.load_causal_lm``."""
    path = tmp_path_factory.mktemp("tiny_teacher")
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def perturbed_teacher_dir(tmp_path_factory, tiny_teacher_dir) -> str:
    """The tiny teacher's safetensors with every weight moved (no config, no tokenizer): a ``zoo.Transplant``
    source whose student differs from the teacher."""
    from families import save_perturbed

    return save_perturbed(tiny_teacher_dir, tmp_path_factory.mktemp("perturbed_teacher"))


@pytest.fixture(scope="session")
def tiny_model(tiny_teacher_dir):
    """A fresh (non-memoized) tiny model; tests may mutate it."""
    return build_model(len(build_tokenizer()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "zoo_cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
