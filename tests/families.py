"""Tiny random-init teachers of the model families the zoo is used on, saved like a real checkpoint.

Each family is its transformers config at the tiny test sizes (hidden 64, 2 layers, 4 query heads, 2 KV
heads), with the conftest's tokenizer. ``TARGETS`` names each family's linear maps by role: Phi-3 fuses
q/k/v into ``self_attn.qkv_proj`` and gate/up into ``mlp.gate_up_proj``, and those fused maps are what a
technique targets there (docs/guides/recipes.md, "Targets in fused-projection families").
"""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import build_tokenizer

#: family -> (transformers config class, options beyond the shared tiny sizes)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16}),
    "phi3": ("Phi3Config", {"original_max_position_embeddings": 512}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {}),
}
#: the attention families EigenAttention supports; the others are refused by name
EIGEN_FAMILIES = {"llama", "qwen2", "mistral"}

#: role -> target pattern, by family (the default: separate q/k/v and gate/up projections)
TARGETS = {
    "default": {"mlp_in": "model.layers.*.mlp.up_proj", "attn_in": "model.layers.*.self_attn.{q,v}_proj",
                "down": "model.layers.{0..1}.mlp.down_proj", "attention": "model.layers.*.self_attn"},
    "phi3": {"mlp_in": "model.layers.*.mlp.gate_up_proj", "attn_in": "model.layers.*.self_attn.qkv_proj",
             "down": "model.layers.{0..1}.mlp.down_proj", "attention": "model.layers.*.self_attn"},
}


def targets(family: str) -> dict[str, str]:
    return TARGETS.get(family, TARGETS["default"])


def build_family_model(family: str, vocab_size: int, seed: int = 0):
    import transformers
    from transformers import AutoModelForCausalLM

    name, extra = FAMILIES[family]
    config = getattr(transformers, name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=True, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_family_teacher(family: str, path: Path) -> str:
    """A directory with the tiny ``family`` model and the test tokenizer, as ``load_causal_lm`` reads it."""
    tokenizer = build_tokenizer()
    build_family_model(family, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_perturbed(teacher_dir: str, path: Path, seed: int = 7) -> str:
    """The teacher's safetensors with every weight moved: a ``zoo.Transplant`` source that differs from it."""
    from safetensors.torch import load_file, save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for file in Path(teacher_dir).glob("*.safetensors"):
        tensors = load_file(str(file))
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in tensors.items()}, str(path / file.name))
    return str(path)


def save_basis(teacher_dir: str, pattern: str, path: Path) -> str:
    """A universal basis over the modules ``pattern`` names, from a bank of three random adapters."""
    from test_universal_basis import random_adapter
    from zoo.core.models import load_causal_lm
    from zoo.core.targets import find_targets
    from zoo.universal_basis import DeltaBank, extract_basis

    model = load_causal_lm(teacher_dir)[0]
    shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features)
              for n in find_targets(model, pattern)}
    bank = DeltaBank([random_adapter(path / f"a{i}", shapes, seed=i) for i in range(3)])
    return str(extract_basis(bank, "separate").save(path / "basis.safetensors"))
