"""Model surgery: one model in memory, two views (ZOMBORG, source 000, section 2.4: the student is the
teacher with its targets replaced; the teacher's logits come from the same weights).

The student is the teacher with each target wrapped in ``Replaced(original, replacement)``.
``teacher_view(model)`` routes every wrapper through its frozen original, so the teacher's forward
is exact and no second copy of the model exists. ``export_student`` drops the originals.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

from .errors import ZooError
from .replacement import Replaced
from .targets import find_targets


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replaced_modules(model: nn.Module) -> dict[str, Replaced]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Replaced)}


def replace(
    model: nn.Module,
    patterns,
    build: Callable[[str, nn.Module], nn.Module],
    kind: str = "linear",
) -> list[str]:
    """Wrap every target of ``kind`` matched by ``patterns`` in ``Replaced(original, build(name, original))``.

    Returns the replaced names. A target that is already replaced is an error (parts of a
    Composite must have disjoint targets).
    """
    names = find_targets(model, patterns, kind)
    for name in names:
        original = get_module(model, name)
        if isinstance(original, Replaced):
            raise ZooError(f"module {name!r} is already replaced; targets of different parts must not overlap")
        replacement = build(name, original)
        set_module(model, name, Replaced(original, replacement))
    return names


@contextlib.contextmanager
def teacher_view(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block every ``Replaced`` in ``model`` runs its original: the exact teacher."""
    wrappers = list(replaced_modules(model).values())
    previous = [w.use_original for w in wrappers]
    for w in wrappers:
        w.use_original = True
    try:
        yield model
    finally:
        for w, p in zip(wrappers, previous):
            w.use_original = p


def export_student(model: nn.Module) -> nn.Module:
    """Drop the originals: every ``Replaced`` becomes its replacement, in place. Returns ``model``.

    The result is for in-process use: its ``save_pretrained`` raises, since transformers would reload
    such a checkpoint with every replaced module missing and re-initialized at random (issue 15);
    ``zoo export`` (``zoo.export.export_model``) writes one that loads.
    """
    replaced = replaced_modules(model)
    for name, wrapper in replaced.items():
        set_module(model, name, wrapper.replacement)
    if replaced and hasattr(model, "save_pretrained"):
        model.save_pretrained = _refuse_save_pretrained
    return model


def _refuse_save_pretrained(*args, **kwargs):
    raise ZooError("save_pretrained of an export_student() model would write a checkpoint transformers reloads "
                   "with the replaced modules missing (randomly re-initialized); use `zoo export` "
                   "(or zoo.export.export_model on the built student) instead")
