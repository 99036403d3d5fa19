"""Validation of a model's ``config.json`` before anything is built from it.

transformers fills a missing field with its class default (a ``config.json`` without ``num_hidden_layers``
becomes a 32-layer Llama) and takes a string or a negative size as given, so a damaged config ends in a
shape error deep in a load, a plan or a surgery, 100 lines down. ``check_model_config`` is the one check
every path that reads a config makes first (``zoo.core.models``: the teacher, ``random:`` and ``meta:``
models, ``zoo plan``): a zoo teacher is a Llama-style decoder, which names these sizes.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ZooError

#: the sizes every Llama-style decoder's config names: positive integers
REQUIRED_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
#: sizes that may be absent or null, and must be positive integers otherwise
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _size(config: dict, name: str, where: str, required: bool) -> None:
    value = config.get(name)
    if value is None:
        if required:
            raise ZooError(f"{where} has no {name} (a Llama-style decoder's config names {', '.join(REQUIRED_SIZES)})")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ZooError(f"{where}: {name} is {value!r} ({type(value).__name__}); it must be a positive integer")
    if value <= 0:
        raise ZooError(f"{where}: {name} is {value}; it must be a positive integer")


def check_model_config(config: dict, where: str) -> dict:
    """``config`` (the parsed ``config.json``; a multimodal one's ``text_config`` is what the zoo reads) if
    its sizes and ``model_type`` are usable; else a one-line ZooError naming ``where`` and the field."""
    if not isinstance(config, dict):
        raise ZooError(f"{where} is not a JSON object (it holds a {type(config).__name__})")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ZooError(f"{where}: model_type is {model_type!r}; it must be a string")
    text = config.get("text_config")
    sizes = text if isinstance(text, dict) and "hidden_size" not in config else config
    for name in REQUIRED_SIZES:
        _size(sizes, name, where, required=True)
    for name in OPTIONAL_SIZES:
        _size(sizes, name, where, required=False)
    heads, kv = sizes["num_attention_heads"], sizes.get("num_key_value_heads")
    if kv is not None and heads % kv:
        raise ZooError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return config


def read_model_config(path: str | Path) -> dict:
    """The checked contents of the ``config.json`` at ``path`` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZooError(f"{str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ZooError(f"{str(path)!r} is not a readable JSON config: {str(exc).splitlines()[0]}") from None
    return check_model_config(config, str(path))
