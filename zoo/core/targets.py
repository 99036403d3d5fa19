"""Targets by name pattern, shared by every technique (source 000, section 2.4: which maps are replaced; PEFT's target_modules).

A pattern is matched against the full names of ``model.named_modules()``:

- ``{a..b}`` expands to the integers a..b inclusive and ``{x,y}`` to alternatives, before matching;
- a pattern containing ``*``, ``?`` or ``[`` is a glob (``*`` does not cross a dot, ``**`` does);
- a pattern starting with ``re:`` is a full-match regular expression;
- anything else is an exact module name.

What a pattern may match is the target *kind* (``TARGET_KINDS``): ``linear`` (the default: leaf
``nn.Linear`` modules or modules that expose ``in_features``/``out_features``/``weight``) or
``attention`` (self-attention blocks: modules whose class name ends in ``Attention``, e.g.
``model.layers.3.self_attn``); a ``Technique`` names its kind in ``target_kind``. A pattern that
matches nothing is an error that lists the closest real names of that kind.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .errors import ZooError, choices_hint
from .replacement import Replaced

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a.{1..3}.b`` -> ``[a.1.b, a.2.b, a.3.b]``; ``{q,k}_proj`` -> ``[q_proj, k_proj]``."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        lo, _, hi = body.partition("..")
        try:
            options = [str(i) for i in range(int(lo), int(hi) + 1)]
        except ValueError:
            raise ZooError(f"bad range {{{body}}} in target pattern {pattern!r}; write {{14..21}}") from None
        if not options:
            raise ZooError(f"empty range {{{body}}} in target pattern {pattern!r}")
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for option in options for p in expand_braces(head + option + tail)]


def _glob_to_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append({"*": r"[^.]*", "?": r"[^.]"}.get(c, re.escape(c) if c not in "[]" else c))
        i += 1
    return "".join(out)


def _compile(pattern: str) -> re.Pattern:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise ZooError(f"bad regular expression in target pattern {pattern!r}: {exc}") from None
    if any(c in pattern for c in "*?["):
        return re.compile(_glob_to_regex(pattern))
    return re.compile(re.escape(pattern))


def is_linear_like(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


def is_attention(module: nn.Module) -> bool:
    """A self-attention block (any family; whether a technique supports it is the technique's check)."""
    inner = module.original if isinstance(module, Replaced) else module
    return type(inner).__name__.endswith("Attention")


#: what a target pattern may match, by kind
TARGET_KINDS = {"linear": is_linear_like, "attention": is_attention}


def find_targets(model: nn.Module, patterns: str | Iterable[str], kind: str = "linear") -> list[str]:
    """Names of the modules of ``kind`` (see ``TARGET_KINDS``) in ``model`` matched by ``patterns``, in
    model order.

    Raises ZooError for a pattern that matches no module of that kind, naming the closest real names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if kind not in TARGET_KINDS:
        raise ZooError(f"unknown target kind {kind!r}; valid choices: {', '.join(TARGET_KINDS)}")
    candidates = [name for name, module in model.named_modules() if TARGET_KINDS[kind](module)]
    # a replaced module is targeted by its original name, not by ".original"/".replacement"
    candidates = [n for n in candidates if not n.endswith((".original", ".replacement"))]
    chosen: set[str] = set()
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            regex = _compile(expanded)
            hits = [n for n in candidates if regex.fullmatch(n)]
            if not hits:
                raise ZooError(
                    f"target pattern {expanded!r} matches no {kind} module"
                    + choices_hint(expanded, candidates)
                )
            chosen.update(hits)
    return [n for n in candidates if n in chosen]
