"""The converted-teacher cache (a GGUF teacher converted once to safetensors under ``ZOO_CACHE/models``) proves
itself like every other cache entry: a conversion with flipped bytes or cut short is reported in one line,
moved aside and made again from the GGUF, and the teacher it gives is the one the GGUF holds."""
from __future__ import annotations

import pytest
import torch

from tiny_gguf import write_tiny_gguf
from zoo.core import models


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    return str(write_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"))


def fresh_load(gguf: str):
    """The teacher's logits on a fixed input, loaded anew (no in-process memo)."""
    models._MODELS.clear()
    models.load_tokenizer.cache_clear()
    model, tokenizer = models.load_causal_lm(gguf)
    ids = tokenizer("def f(x):\n    return x + 1\n", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def conversion(tmp_path):
    (directory,) = [p for p in (tmp_path / "zoo_cache" / "models").glob("tiny-*") if p.suffix != ".corrupt"]
    return directory


@pytest.mark.parametrize("damage, why", [
    ("flip", "model.safetensors does not match its checksum"),
    ("truncate", "model.safetensors has"),
    ("manifest", "no zoo_manifest.json"),
])
def test_a_damaged_converted_teacher_is_detected_and_rebuilt(damage, why, tiny_gguf, tmp_path, caplog):
    want = fresh_load(tiny_gguf)
    directory = conversion(tmp_path)
    weights = directory / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    if damage == "flip":  # 64 bytes of tensor data: still a valid safetensors file, with other numbers
        raw[-200:-136] = bytes(b ^ 0x5A for b in raw[-200:-136])
        weights.write_bytes(bytes(raw))
    elif damage == "truncate":
        weights.write_bytes(bytes(raw[: len(raw) // 2]))
    else:  # a conversion made before the zoo recorded its content
        (directory / "zoo_manifest.json").unlink()

    caplog.clear()
    got = fresh_load(tiny_gguf)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and why in warnings[0] and "rebuilding" in warnings[0], warnings
    assert directory.with_name(directory.name + ".corrupt").is_dir()
    assert torch.equal(got, want)
    assert conversion(tmp_path) == directory and (directory / "zoo_manifest.json").is_file()


def test_an_intact_conversion_is_used_as_it_is(tiny_gguf, tmp_path, caplog):
    fresh_load(tiny_gguf)
    manifest = (conversion(tmp_path) / "zoo_manifest.json").stat().st_mtime_ns
    models.DirEntry._verified.clear()  # as a new process would: hash it again
    fresh_load(tiny_gguf)
    assert (conversion(tmp_path) / "zoo_manifest.json").stat().st_mtime_ns == manifest
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
