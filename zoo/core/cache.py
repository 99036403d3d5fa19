"""The zoo's one on-disk cache: key -> lookup -> atomic write, for every computed artifact.

Calibration statistics, spectra, duel activations and interface tables are costly to compute and
cheap to reuse, so each is stored once under ``cache_root()/<kind>/<key>.safetensors``. An entry is
trusted only if it proves itself: its header carries the inputs its key was made from and a SHA-256
of its tensors, and both are checked on every read. A torn, truncated or edited entry, or one whose
inputs differ (a key collision, an older layout), is reported in one line, moved aside as
``<name>.corrupt`` for inspection and rebuilt — never used. ``Entry`` is a safetensors file the zoo writes;
``DirEntry`` a directory another library writes (a GGUF teacher converted by transformers), proven by a
manifest of its files' sizes and SHA-256s; ``move_aside`` is the one way any unusable entry is set aside.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
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


def move_aside(path: Path, why: str, what: str = "cache entry", then: str = "rebuilding it") -> None:
    """Report an unusable cache file or directory in one line and move it to ``<name>.corrupt`` (replacing an
    older one there), where it is kept for inspection and never read again."""
    path = Path(path)
    aside = path.with_name(path.name + ".corrupt")
    try:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)  # os.replace cannot put a directory onto a non-empty one
        os.replace(path, aside)
        where = f"moved to {aside}"
    except OSError as exc:
        where = f"could not be moved aside ({exc.strerror})"
    log.warning("%s %s is unusable (%s): %s; %s", what, path, why, where, then)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Entry:
    """One cache entry: ``Entry(kind, **inputs)`` names it (under ``root``, default ``cache_root()``);
    ``load`` / ``store`` / ``get`` use it."""

    def __init__(self, kind: str, root: str | Path | None = None, **inputs):
        self.kind, self.inputs = kind, inputs
        self.path = Path(root or cache_root()) / kind / f"{cache_key(kind=kind, **inputs)}.safetensors"

    def _reject(self, why: str) -> None:
        move_aside(self.path, why)

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


DIR_FORMAT = "zoo_cache_dir/1"


class DirEntry:
    """A cache entry that is a directory of files written by another library: ``DirEntry(path, **inputs)``.
    ``store(write)`` has ``write(tmp)`` fill a temp directory, records ``inputs`` and every file's size and
    SHA-256 in ``MANIFEST`` and renames it into place; ``load`` returns the path only if all of it checks out.
    Hashing reads every byte (about a second per GB), once per process while the files stay unchanged."""

    MANIFEST = "zoo_manifest.json"
    _verified: dict[Path, tuple] = {}  # path -> the (name, size, mtime) of the files this process checked

    def __init__(self, path: str | Path, **inputs):
        self.path, self.inputs = Path(path), inputs

    def _stamp(self) -> tuple:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.path.iterdir()))

    def _problem(self) -> str | None:
        """Why the entry cannot be used, or None."""
        try:
            manifest = json.loads((self.path / self.MANIFEST).read_text())
        except FileNotFoundError:
            return f"no {self.MANIFEST}: written before the zoo checked it, or an interrupted write"
        except (OSError, ValueError) as exc:
            return f"{self.MANIFEST} unreadable: {exc}"
        if not isinstance(manifest, dict) or manifest.get("zoo_format") != DIR_FORMAT:
            return f"{self.MANIFEST} is not a {DIR_FORMAT} manifest"
        if manifest.get("inputs") != _canonical(self.inputs):
            return "it was computed from other inputs"
        for name, (size, digest) in manifest.get("files", {}).items():
            path = self.path / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or overwritten)"
            if file_digest(path) != digest:
                return f"{name} does not match its checksum"
        return None

    def load(self) -> Path | None:
        """The directory if it exists and checks out; None (after moving a bad one aside) else."""
        if not self.path.is_dir():
            return None
        stamp = self._stamp()
        if self._verified.get(self.path) == stamp:
            return self.path
        why = self._problem()
        if why is not None:
            move_aside(self.path, why)
            return None
        self._verified[self.path] = stamp
        return self.path

    def store(self, write: Callable[[Path], object]) -> Path:
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write(tmp)
            files = {p.name: [p.stat().st_size, file_digest(p)] for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"zoo_format": DIR_FORMAT, "inputs": _canonical(self.inputs), "files": files}
            (tmp / self.MANIFEST).write_text(json.dumps(manifest, indent=1))
            if not self.path.exists():  # another process may have written it meanwhile
                tmp.replace(self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the loser of a race, or an interrupted write
        return self.path


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
    from .errors import ZooError

    path = Path(directory).expanduser()
    while not path.exists() and path != path.parent:  # the nearest existing folder: the same file system
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < need * 1.1:
        raise ZooError(f"{what} need {need / 2**20:.1f} MiB in {str(Path(directory))!r} but only "
                       f"{free / 2**20:.1f} MiB are free; free some space or point ZOO_CACHE elsewhere")
