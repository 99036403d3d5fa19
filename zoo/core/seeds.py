"""Seeds derived from a base seed and labels: one helper for every technique and diagnostic.

``derive_seed(seed, *labels)`` gives each (target, side, basis, ...) its own stream, so adding or
removing one changes no other's numbers; ``generator(seed, *labels)`` is a ``torch.Generator`` seeded
with it. With no labels the seed is used as it is (``generator(seed)`` is ``manual_seed(seed)``).

Frames, bases and caches built before this module existed derive their seeds in one of four ways, and
their values are pinned by tests and cached artifacts, so each way is kept, exactly, as a ``scheme``:

- ``crc32`` (the default; PHD and coupled frames, shims, TASE interfaces): CRC-32 of
  ``"<seed>:<label>:..."``, 31 bits.
- ``sha256`` (the basis duel's frames): SHA-256 of the JSON list ``[seed, *labels]`` (labels keep their
  JSON types: the width 96 is not the string "96"), the first 8 bytes little-endian, 63 bits.
- ``sha256_32`` (the basis duel's sigma-tuning minibatches): SHA-256 of ``"<seed>:<label>:..."``, the
  first 4 bytes little-endian.
- ``affine`` (the universal basis's random control): ``seed * 1_000_003 + crc32("<label>:...")``.
"""
from __future__ import annotations

import hashlib
import json
import zlib

import torch

from .errors import check_choice

SCHEMES = ("crc32", "sha256", "sha256_32", "affine")


def derive_seed(seed: int, *labels, scheme: str = "crc32") -> int:
    """The seed of the stream ``labels`` under base ``seed`` (``seed`` itself without labels)."""
    check_choice("scheme", scheme, SCHEMES)
    if not labels:
        return seed
    joined = ":".join(str(label) for label in labels)
    if scheme == "crc32":
        return zlib.crc32(f"{seed}:{joined}".encode()) & 0x7FFFFFFF
    if scheme == "sha256":
        digest = hashlib.sha256(json.dumps([seed, *labels]).encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)
    if scheme == "sha256_32":
        return int.from_bytes(hashlib.sha256(f"{seed}:{joined}".encode()).digest()[:4], "little")
    return seed * 1_000_003 + zlib.crc32(joined.encode())


def generator(seed: int, *labels, scheme: str = "crc32") -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, *labels, scheme=scheme)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *labels, scheme=scheme))
