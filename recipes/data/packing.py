"""Splitting and packing, shared by every DataModule: documents are split into disjoint pools by
document, joined with EOS and cut into ``seq_len`` blocks; the packed splits live in the zoo cache
(``zoo.core.cache``, safetensors) and are served as batch dicts."""
from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.core.cache import Entry
from zoo.core.errors import ZooError

from .config import PACKED_COLUMNS, SPLITS, Document

log = logging.getLogger("recipes.data")


class Source(NamedTuple):
    """Documents of one kind and the share of tokens they get in every split."""

    name: str
    fraction: float
    documents: list[Document]
    hint: str  # how to get more of them, for the error message


def _doc_size(doc: Document, eos_id: int) -> int:
    """Tokens a document takes in a packed stream: its own, plus an EOS unless it ends with one."""
    return len(doc[0]) + (doc[0][-1] != eos_id)


def _deal(docs: list[Document], cursor: int, budget: int, eos_id: int,
          cut: bool = True) -> tuple[list[Document], int, int]:
    """Take documents from ``docs[cursor:]`` until they hold ``budget`` tokens; with ``cut`` the last one
    is cut to fit.

    Returns (documents, tokens held, new cursor). The cut-off rest of a document is dropped, so
    documents of different pools never share text.
    """
    taken, got = [], 0
    while cursor < len(docs) and got < budget:
        doc = docs[cursor]
        cursor += 1
        if cut and got + _doc_size(doc, eos_id) > budget:
            keep = budget - got
            doc = (doc[0][:keep], doc[1][:keep])
        taken.append(doc)
        got += _doc_size(doc, eos_id)
    return taken, got, cursor


def split_and_pack(sources: Sequence[Source], blocks: dict[str, int], seq_len: int, eos_id: int, seed: int,
                   max_repeat: float = 1.0) -> dict[str, dict[str, np.ndarray]]:
    """Split each source's documents into disjoint pools, then pack each split into blocks.

    Each source's documents are shuffled with the seed and dealt to the heldout, calibration and train
    pools in that order until each pool holds ``fraction * blocks[split] * seq_len`` tokens (counting
    one EOS separator per document; the last document dealt is cut to fit and its rest dropped), so
    each split gets the configured mix of tokens and no document is in two pools (a source short of
    data is dealt whole documents in proportion to the budgets instead). A source too small
    for that may repeat its documents within a pool up to ``max_repeat`` times; beyond that it is a
    ZooError naming the split and the settings to change. Each split's documents are
    then shuffled together, joined with EOS (a document that already ends with EOS gets none; the
    separator's loss mask is that of the document's last token) and cut into ``seq_len`` blocks.

    Returns per split ``input_ids`` [n, seq_len] int32, ``loss_mask`` int8 and ``source`` int8 (the
    index of the source each token came from).
    """
    pools: dict[str, list[tuple[Document, int]]] = {s: [] for s in SPLITS}
    for s_index, src in enumerate(sources):
        docs = [d for d in src.documents if d[0]]
        random.Random(f"shuffle:{seed}:{src.name}").shuffle(docs)
        total = sum(_doc_size(d, eos_id) for d in docs)
        budgets = {s: math.ceil(src.fraction * blocks[s] * seq_len) for s in SPLITS}
        need = sum(budgets.values())
        scale = min(1.0, total / need) if need else 1.0
        dealt, cursor = {}, 0
        for k, split in enumerate(SPLITS):
            if k == len(SPLITS) - 1 and scale < 1:  # short of data: the last pool takes the rest
                dealt[split] = docs[cursor:]
            else:  # when short of data, cut nothing off: every token is needed
                dealt[split], _, cursor = _deal(docs, cursor, math.ceil(budgets[split] * scale), eos_id,
                                                cut=scale >= 1)
        got = {split: sum(_doc_size(d, eos_id) for d in dealt[split]) for split in SPLITS}
        repeat = {split: budgets[split] / got[split] if got[split] else math.inf for split in SPLITS}
        worst = max(SPLITS, key=lambda split: repeat[split])
        if repeat[worst] > max_repeat + 1e-9:
            sizes = ", ".join(f"n_{s}={blocks[s]}" for s in sorted(SPLITS, key=lambda s: -blocks[s]))
            fix = f"set max_repeat >= {repeat[worst]:.2f} to reuse documents, " if total else ""
            raise ZooError(
                f"not enough {src.name} data: {total} tokens in {len(docs)} documents (~{total // seq_len} "
                f"blocks of seq_len={seq_len}), but {src.fraction:.0%} of {sum(blocks.values())} blocks "
                f"({sizes}) needs {need} (the {worst} split has {got[worst]} of its {budgets[worst]}). "
                f"Lower {sizes} or seq_len, {fix}or {src.hint}"
            )
        for split in SPLITS:
            taken = dealt[split]
            if got[split] < budgets[split]:  # repetition, as far as allowed
                log.warning("%s: the %s split repeats its %d documents %.2fx to fill %d tokens",
                            src.name, split, len(taken), repeat[split], budgets[split])
                cycled = [taken[i % len(taken)] for i in range((math.ceil(repeat[split]) + 1) * len(taken))]
                taken = _deal(cycled, 0, budgets[split], eos_id)[0]
            pools[split].extend((d, s_index) for d in taken)

    packed = {}
    for split in SPLITS:
        items = pools[split]
        random.Random(f"pack:{seed}:{split}").shuffle(items)
        n_tokens = blocks[split] * seq_len
        ids, mask, origin = [], [], []
        for (doc_ids, doc_mask), s_index in items:
            if len(ids) >= n_tokens:
                break
            ids.extend(doc_ids)
            mask.extend(doc_mask)
            if doc_ids[-1] != eos_id:
                ids.append(eos_id)
                mask.append(doc_mask[-1])
            origin.extend([s_index] * (len(ids) - len(origin)))
        if len(ids) < n_tokens:  # cannot happen when every source's budgets are met
            raise ZooError(f"the {split} split has {len(ids)} tokens, fewer than n_{split}*seq_len={n_tokens}")
        shape = (blocks[split], seq_len)
        packed[split] = {
            "input_ids": np.asarray(ids[:n_tokens], dtype=np.int32).reshape(shape),
            "loss_mask": np.asarray(mask[:n_tokens], dtype=np.int8).reshape(shape),
            "source": np.asarray(origin[:n_tokens], dtype=np.int8).reshape(shape),
        }
    return packed


class ResumedLoader(DataLoader):
    """A DataLoader whose next pass leaves out its first ``skip`` batches: a resumed run (``callbacks.Resume``
    sets it) continues the epoch's order where the interrupted run stopped. Later passes are whole."""

    skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        iterator = super().__iter__()
        if not skip:
            return iterator
        # the sampler's order is drawn at iteration start (set_epoch seeds it), so the same batches are left out
        return itertools.islice(iterator, skip, None)


class PackedDataset(Dataset):
    """Packed blocks as batch dicts: ``input_ids``, ``attention_mask`` (ones) and ``loss_mask``, all long."""

    def __init__(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, extra: dict[str, torch.Tensor] | None = None):
        self.input_ids = input_ids.long()
        self.loss_mask = loss_mask.long()
        self.attention_mask = torch.ones_like(self.input_ids)
        self.extra = extra or {}  # per-block tensors carried along (e.g. the cached teacher distribution)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "loss_mask": self.loss_mask[i], **{k: v[i] for k, v in self.extra.items()}}



def store_packed(entry: Entry, sources: Sequence[Source], blocks: dict[str, int], seq_len: int, eos_id: int,
                 seed: int, max_repeat: float) -> None:
    """Split and pack ``sources`` (``split_and_pack``) and store the splits in the zoo cache ``entry``: one
    tensor ``<split>/<column>`` per split and column, and the source names in the header."""
    t0 = time.perf_counter()
    packed = split_and_pack(sources, blocks, seq_len, eos_id, seed, max_repeat)
    log.info("packed %s in %.1fs", {s: v["input_ids"].shape for s, v in packed.items()},
             time.perf_counter() - t0)
    dtypes = {"input_ids": torch.int32, "loss_mask": torch.int8, "source": torch.int8}
    tensors = {f"{split}/{col}": torch.as_tensor(cols[col]).to(dtypes[col])
               for split, cols in packed.items() for col in PACKED_COLUMNS}
    entry.store(tensors, {"sources": [s.name for s in sources]})


def packed_splits(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The stored tensors of ``store_packed`` as split -> column -> tensor."""
    return {split: {col: tensors[f"{split}/{col}"] for col in PACKED_COLUMNS} for split in SPLITS}
