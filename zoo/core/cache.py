"""The zoo's one on-disk cache: key -> lookup -> atomic write, for every computed artifact.

Calibration statistics, spectra, duel activations and interface tables are costly to compute and
cheap to reuse, so each is stored once under ``cache_root()/<kind>/<key>.safetensors``. An entry is
trusted only if it proves itself: its header carries the inputs its key was made from and a SHA-256
of its tensors, and both are checked on every read. A torn, truncated or edited entry, or one whose
inputs differ (a key collision, an older layout), is reported in one line, moved aside as
``<name>.corrupt`` for inspection and rebuilt — never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT = "zoo_cache/1"
Tensors = dict[str, torch.Tensor]


def cache_root() -> Path:
    """Root of the zoo's on-disk caches (``ZOO_CACHE`` or ``~/.cache/zoo``)."""
    return Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo"))


def _canonical(inputs: dict) -> str:
    return json.dumps(inputs, sort_keys=True, default=str)


def cache_key(**inputs) -> str:
    """Stable short hash of the JSON-serializable ``inputs`` that determine a result."""
    return hashlib.sha256(_canonical(inputs).encode()).hexdigest()[:20]


def tensor_digest(tensors: Tensors) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a temp file beside ``path``, then rename it onto ``path``: an interruption never
    leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_save(tensors: Tensors, path: str | Path, metadata: dict[str, str]) -> Path:
    """safetensors save through a temp file and rename: an interruption never leaves a torn file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """A text file (JSON, Markdown) written through a temp file and rename, as ``atomic_save``."""
    return _atomic_write(path, lambda tmp: tmp.write_text(text))


class Entry:
    """One cache entry: ``Entry(kind, **inputs)`` names it (under ``root``, default ``cache_root()``);
    ``load`` / ``store`` / ``get`` use it."""

    def __init__(self, kind: str, root: str | Path | None = None, **inputs):
        self.kind, self.inputs = kind, inputs
        self.path = Path(root or cache_root()) / kind / f"{cache_key(kind=kind, **inputs)}.safetensors"

    def _reject(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + ".corrupt")
        try:
            os.replace(self.path, aside)
            where = f"moved to {aside}"
        except OSError as exc:
            where = f"could not be moved aside ({exc.strerror})"
        log.warning("cache entry %s is unusable (%s): %s; rebuilding it", self.path, why, where)

    def load(self) -> tuple[Tensors, dict] | None:
        """(tensors, metadata) if the entry exists and checks out; None (after moving a bad one aside) else."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(self.path))
        except (SafetensorError, OSError, ValueError) as exc:
            self._reject(f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            return None
        if meta.get("zoo_format") != FORMAT:
            self._reject(f"format {meta.get('zoo_format')!r}, expected {FORMAT!r}")
            return None
        if meta.get("inputs") != _canonical(self.inputs):
            self._reject("it was computed from other inputs")
            return None
        if meta.get("digest") != tensor_digest(tensors):
            self._reject("its tensors do not match their checksum")
            return None
        extra = json.loads(meta.get("extra", "{}"))
        log.info("%s: cache hit %s", self.kind, self.path)
        return tensors, extra

    def store(self, tensors: Tensors, extra: dict | None = None) -> Path:
        meta = {"zoo_format": FORMAT, "kind": self.kind, "inputs": _canonical(self.inputs),
                "digest": tensor_digest(tensors), "extra": json.dumps(extra or {}, sort_keys=True, default=str)}
        return atomic_save(tensors, self.path, meta)

    def get(self, compute: Callable[[], tuple[Tensors, dict]], store: bool = True) -> tuple[Tensors, dict]:
        """The cached (tensors, extra), or ``compute()``'s, stored when ``store``."""
        hit = self.load()
        if hit is not None:
            return hit
        log.info("%s: cache miss, computing %s", self.kind, self.path.name)
        tensors, extra = compute()
        if store:
            self.store(tensors, extra)
        return tensors, extra


def check_writable(directory: str | Path, what: str = "output directory") -> Path:
    """``directory`` (created if missing) if a file can be written in it; else a one-line ZooError now,
    before any work whose result would have nowhere to go."""
    from .errors import ZooError

    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".zoo-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ZooError(f"{what} {str(path)!r} is not writable: {exc.strerror or exc}") from None
    return path


def check_free_space(directory: str | Path, need: int, what: str) -> None:
    """A one-line ZooError now if the file system of ``directory`` has less than ``need`` bytes free (with
    a 10% margin), before the work whose result would not fit."""
    import shutil

    from .errors import ZooError

    path = Path(directory).expanduser()
    while not path.exists() and path != path.parent:  # the nearest existing folder: the same file system
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < need * 1.1:
        raise ZooError(f"{what} need {need / 2**20:.1f} MiB in {str(Path(directory))!r} but only "
                       f"{free / 2**20:.1f} MiB are free; free some space or point ZOO_CACHE elsewhere")
