"""Repair-state I/O: trainable tensors only, in safetensors, with a JSON header (ZOMBORG, source 000,
section 2.4: repair states shrink checkpoints from >10 GB to ~1 MB).

The header names each part's spec (its registered name and version, ``zoo.core.registry``) and init args, and
the teacher. Loading checks these against the running student, so a state written for another technique, rank
or target set is refused with a message saying what differs; a state naming its spec by class path (written
before the registry) is read through the registry's table of those paths. (States written before the header
keyed on parts also name the LightningModule class under ``technique``; that entry is not checked, so they
still load.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .cache import atomic_save
from .errors import ZooError
from .registry import canonical_parts

FORMAT = "repair_state/1"
#: the one tensor of a state with nothing trained: safetensors 0.4 writes an empty file it cannot read back
EMPTY = "__zoo_empty__"


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    """Write ``tensors`` (detached to CPU, contiguous) with ``header`` atomically. Returns the path."""
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()} or {EMPTY: torch.zeros(0)}
    meta = {"zoo_format": FORMAT, **{k: json.dumps(v, sort_keys=True) for k, v in header.items()}}
    atomic_save(payload, path, meta)
    return Path(path)


def _metadata(path: Path, what: str, form: str) -> dict[str, str]:
    """The safetensors metadata of ``path`` if it is a ``form`` file; else a one-line ZooError naming it."""
    if not path.is_file():
        raise ZooError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ZooError(f"{str(path)!r} is not a safetensors file: {exc}") from None
    if meta.get("zoo_format") != form:
        raise ZooError(f"{str(path)!r} is not a zoo {what} (format {meta.get('zoo_format')!r}, expected {form!r})")
    return meta


def read_header(path: str | Path) -> dict:
    meta = _metadata(Path(path), "repair state", FORMAT)
    return {k: json.loads(v) for k, v in meta.items() if k != "zoo_format"}


#: header entries that states written before them lack, read as these values
HEADER_DEFAULTS = {"calibration": "once"}


def check_header(path: str | Path, expect: dict | None = None) -> dict:
    """The header of ``path``; with ``expect``, every key of it must equal the stored header's value."""
    header = {**HEADER_DEFAULTS, **read_header(path)}
    key = mismatch(header, expect)
    if key is not None:
        raise ZooError(f"repair state {str(path)!r} does not match this run: its {key} is {_short(header.get(key))}, "
                       f"this run's is {_short(expect[key])}")
    return header


def mismatch(header: dict | None, expect: dict | None) -> str | None:
    """The first key of ``expect`` whose value ``header`` does not have (None: they agree). Parts compare as
    ``canonical_parts``: a registered name or its legacy class path, an option a spec gained later at its
    default, are no difference."""
    header = {**HEADER_DEFAULTS, **(header or {})}
    for key, want in (expect or {}).items():
        have = header.get(key)
        if key == "parts":
            have, want = canonical_parts(have), canonical_parts(want)
        if have != want:
            return key
    return None


def load_state(path: str | Path, expect: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header). With ``expect``, every key of it must equal the stored header's value."""
    header = check_header(path, expect)
    try:
        tensors = load_file(str(path))
        tensors.pop(EMPTY, None)
        return tensors, header
    except (SafetensorError, OSError) as exc:
        raise ZooError(f"repair state {str(path)!r} is damaged: {exc}") from None


def load_into(path: str | Path, params: dict[str, torch.Tensor], expect: dict) -> dict:
    """Copy the tensors of the repair state ``path`` into ``params`` (same names and shapes, checked);
    returns the header. ``expect``: as in ``load_state``."""
    tensors, header = load_state(path, expect=expect)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ZooError(f"repair state {str(path)!r} does not fit this student: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ZooError(f"repair state {str(path)!r}: {name} has shape {tuple(tensors[name].shape)}, "
                               f"the student's is {tuple(p.shape)}")
            p.copy_(tensors[name])
    return header


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) < 400 else text[:400] + "..."


# ---- resumable training checkpoints --------------------------------------------------------------------

RESUME_FORMAT = "resume/1"
RESUME_FILE = "resume.safetensors"


def _flatten(tree, tensors: dict[str, torch.Tensor], path: str = ""):
    """``tree`` as JSON with every tensor moved into ``tensors`` (by its path); dicts with non-string keys and
    tuples keep their types, so a Lightning checkpoint (optimizer state keyed by int) comes back as it was."""
    if torch.is_tensor(tree):
        tensors[path] = tree.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(tree, dict):
        if all(isinstance(k, str) for k in tree):
            return {"__dict__": {k: _flatten(v, tensors, f"{path}/{k}") for k, v in tree.items()}}
        return {"__items__": [[_flatten(k, tensors, f"{path}/key{i}"), _flatten(v, tensors, f"{path}/{i}")]
                              for i, (k, v) in enumerate(tree.items())]}
    if isinstance(tree, (list, tuple)):
        items = [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(tree)]
        return {"__tuple__": items} if isinstance(tree, tuple) else items
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise ZooError(f"a resume checkpoint cannot hold {type(tree).__name__} at {path or '/'} (tensors and JSON only)")


def _unflatten(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__dict__" in tree:
        return {k: _unflatten(v, tensors) for k, v in tree["__dict__"].items()}
    if "__items__" in tree:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in tree["__items__"]}
    return tuple(_unflatten(v, tensors) for v in tree["__tuple__"])


def save_checkpoint(checkpoint: dict, path: str | Path) -> Path:
    """A training checkpoint (tensors + JSON-able values, e.g. Lightning's) as one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(checkpoint, tensors)
    return atomic_save(tensors, path, {"zoo_format": RESUME_FORMAT, "tree": json.dumps(tree)})


def load_checkpoint(path: str | Path) -> dict:
    meta = _metadata(Path(path), "resume checkpoint", RESUME_FORMAT)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ZooError(f"resume checkpoint {str(path)!r} is damaged: {exc}") from None
    return _unflatten(json.loads(meta["tree"]), tensors)
