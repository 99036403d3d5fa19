"""The one cache: hits reuse, and every kind of bad entry is reported, moved aside and rebuilt, never used."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zoo.core.cache import Entry, tensor_digest


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def compute_counter():
    calls = []

    def compute():
        calls.append(1)
        return {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4, dtype=torch.float64)}, {"targets": ["x"]}

    return compute, calls


def test_a_stored_entry_is_reused_with_its_tensors_and_extra():
    compute, calls = compute_counter()
    first = Entry("stats", model="m", tokens=8).get(compute)
    second = Entry("stats", model="m", tokens=8).get(compute)
    assert len(calls) == 1
    assert second[1] == {"targets": ["x"]}
    assert all(torch.equal(first[0][k], second[0][k]) for k in first[0])


def test_other_inputs_make_another_entry():
    compute, calls = compute_counter()
    Entry("stats", model="m", tokens=8).get(compute)
    Entry("stats", model="m", tokens=16).get(compute)
    assert len(calls) == 2


def _tamper(entry: Entry, how: str) -> None:
    path = entry.path
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "garbage":
        path.write_bytes(b"\x00not a safetensors file at all")
    elif how == "wrong numbers":  # valid framing and header, other tensor values
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["a"] = tensors["a"] + 1e-3
        save_file(tensors, str(path), metadata=meta)
    elif how == "other inputs":  # an entry that claims this key but was computed from something else
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta["inputs"] = json.dumps({"model": "other", "tokens": 8}, sort_keys=True)
        save_file(tensors, str(path), metadata=meta)
    elif how == "foreign":  # a safetensors file of another program
        save_file({"a": torch.zeros(1)}, str(path))


@pytest.mark.parametrize("how", ["truncated", "garbage", "wrong numbers", "other inputs", "foreign"])
def test_a_bad_entry_is_reported_moved_aside_and_rebuilt(how, caplog):
    compute, calls = compute_counter()
    entry = Entry("stats", model="m", tokens=8)
    good, _ = entry.get(compute)
    _tamper(entry, how)
    with caplog.at_level(logging.WARNING, logger="zoo.core.cache"):
        tensors, extra = Entry("stats", model="m", tokens=8).get(compute)
    assert len(calls) == 2, "the bad entry must not be used"
    assert torch.equal(tensors["a"], good["a"]) and extra == {"targets": ["x"]}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(entry.path) in warnings[0] and "rebuilding" in warnings[0]
    assert entry.path.with_name(entry.path.name + ".corrupt").is_file()
    # the rebuilt entry is whole again: the next read is a hit
    assert Entry("stats", model="m", tokens=8).load() is not None


def test_digest_sees_dtype_shape_and_name():
    t = torch.arange(4.0)
    base = tensor_digest({"a": t})
    assert tensor_digest({"a": t.double()}) != base
    assert tensor_digest({"a": t.view(2, 2)}) != base
    assert tensor_digest({"b": t}) != base
    assert tensor_digest({"a": t.clone()}) == base


def test_an_interrupted_write_leaves_no_entry_and_no_temp_file(cache_dir, monkeypatch):
    import zoo.core.cache as cache

    def torn(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "save_file", torn)
    entry = Entry("stats", model="m")
    with pytest.raises(KeyboardInterrupt):
        entry.store({"a": torch.zeros(2)})
    assert not entry.path.exists()
    assert list(entry.path.parent.iterdir()) == []


def test_free_space_is_checked_against_what_will_be_written(tmp_path):
    import shutil

    from zoo.core.cache import check_free_space
    from zoo.core.errors import ZooError

    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "not" / "yet", 1024, "a small file")  # a missing folder: its parent's disk
    with pytest.raises(ZooError, match="only .* MiB are free"):
        check_free_space(tmp_path / "not" / "yet", free * 2, "a huge file")
