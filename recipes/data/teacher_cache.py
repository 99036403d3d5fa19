"""The teacher-logit cache (issue 9, "Teacher-logit cache"): the teacher's top-k distribution on a
DataModule's train split, computed once in shards (safetensors, resumable, split across processes
under ddp/fsdp) so training batches carry it and repair skips the teacher forward."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zoo.core.distributed import all_true, rank_world
from zoo.core.models import load_causal_lm

from .config import FORMAT_VERSION, TEACHER_CACHE_KEYS, _hash, _together, teacher_on

log = logging.getLogger("recipes.data")


class TeacherLogitCache:
    """The teacher-logit cache of a ``TokenDataModule`` (its base class): reads the module's
    ``teacher_logits`` settings, ``teacher``, ``n_train``, ``data_key()``, ``data_root``, ``split_tensors``
    and ``generation_device()``; keeps the loaded cache in ``_teacher_cache``."""

    def teacher_cache_dir(self) -> Path:
        """Where the train split's cached teacher distribution lives (keyed by the data and the settings)."""
        key = _hash({"format": FORMAT_VERSION, "data": self.data_key(), "split": "train", "teacher": self.teacher,
                     "settings": asdict(self.teacher_logits)})
        return self.data_root / "teacher_logits" / f"{type(self).__name__}-{key}"

    def teacher_cache(self) -> dict[str, torch.Tensor]:
        """The train split's cached teacher distribution: ``TEACHER_CACHE_KEYS`` -> [n_train, seq_len-1, ...].

        Computed once with the teacher in shards of ``teacher_logits.batch_size`` blocks (safetensors,
        written atomically; existing shards are kept, so an interrupted run resumes). Under ddp/fsdp
        each process computes shards i mod world == rank, then every process loads all of them.
        """
        if self._teacher_cache is not None:
            return self._teacher_cache
        from safetensors.torch import load_file

        cfg = self.teacher_logits
        root = self.teacher_cache_dir()
        n = self.n_train
        shards = [(start, min(start + cfg.batch_size, n)) for start in range(0, n, cfg.batch_size)]
        paths = [root / f"shard-{i:05d}.safetensors" for i in range(len(shards))]
        if not all_true(all(p.is_file() for p in paths)):
            rank, world = rank_world()
            todo = [i for i, p in enumerate(paths) if i % world == rank and not p.is_file()]
            _together(lambda: self._compute_teacher_shards([shards[i] for i in todo], [paths[i] for i in todo]),
                      "computing its share of the teacher-logit cache")
        parts = [load_file(str(p)) for p in paths]
        self._teacher_cache = {k: torch.cat([part[k] for part in parts]) for k in TEACHER_CACHE_KEYS}
        return self._teacher_cache

    def _compute_teacher_shards(self, shards: list[tuple[int, int]], paths: list[Path]) -> None:
        if not shards:
            return
        from zoo.core.cache import atomic_save
        from zoo.core.losses import teacher_top_k

        cfg = self.teacher_logits
        ids = self.split_tensors("train")["input_ids"]
        model, _ = load_causal_lm(self.teacher, cfg.dtype)
        device = self.generation_device()
        top_k = min(cfg.top_k, model.config.vocab_size)
        log.info("teacher-logit cache: top-%d of %d blocks on %s into %s", top_k,
                 sum(b - a for a, b in shards), device, self.teacher_cache_dir())
        with teacher_on(model, device), tqdm(total=sum(b - a for a, b in shards), desc="teacher logits",
                                             unit="block") as bar:
            for (start, stop), path in zip(shards, paths):
                block = ids[start:stop].long().to(device)
                logits = model(input_ids=block, attention_mask=torch.ones_like(block)).logits[:, :-1]
                top_logp, top_ids, rest_logp = teacher_top_k(logits, top_k, cfg.temperature)
                tensors = {"teacher_top_logp": top_logp, "teacher_top_ids": top_ids.to(torch.int32),
                           "teacher_rest_logp": rest_logp}
                atomic_save({k: v.cpu().contiguous() for k, v in tensors.items()}, path,
                            {"zoo_format": "teacher_logits/1", "rows": json.dumps([start, stop])})
                bar.update(stop - start)
