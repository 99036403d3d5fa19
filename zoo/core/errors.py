"""User-facing errors.

Every error a user can cause by a bad config or argument is a ``ZooError``: the CLI prints its
message and exits non-zero without a traceback. Messages name the bad value and the valid choices.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ZooError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def choices_hint(value: str, choices: Iterable[str], n: int = 5) -> str:
    """'; closest: a, b, c' for the choices most similar to ``value`` (empty when none is close)."""
    choices = list(choices)
    close = difflib.get_close_matches(value, choices, n=n, cutoff=0.5)
    if not close:  # fall back to a shared-prefix match so long dotted names still get hints
        stem = value.split("*")[0].split("{")[0].split("[")[0]
        while stem and not close:
            close = [c for c in choices if c.startswith(stem)][:n]
            stem = stem[:-1]
    return f"; closest: {', '.join(close)}" if close else ""


def check_choice(what: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ZooError naming them all."""
    choices = list(choices)
    if value not in choices:
        raise ZooError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")
    return value


def check_at_least(least: float, what: str = "", **values) -> None:
    """A one-line ZooError for the first of ``values`` (name=value; None: not given) below ``least``: sizes a
    command checks before it loads any weights."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not value >= least):
            raise ZooError(f"{what}{name}={value} must be at least {least}")
