"""The technique spec: what every technique plugs into (ZOMBORG, source 000, section 2: a projection of
chosen maps, then a repair of the few tensors it leaves trainable).

A technique is a typed dataclass subclassing ``Technique``: its target patterns, its hyper-parameters
(validated in ``__post_init__``), which calibration statistics it needs, and how to build a replacement
(a ``zoo.core.replacement.Replacement``) for one target from the original module and that target's
statistics. The LightningModule is the same for every technique (``DistillationModule(parts=[spec])``);
mixing techniques is a longer list of specs.

``Technique`` itself is not a dataclass, so that LightningCLI/jsonargparse read ``parts: list[Technique]``
as subclasses named by ``class_path``.

``plan`` returns a ``Plan`` (what it decided across targets, before any is built: a rank per target, a shared
frame) that the ``Student`` holds and hands to ``build``: a spec is configuration only and is the same before
and after any number of students are built from it.

``footprint`` sizes a replacement from shapes alone (no weights, no statistics): ``zoo plan`` uses it
to count parameters and memory of a recipe on a model it never loads.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from .calibration import ActivationStats
from .errors import ZooError
from .registry import registered
from .targets import find_targets

#: statistics every calibration offers: "input" moments and "taps" (the streams of ``Technique.tap``); a
#: technique may also name any collector registered in ``zoo.core.calibration.COLLECTORS`` (e.g. "fisher")
NEEDS = ("input", "taps")

#: what a tensor of a replacement is: trained, stored but frozen, or a buffer rebuilt from the config
ROLES = ("trainable", "frozen", "buffer")
#: its dtype: ``model`` follows the model's floating dtype (load dtype, or bf16 under bf16-true);
#: ``float32`` stays fp32 whatever the model is cast to (``FP32Params``); ``int64`` index tensors; ``uint8``
#: integer codes of a low-bit grid
KINDS = ("model", "float32", "int64", "uint8")


@dataclass(frozen=True)
class TensorSize:
    """Shape, role and dtype kind of one tensor of a replacement (see ``Technique.footprint``); ``exported``
    False: a tensor merged into others on export (a LoRA correction of a factor), not in the exported student."""

    shape: tuple[int, ...]
    role: str = "trainable"
    kind: str = "model"
    exported: bool = True

    def __post_init__(self):
        if self.role not in ROLES or self.kind not in KINDS:
            raise ValueError(f"TensorSize role {self.role!r} / kind {self.kind!r}; valid: {ROLES} / {KINDS}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Plan(Mapping[str, Any]):
    """What ``Technique.plan`` decided across a spec's targets: {target: decision}, read-only. ``Plan()`` (empty)
    for a spec that decides nothing across targets."""

    __slots__ = ("_decisions",)

    def __init__(self, decisions: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_decisions", MappingProxyType(dict(decisions or {})))

    def __setattr__(self, name, value):
        raise AttributeError("a Plan is read-only")

    def __getitem__(self, target: str) -> Any:
        return self._decisions[target]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decisions)

    def __len__(self) -> int:
        return len(self._decisions)

    def __repr__(self) -> str:
        return f"Plan({dict(self._decisions)!r})"

    def require(self, target: str, spec: Technique) -> Any:
        """The decision for ``target``, or a ZooError saying ``plan`` never saw it."""
        if target not in self._decisions:
            raise ZooError(f"{type(spec).__name__} has no planned decision for {target}: build it through a Student "
                           "(which runs plan() over all of a spec's targets before the first build)")
        return self._decisions[target]


#: the plan of a spec that decides nothing across targets (and ``build``'s default outside a Student)
NO_PLAN = Plan()


class Technique:
    """Base class of technique specs; subclasses are ``@dataclass(eq=False)`` whose first field is
    ``targets`` and whose ``__post_init__`` calls ``super().__post_init__()``, registered under a stable name
    with ``zoo.core.registry.register`` (the name repair states record).

    ``target_kind`` is what the spec's patterns match (``zoo.core.targets.TARGET_KINDS``).
    """

    target_kind = "linear"
    #: False for a spec whose replacements hold nothing trainable by design (``zoo.Transplant``: weights read from
    #: another checkpoint): a student made only of such parts is built and measured, and ``zoo fit`` refuses it
    trains = True

    def __init__(self, targets: str | list[str]):
        self.targets = targets
        self.__post_init__()

    def __post_init__(self):
        if self.targets is not None:
            self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)

    def needs(self) -> set[str]:
        """The calibration statistics ``build`` uses: a subset of ``NEEDS`` (may depend on options)."""
        return set()

    def resolve(self, model: nn.Module) -> list[str]:
        """Module names this spec replaces in ``model``."""
        return find_targets(model, self.targets, self.target_kind)

    #: a calibration tap run on each target when ``needs()`` has "taps": ``tap(module, args, kwargs,
    #: output) -> {stream: tensor}`` (see ``zoo.core.calibration``); its statistics reach ``plan`` as
    #: ``stats["<target>:<stream>"]``. ``tap_version`` names it in the calibration cache key.
    tap = None
    tap_version = ""

    def stored_bytes(self, name: str, replacement: nn.Module) -> int | None:
        """The bytes the format this replacement really ships in stores, where that is not what ``zoo export``
        writes (an external quantizer's codes held dense here); None: what its export description says."""
        return None

    def write_adapter(self, module: nn.Module, path, metadata: dict | None = None):
        """Write the trained student ``module`` (a training module whose one part is this spec) at ``path`` in
        the adapter format other tools load (a PEFT directory for ``zoo.LoRA``) and return that path; None: this
        technique has no such format (its repair state and ``zoo export`` are how it ships)."""
        return None

    def from_state(self, name: str, module: nn.Module, tensors: dict) -> nn.Module | None:
        """The replacement of target ``name`` rebuilt from its tensors in a repair state alone (no calibration, no
        factorization: how ``zoo export`` and the evaluation commands rebuild a student whose state holds every
        tensor), or None where the state does not hold them all (frozen tensors come from calibration).
        ``tensors`` are the target's, named as in the replacement. Default: None."""
        return None

    def report(self, model: nn.Module) -> dict[str, float]:
        """Run-level numbers about the built student (e.g. its KV-cache size), added to the run's summary."""
        return {}

    def plan(self, modules: dict[str, nn.Module], stats: dict[str, ActivationStats]) -> Plan:
        """Called once with all of this spec's targets before any is built: decisions made across targets
        (e.g. a per-layer rank allocation under one budget), returned, never stored on the spec, so one spec
        can build students on different data. Default: nothing decided."""
        return NO_PLAN

    def plan_needs(self) -> set[str]:
        """The statistics ``plan`` reads. Under sequential calibration they are the only ones collected on the
        teacher before anything is built (``build``'s come layer by layer). Default: all of ``needs()`` for a
        spec that overrides ``plan``, none for one that does not."""
        return self.needs() if type(self).plan is not Technique.plan else set()

    def build_needs(self) -> set[str]:
        """The statistics ``build`` reads: under sequential calibration, the ones collected layer by layer.
        Default: all of ``needs()``; a spec whose ``plan`` alone reads some leaves them out."""
        return self.needs()

    def build(self, name: str, module: nn.Module, stats: ActivationStats | None,
              plan: Plan = NO_PLAN) -> nn.Module:
        """The replacement for target ``name``; its trainable tensors have ``requires_grad=True``. ``plan`` is
        what ``plan`` returned over all of the spec's targets."""
        raise NotImplementedError

    def footprint(self, name: str, module: nn.Module) -> dict[str, TensorSize]:
        """The tensors ``build(name, module, stats, plan)`` would create, from shapes alone: {name in the
        replacement (as ``named_parameters``/``named_buffers`` give it): TensorSize}.

        ``module`` may live on the meta device; no statistics are available, so a size that data
        decides (e.g. a globally allocated rank) is estimated and the spec says so in ``footprint_note``.
        Every technique implements it so that ``zoo plan`` can size any recipe.
        """
        raise ZooError(f"technique {type(self).__qualname__} does not implement footprint(name, module), so "
                       "zoo plan cannot size it; add a footprint() returning its tensors' shapes "
                       "(see zoo.core.technique.Technique.footprint)")

    def footprint_note(self) -> str | None:
        """A caveat on ``footprint``'s sizes for this spec (None when they are exact)."""
        return None

    def init_args(self) -> dict:
        """The spec's configuration, as given to ``__init__`` (JSON-serializable)."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}

    def describe(self) -> dict:
        """What a repair state's header records of this spec: its registered name and version (an unregistered
        spec: its class path) and its options."""
        cls = type(self)
        mark = registered(cls)
        ident = {"technique": mark.name, "version": mark.version} if mark else \
            {"technique": f"{cls.__module__}.{cls.__qualname__}"}
        return {**ident, "init_args": self.init_args()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"
