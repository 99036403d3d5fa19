"""Where transformers' API moves between the versions the zoo supports, one place says how.

transformers 5.x renamed the KV cache argument and output field ``past_key_values`` to ``cache``
(deprecated in 5.2x, removed in 5.40): a layer that reads only one of the two names silently runs
without a cache on the other versions, so every cache-touching path goes through these helpers.
"""
from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.cache
def _cache_argument(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(model: nn.Module) -> str:
    """The keyword ``model.forward`` (and ``generate``) takes the KV cache by: ``cache`` or ``past_key_values``."""
    return _cache_argument(type(model).forward)


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` with the name ``model``'s forward expects."""
    return {cache_argument(model): cache}


def output_cache(output):
    """The KV cache a model (or ``generate``) returned, under either field name; None if it returned none."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def layer_cache(cache, past_key_values):
    """The cache an attention layer was handed, by the new name or the old one."""
    return cache if cache is not None else past_key_values
