"""zoo.core.seeds reproduces each seed derivation the frames and bases were built with, and
zoo.core.record keeps a module's inputs: whole blocks, or the real tokens by the attention mask."""
import hashlib
import json
import zlib

import pytest
import torch

from zoo.core.errors import ZooError
from zoo.core.record import Recorder, record
from zoo.core.seeds import SCHEMES, derive_seed, generator

LABELS = [("model.layers.0.mlp.down_proj", "input"), ("coupled", "a", "b"), ("permuted_hadamard", "in", 96)]


@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("seed", [0, 3, 12345])
def test_each_scheme_is_the_derivation_it_replaced(seed, labels):
    text = ":".join(map(str, (seed, *labels)))
    assert derive_seed(seed, *labels) == zlib.crc32(text.encode()) & 0x7FFFFFFF  # zoo.phd frame_seed
    digest = hashlib.sha256(json.dumps([seed, *labels]).encode()).digest()  # the basis duel's frames
    assert derive_seed(seed, *labels, scheme="sha256") == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert derive_seed(seed, *labels, scheme="sha256_32") == int.from_bytes(
        hashlib.sha256(text.encode()).digest()[:4], "little")  # the duel's sigma tuning
    key = ":".join(map(str, labels))  # the universal basis's random control
    assert derive_seed(seed, key, scheme="affine") == seed * 1_000_003 + zlib.crc32(key.encode())


def test_pinned_seeds_and_generators():
    assert derive_seed(0, "model.layers.0.mlp.down_proj", "input") == 1564805092
    assert derive_seed(3, "permuted_hadamard", "in", 96, scheme="sha256") == 6009216063291868792
    assert derive_seed(0, "covariance", scheme="sha256_32") == 205983164
    assert derive_seed(2, "m:A", scheme="affine") == 2606412452
    assert derive_seed(2, "", scheme="affine") == 2 * 1_000_003
    for scheme in SCHEMES:
        assert derive_seed(7, scheme=scheme) == 7  # no labels: the seed itself
    plain = torch.Generator().manual_seed(7)
    assert torch.equal(torch.randn(5, generator=generator(7)), torch.randn(5, generator=plain))
    with pytest.raises(ZooError, match="crc32"):
        derive_seed(0, "x", scheme="md5")


def test_record_keeps_blocks_or_real_tokens_and_stops_early(tiny_model):
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    site = "model.layers.1.input_layernorm"
    with torch.no_grad():
        hidden = tiny_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    got_ids, blocks = record(tiny_model, site, batches, stop=True, masked=False)
    assert torch.equal(got_ids, ids) and blocks.shape == hidden.shape and blocks.dtype == torch.float32
    assert torch.allclose(blocks, hidden.float(), atol=1e-5)
    _, rows = record(tiny_model, site, batches)
    assert torch.allclose(rows, hidden[mask.bool()].float(), atol=1e-5) and len(rows) == 13
    with Recorder(tiny_model, site) as recorder, torch.no_grad():  # passes driven by someone else
        for batch in recorder.track(batches):
            tiny_model(**batch)
        assert torch.allclose(recorder.rows(), rows)
    with pytest.raises(ZooError, match="no batches"):
        record(tiny_model, site, [])
