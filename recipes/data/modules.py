"""The DataModules: ``TokenDataModule`` (splitting, packing, caching and loaders), and the thin
``CodeDataModule``, ``HologramDataModule`` and ``DistillationDataModule`` (the 50/50 mix the source
standardizes on, 000 section 2.5), each of which only says which documents it draws and in what share."""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from zoo.core.cache import Entry
from zoo.core.distributed import all_true, rank_world
from zoo.core.errors import ZooError, check_at_least, check_choice
from zoo.core.models import DEFAULT_TEACHER, cache_root, load_tokenizer

from .code_corpus import code_documents, code_fingerprint
from .config import (
    FORMAT_VERSION,
    SPLITS,
    CodeConfig,
    HologramConfig,
    TeacherLogitsConfig,
    _check_range,
    _hash,
    _together,
    validate_code_config,
    validate_hologram_config,
    validate_teacher_logits_config,
)
from .hologram import hologram_documents, hologram_key, hologram_samples
from .packing import PackedDataset, ResumedLoader, Source, packed_splits, store_packed
from .teacher_cache import TeacherLogitCache


#: the smallest value of each size option of a ``TokenDataModule``
LEAST = {"seq_len": 2, "batch_size": 1, "n_calibration": 1, "n_train": 1, "n_heldout": 1, "num_workers": 0}


def check_teacher_logits(model_init: dict, data_init: dict) -> None:
    """A cached teacher distribution is softened at the temperature the repair distills at (parsed config)."""
    cached = data_init.get("teacher_logits")
    if cached is None:
        return
    want, have = model_init.get("temperature", 1.0), cached["temperature"]
    if have != want:
        raise ZooError(f"data.teacher_logits.temperature={have} differs from the model's distillation "
                       f"temperature={want}; set them equal")


def check_data_options(**options) -> None:
    """A one-line ZooError for a size option out of range (those of ``options`` that are given): the data
    module checks its own, and ``zoo fit`` checks the parsed config with it before the teacher loads."""
    for name, least in LEAST.items():
        check_at_least(least, "data ", **{name: options.get(name)})
    check_at_least(1, "data ", max_repeat=options.get("max_repeat"))  # 1: never repeat a document


class TokenDataModule(TeacherLogitCache, L.LightningDataModule):
    """Packed token blocks for distillation, split into calibration / train / heldout (source 000, section 2.5).

    Subclasses say which documents to draw (``_sources``) and what identifies them
    (``_config``, ``_source_fingerprints``); splitting, packing, caching and loaders live here. The packed
    splits are cached under ``cache_dir/packed/`` keyed by everything that determines them, so a second
    run and ``zoo validate`` read identical data.

    Args:
        teacher: the teacher model (embedded alias, directory, .gguf or hub id); its tokenizer
            tokenizes and, for hologram data, it generates.
        seq_len: tokens per packed block.
        batch_size: blocks per batch.
        n_calibration: blocks in the calibration split.
        n_train: blocks in the train split.
        n_heldout: blocks in the heldout split (validation and test); disjoint from train by document.
        seed: seeds file choice, sampling, the split and the train order.
        cache_dir: where packed splits and hologram samples are cached (default: ``<zoo cache>/data``).
        num_workers: DataLoader workers.
        max_repeat: how many times a source may repeat its documents within a split when it has too few
            (1: never; not enough data is an error).
        teacher_logits: precompute the teacher's top-k distribution on the train split (cached, resumable)
            so training batches carry it and repair skips the teacher forward; an approximation of
            the exact KL (see ``TeacherLogitsConfig``). None (default): the exact KL, teacher forward
            every step.
    """

    def __init__(
        self,
        teacher: str = DEFAULT_TEACHER,
        seq_len: int = 256,
        batch_size: int = 4,
        n_calibration: int = 32,
        n_train: int = 256,
        n_heldout: int = 16,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        max_repeat: float = 1.0,
        teacher_logits: TeacherLogitsConfig | None = None,
        heldout_data: TokenDataModule | None = None,
    ):
        super().__init__()
        if heldout_data is not None:
            heldout_data.teacher = teacher  # the same teacher scores both: the KL is to this student's teacher
        self.heldout_data = heldout_data
        if teacher_logits is not None:
            validate_teacher_logits_config(teacher_logits)
        self.teacher_logits = teacher_logits
        self._teacher_cache: dict[str, torch.Tensor] | None = None
        check_data_options(seq_len=seq_len, batch_size=batch_size, n_calibration=n_calibration, n_train=n_train,
                           n_heldout=n_heldout, num_workers=num_workers, max_repeat=max_repeat)
        self.teacher = teacher
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.n_calibration = n_calibration
        self.n_train = n_train
        self.n_heldout = n_heldout
        self.seed = seed
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.max_repeat = max_repeat
        self._splits: dict[str, dict[str, torch.Tensor]] | None = None
        self._source_names: list[str] = []
        self.resume_skip = 0  # batches of the next train pass already trained on (set by callbacks.Resume)

    # --- what subclasses provide

    def _config(self) -> dict:
        """The subclass's own settings (JSON-serializable)."""
        return {}

    def _source_fingerprints(self) -> dict:
        """Cheap identities of the underlying sources (file stats, dataset fingerprints, ...)."""
        return {}

    def _sources(self, tokenizer) -> list[Source]:
        raise NotImplementedError

    # --- shared machinery

    @property
    def blocks(self) -> dict[str, int]:
        return {"heldout": self.n_heldout, "calibration": self.n_calibration, "train": self.n_train}

    @property
    def data_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else cache_root() / "data"

    def data_inputs(self) -> dict:
        """Everything that determines the packed splits (batching and workers excluded)."""
        return {
            "format": FORMAT_VERSION, "class": type(self).__name__, "teacher": self.teacher,
            "seq_len": self.seq_len, "blocks": self.blocks, "seed": self.seed, "max_repeat": self.max_repeat,
            "config": self._config(), "sources": self._source_fingerprints(),
        }

    def data_key(self) -> str:
        return _hash(self.data_inputs())

    def generation_device(self) -> torch.device:
        """The attached trainer's root device, else the CPU."""
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def prepare_data(self) -> None:
        # Lightning runs prepare_data in one process per node; under ddp/fsdp the data is built in
        # setup instead, where every process takes part (hologram generation is split across them)
        if rank_world()[1] == 1:
            self._ensure_data()

    def setup(self, stage: str | None = None) -> None:
        self._ensure_data()
        if self.teacher_logits is not None and stage == "fit" and getattr(self, "trainer", None) is not None:
            # now, while the teacher is still pristine and shared (the module's surgery comes after)
            self.teacher_cache()

    def _generate_share(self, rank: int, world: int) -> None:
        """Under ddp/fsdp: generate this process's share of any teacher-generated documents (into
        their cache) before rank 0 packs the splits. Sources that only read files need nothing."""

    def _ensure_data(self) -> None:
        if self._splits is not None:
            return
        entry = Entry("packed", root=self.data_root, **self.data_inputs())
        rank, world = rank_world()
        hit = entry.load()
        # every process agrees whether to build; then each generates its share and rank 0 packs
        if not all_true(hit is not None):
            if world > 1:
                _together(lambda: self._generate_share(rank, world), "generating its share of the data")
            _together(lambda: self._build(entry) if rank == 0 else None, "building the data")
            hit = entry.load()
            if hit is None:
                raise ZooError(f"the packed data {entry.path} could not be read back after it was built")
        tensors, meta = hit
        self._source_names = meta["sources"]
        self._splits = packed_splits(tensors)

    def _build(self, entry: Entry) -> None:
        """Draw the documents, split and pack them, and store the splits in the cache ``entry``."""
        tokenizer = load_tokenizer(self.teacher)
        store_packed(entry, self._sources(tokenizer), self.blocks, self.seq_len, tokenizer.eos_token_id, self.seed,
                     self.max_repeat)

    def split_tensors(self, split: str) -> dict[str, torch.Tensor]:
        """The packed tensors of ``split``: ``input_ids``, ``loss_mask`` and ``source`` ([n, seq_len])."""
        check_choice("split", split, SPLITS)
        self._ensure_data()
        return self._splits[split]

    def fingerprint(self, split: str) -> str:
        """Short stable hash of ``split``'s tokens and loss mask (a cache key for calibration statistics).

        It hashes the packed content itself, so it changes exactly when the split's data does (e.g.
        not when only ``n_train`` changes, for the heldout split). Builds the data if needed.
        """
        t = self.split_tensors(split)
        h = hashlib.sha256(split.encode())
        for col in ("input_ids", "loss_mask"):
            h.update(t[col].to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]

    def token_shares(self, split: str) -> dict[str, float]:
        """Share of ``split``'s tokens that came from each source."""
        src = self.split_tensors(split)["source"]
        return {name: float((src == i).float().mean()) for i, name in enumerate(self._source_names)}

    def _dataset(self, split: str) -> PackedDataset:
        t = self.split_tensors(split)
        extra = self.teacher_cache() if split == "train" and self.teacher_logits is not None else None
        return PackedDataset(t["input_ids"], t["loss_mask"], extra)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if not shuffle:
            return DataLoader(self._dataset(split), batch_size=self.batch_size, num_workers=self.num_workers)
        # One order for any number of processes: epoch e is randperm(n) seeded with seed + e (Lightning
        # calls set_epoch), and process r of w takes its positions r, r + w, ... So the w batches of
        # a data-parallel step together hold the single-process batch of w * batch_size blocks.
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        dataset = self._dataset(split)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        loader = ResumedLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
        skip, self.resume_skip = self.resume_skip, 0
        loader.skip = skip if skip < len(loader) else 0
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return (self if self.heldout_data is None else self.heldout_data)._loader("heldout")

    def test_dataloader(self) -> DataLoader:
        return (self if self.heldout_data is None else self.heldout_data)._loader("heldout")

    def calibration_dataloader(self) -> DataLoader:
        return self._loader("calibration")


_CODE_HINT = "add code: raise code.max_files / code.max_chars_per_file or point code.source at a larger tree"
_HOLOGRAM_HINT = "generate more: raise hologram.n_samples or hologram.max_new_tokens"


class CodeDataModule(TokenDataModule):
    """Code (or instruction data, response-only) for distillation (source 000, section 2.5).

    Args:
        code: where the documents come from (see ``CodeConfig``); default: the Python standard library.
    """

    def __init__(self, code: CodeConfig = CodeConfig(), **kwargs):
        super().__init__(**kwargs)
        validate_code_config(code)
        self.code = code

    def _config(self) -> dict:
        return {"code": asdict(self.code)}

    def _source_fingerprints(self) -> dict:
        return {"code": code_fingerprint(self.code, self.seed)}

    def _sources(self, tokenizer) -> list[Source]:
        return [Source("code", 1.0, code_documents(self.code, tokenizer, self.seed), _CODE_HINT)]


class HologramDataModule(TokenDataModule):
    """Teacher-generated samples, the source's Dreamer/Hologram (000, sections 2.5 and 4.3).

    Args:
        hologram: the sampling settings (see ``HologramConfig``).
    """

    def __init__(self, hologram: HologramConfig = HologramConfig(), **kwargs):
        super().__init__(**kwargs)
        validate_hologram_config(hologram)
        self.hologram = hologram

    def _config(self) -> dict:
        return {"hologram": asdict(self.hologram)}

    def _source_fingerprints(self) -> dict:
        return {"hologram": _hash(hologram_key(self.hologram, self.teacher, self.seed))}

    def _sources(self, tokenizer) -> list[Source]:
        docs = hologram_documents(self.hologram, self.teacher, self.seed, self.data_root, self.generation_device())
        return [Source("hologram", 1.0, docs, _HOLOGRAM_HINT)]

    def _generate_share(self, rank: int, world: int) -> None:
        hologram_samples(self.hologram, self.teacher, self.seed, self.data_root, self.generation_device(),
                         share=(rank, world))


class DistillationDataModule(TokenDataModule):
    """The repair mix: code + hologram by tokens, 50/50 by default (source 000, section 2.5).

    Every split (calibration, train, heldout) gets the same mix.

    Args:
        code_fraction: share of each split's tokens that are code; the rest is hologram.
        code: the code documents (see ``CodeConfig``).
        hologram: the hologram samples (see ``HologramConfig``).
    """

    def __init__(self, code_fraction: float = 0.5, code: CodeConfig = CodeConfig(),
                 hologram: HologramConfig = HologramConfig(), **kwargs):
        super().__init__(**kwargs)
        _check_range("code_fraction", code_fraction, 0.0, 1.0)
        validate_code_config(code)
        validate_hologram_config(hologram)
        self.code_fraction = code_fraction
        self.code = code
        self.hologram = hologram

    def _config(self) -> dict:
        return {"code_fraction": self.code_fraction, "code": asdict(self.code), "hologram": asdict(self.hologram)}

    def _source_fingerprints(self) -> dict:
        fps = {}
        if self.code_fraction > 0:
            fps["code"] = code_fingerprint(self.code, self.seed)
        if self.code_fraction < 1:
            fps["hologram"] = _hash(hologram_key(self.hologram, self.teacher, self.seed))
        return fps

    def _sources(self, tokenizer) -> list[Source]:
        sources = []
        if self.code_fraction > 0:
            sources.append(Source("code", self.code_fraction, code_documents(self.code, tokenizer, self.seed),
                                  _CODE_HINT))
        if self.code_fraction < 1:
            docs = hologram_documents(self.hologram, self.teacher, self.seed, self.data_root,
                                      self.generation_device())
            sources.append(Source("hologram", 1.0 - self.code_fraction, docs, _HOLOGRAM_HINT))
        return sources

    def _generate_share(self, rank: int, world: int) -> None:
        if self.code_fraction < 1:
            hologram_samples(self.hologram, self.teacher, self.seed, self.data_root, self.generation_device(),
                             share=(rank, world))
