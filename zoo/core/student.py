"""The student: the teacher with its targets replaced by one or more technique specs (ZOMBORG, source 000,
sections 2.1-2.4: project, then repair; the repair's trainable tensors are all a state holds).

``Student(parts, teacher)`` loads the teacher once (after checking every part's targets on the weightless
architecture), resolves each part's targets (disjoint across parts), calibrates them (cached: one
``zoo.core.cache`` entry per target set and data), lets each part plan across its targets, builds and
installs the replacements. The plans are the student's (``Student.plans``): a spec is the same before and after,
so one spec builds students on different data. Its ``header()`` and trainable tensors are what a repair state
holds (written and read by ``zoo.core.module.RepairModule`` through ``zoo.core.state``). No Lightning here: the
training side and the diagnostics hold a ``Student``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibration as calib
from .cache import Entry, check_free_space
from .distributed import all_true, rank_world
from .errors import ZooError, check_choice
from .models import META_PREFIX, RANDOM_PREFIX, claim, load_causal_lm
from .plan import layer_of
from .replacement import lr_scales_of, metrics_of, set_tracking
from .sequential import LayerInputs, Unreplayable, decoder_layers
from .surgery import replace, replaced_modules
from .technique import NEEDS, NO_PLAN, Plan, Technique

log = logging.getLogger(__name__)


#: how the targets' statistics are collected (see ``Student``)
CALIBRATIONS = ("once", "sequential")


@runtime_checkable
class CalibrationSource(Protocol):
    """Where a student's calibration tokens come from (the recipes' data modules implement it): batches of
    ``input_ids`` (and ``attention_mask``/``loss_mask``), and a stable hash of exactly those tokens, which keys
    the cached statistics (``""``: not cacheable)."""

    def calibration_dataloader(self) -> Iterable[Mapping[str, torch.Tensor]]: ...

    def fingerprint(self, split: str) -> str: ...


def parts_header(parts: list[Technique], teacher: str, calibration: str = "once") -> dict:
    """What a repair state records about the student that wrote it (and is checked on load): the parts, the
    teacher, and a sequential calibration (which changes the frozen factors the state's tensors fit)."""
    return {"parts": [p.describe() for p in parts], "teacher": teacher, "calibration": calibration}


def as_plan(planned) -> Plan:
    """A part's ``plan()`` result as a ``Plan`` (a spec may return a plain mapping, or None for nothing)."""
    return planned if isinstance(planned, Plan) else Plan(planned) if planned else NO_PLAN


class Student:
    """The teacher model with ``parts`` (technique specs on disjoint targets) applied.

    Args:
        parts: technique specs.
        teacher: embedded alias, ``.gguf`` file, local directory or hub id (or ``random:``/``meta:`` one).
        dtype: dtype the teacher's weights are loaded in.
        calibration_tokens: cap on real tokens used for calibration (None: the whole split).
        full_cov_max: widest input for which the full input covariance is collected.
        calibration: ``once`` (every target's statistics on the teacher's activations, one pass) or
            ``sequential`` (error-aware, as GPTQ/SliceGPT-style pipelines propagate it: the targets of
            decoder layer l are calibrated on the inputs the already-compressed layers below produce, one
            pass per layer, with the teacher's inputs at the same positions as ``extra["cross.*"]`` for a
            refit onto the teacher's outputs; ``plan`` still sees the one-pass statistics).
    """

    def __init__(self, parts: list[Technique], teacher: str, dtype: str = "float32",
                 calibration_tokens: int | None = None, full_cov_max: int = 8192, calibration: str = "once"):
        self.parts = list(parts)
        for i, part in enumerate(self.parts):
            if not isinstance(part, Technique):
                raise ZooError(f"part {i} is a {type(part).__name__}, not a technique spec (zoo.Technique)")
        self.teacher, self.dtype_name = teacher, dtype
        self.calibration_tokens, self.full_cov_max = calibration_tokens, full_cov_max
        self.calibration = check_choice("calibration", calibration, CALIBRATIONS)
        if self.parts and not teacher.startswith(META_PREFIX):
            # bad targets are reported from the architecture alone (meta device), before any weights load
            self.resolve_targets(load_causal_lm(META_PREFIX + teacher.removeprefix(RANDOM_PREFIX), dtype)[0])
        self.model, self.tokenizer = load_causal_lm(teacher, dtype)
        self.targets: dict[str, list[str]] = {}  # "<index>:<spec class>" -> replaced names, once built
        self.plans: list[Plan] = []  # what each part's plan() decided over its targets, once built
        # sequential calibration's streams while building (False: this model's layers cannot be replayed)
        self._layer_inputs: LayerInputs | bool | None = None
        self._pending_ranks: dict[str, tuple[int, int]] = {}  # sequential calibration's, reported once at the end
        self._pending_tokens = 0
        self.summary: dict[str, float] = {}

    def header(self) -> dict:
        return parts_header(self.parts, self.teacher, self.calibration)

    @property
    def built(self) -> bool:
        return bool(replaced_modules(self.model))

    def resolve_targets(self, model: nn.Module | None = None) -> list[list[str]]:
        """Targets of each part in ``model`` (default: the student's); overlapping parts are an error
        naming the shared modules."""
        owner: dict[str, int] = {}
        resolved = []
        for i, part in enumerate(self.parts):
            names = part.resolve(model if model is not None else self.model)
            for n in names:
                if n in owner:
                    raise ZooError(
                        f"parts {owner[n]} ({type(self.parts[owner[n]]).__name__}) and {i} "
                        f"({type(part).__name__}) both target {n!r}; targets of parts must be disjoint"
                    )
                owner[n] = i
            resolved.append(names)
        # a target inside another part's target (an attention block and its o_proj) overlaps too
        for inner, i in owner.items():
            for outer, j in owner.items():
                if i != j and inner.startswith(outer + "."):
                    raise ZooError(f"part {i} ({type(self.parts[i]).__name__}) targets {inner!r}, inside "
                                   f"{outer!r} that part {j} ({type(self.parts[j]).__name__}) replaces; "
                                   "targets of parts must be disjoint")
        return resolved

    # ---- building ------------------------------------------------------------------------------

    def build(self, calibration_loader=None, data_fingerprint: str = "", device=None) -> None:
        """Calibrate (or read the cache) and replace every target."""
        if self.built:
            return  # already built (Lightning's setup runs once per stage)
        resolved = self.resolve_targets()
        # under sequential calibration the teacher's statistics serve ``plan`` only: ``build`` gets its own
        stats = self.calibrate(resolved, calibration_loader, data_fingerprint, device,
                               for_plan=self.calibration == "sequential")
        claim(self.model)
        self.plans = [as_plan(part.plan({n: self.model.get_submodule(n) for n in names}, stats))
                      for part, names in zip(self.parts, resolved)]
        groups = [resolved] if self.calibration == "once" else self.layer_groups(resolved)
        if self.calibration == "sequential":  # plan has read the teacher's; build reads each layer's own
            taps = {n for part, names in zip(self.parts, resolved) if "taps" in part.needs() for n in names}
            stats = {n: st for n, st in stats.items() if n.split(":")[0] in taps}
        try:
            for group in tqdm(groups, desc="sequential calibration", unit="layer", disable=len(groups) == 1):
                if self.calibration == "sequential":  # on what the compressed layers below now produce
                    stats = {**stats, **self.calibrate(group, calibration_loader, data_fingerprint, device,
                                                       sequential=True)}
                for part, plan, names in zip(self.parts, self.plans, group):
                    replace(self.model, names, lambda name, module, part=part, plan=plan:
                            part.build(name, module, stats.get(name), plan), part.target_kind)
                if self.calibration == "sequential":  # built: one layer's statistics at a time stay in memory
                    stats = {n: st for n, st in stats.items() if all(n not in names for names in group)}
            self.report_pending()
        finally:
            self._layer_inputs = None  # the hidden states of the calibration tokens: one depth's worth, freed
            self._pending_ranks, self._pending_tokens = {}, 0
        self._built(resolved)

    def build_from_state(self, tensors: dict) -> str | None:
        """Build every target from a repair state's ``tensors`` alone (``Technique.from_state``: no calibration,
        no factorization), or nothing: returns None once built, else why the state cannot rebuild the student
        (a part keeps frozen tensors out of its state, which calibration rebuilds)."""
        if self.built:
            return None
        resolved = self.resolve_targets()
        layers = {}
        for part, names in zip(self.parts, resolved):
            for name in names:
                prefix = f"{name}.replacement."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                layers[name] = part.from_state(name, self.model.get_submodule(name), own)
                if layers[name] is None:
                    return (f"{type(part).__name__} ({name}) keeps frozen tensors out of its repair state, and "
                            "calibration rebuilds them (a low-rank part trained with train_factors: true holds them all)")
        claim(self.model)
        for part, names in zip(self.parts, resolved):
            replace(self.model, names, lambda name, module: layers[name], part.target_kind)
        self._built(resolved)
        return None

    def _built(self, resolved: list[list[str]]) -> None:
        """What every built student records: its targets and the parts' reports and byte counts."""
        for i, (part, names) in enumerate(zip(self.parts, resolved)):
            self.targets[f"{i}:{type(part).__name__}"] = names
        if any(p.trains for p in self.parts) and not self.trainable_parameters():
            raise ZooError("the student has no trainable tensors; check the technique's options")
        for part in self.parts:
            self.summary.update(part.report(self.model))
        from ..export.writer import size_report  # lazily: the export package reads the core

        stored = {n: b for part, names in zip(self.parts, resolved) for n in names
                  if (b := part.stored_bytes(n, self.model.get_submodule(n).replacement)) is not None}
        self.summary.update(size_report(self.model, stored=stored))
        self.summary["targets"] = sum(map(len, resolved))
        log.info("student built: %d targets, %d trainable parameters", sum(map(len, resolved)),
                 sum(p.numel() for p in self.trainable_parameters().values()))

    def build_from(self, source: CalibrationSource | None = None, device=None) -> None:
        """``build`` on the calibration batches of ``source`` (keyed in the cache by its fingerprint); a source
        that is no ``CalibrationSource`` (a data module with train/heldout splits only) gives none."""
        if isinstance(source, CalibrationSource):
            self.build(source.calibration_dataloader(), source.fingerprint("calibration"), device)
        else:
            self.build(None, "", device)

    @staticmethod
    def layer_groups(resolved: list[list[str]]) -> list[list[list[str]]]:
        """``resolved`` (targets per part) split by decoder layer, bottom-up (targets outside the decoder
        layers last): one calibration pass each under ``sequential``."""
        layers = sorted({layer_of(n) for names in resolved for n in names}, key=lambda l: (l is None, l or 0))
        return [[[n for n in names if layer_of(n) == layer] for names in resolved] for layer in layers]

    def needs(self, resolved: list[list[str]], for_plan: bool = False,
              for_build: bool = False) -> tuple[dict[str, list[str]], dict]:
        """({statistic: targets needing it}, {target: tap}) over all parts (``for_plan``: only what their
        ``plan`` reads; ``for_build``: only what ``build`` reads); an unknown statistic is an error."""
        valid = (*NEEDS, *(k for k in calib.COLLECTORS if k not in NEEDS))
        wanted: dict[str, list[str]] = {}
        taps = {}
        for part, names in zip(self.parts, resolved):
            for need in sorted(part.plan_needs() if for_plan else part.build_needs() if for_build else part.needs()):
                if need not in valid:
                    raise ZooError(f"{type(part).__name__}.needs() asks for {need!r}, which no calibration "
                                   f"collector provides; valid: {', '.join(valid)} (a new statistic is a "
                                   "zoo.core.calibration.Collector registered with register_collector)")
                if need == "taps":
                    taps.update({n: part.tap for n in names})
                else:
                    wanted.setdefault(need, []).extend(names)
        return wanted, taps

    def calibrate(self, resolved, loader, fingerprint: str, device, sequential: bool = False,
                  for_plan: bool = False) -> dict[str, calib.ActivationStats]:
        """Statistics of the ``resolved`` targets (per part): on the teacher (``for_plan``: only what the
        parts' ``plan`` reads), or with ``sequential`` on the model as it is now (replaced layers below
        active), with the teacher-view cross moments."""
        wanted, taps = self.needs(resolved, for_plan, for_build=sequential)
        if sequential:
            taps = {}  # a tap's statistics feed ``plan``, which saw the one-pass ones
        names = sorted({n for ns in wanted.values() for n in ns})
        if not names and not taps:
            return {}
        if loader is None:
            raise ZooError(
                f"{', '.join(type(p).__name__ for p in self.parts)} needs calibration statistics; give it a "
                "DataModule with a calibration_dataloader() (e.g. recipes.DistillationDataModule)"
            )
        collectors = {k: sorted(v) for k, v in wanted.items() if k != "input"}
        others = {k: v for k, v in collectors.items() if k != "fisher"}  # keys of older entries stay as they were
        entry = Entry("calibration", teacher=self.teacher, dtype=self.dtype_name, targets=names,
                      fisher=collectors.get("fisher", []), data=fingerprint,
                      tokens=self.calibration_tokens, full_cov_max=self.full_cov_max,
                      **({"taps": sorted(taps), "tap_versions": sorted({p.tap_version for p in self.parts
                                                                        if "taps" in p.needs()})}
                         if taps else {}),
                      **({"collectors": others, "collector_versions": {k: calib.COLLECTORS[k].version for k in others}}
                         if others else {}),
                      # the layers below are already replaced: their specs and names decide these inputs
                      # version 2: collectors no longer count the teacher-view pass
                      **({"sequential": {"parts": [p.describe() for p in self.parts], "version": 2,
                                         "below": sorted(replaced_modules(self.model))}} if sequential else {}))
        # under ddp/fsdp every process runs setup: all read the cache, or all collect their share
        hit = entry.load() if fingerprint else None
        if all_true(hit is not None):
            stats = calib.stats_from_tensors(*hit)
            self.report_conditioning(stats, sequential)
            return stats
        if fingerprint:  # the statistics will be stored: is there room for them? (known before collecting)
            need = sum(calib.stats_bytes(w, w <= self.full_cov_max)
                       for w in (self.model.get_submodule(n).in_features for n in names))
            check_free_space(entry.path.parent, need, "the calibration statistics")
        was = next(self.model.parameters()).device
        if device is not None:
            self.model.to(device)
        inputs = self.layer_inputs(names, collectors, loader, device) if sequential else None
        stats = calib.collect(self.model, inputs.batches if inputs else loader, names, full_cov_max=self.full_cov_max,
                              max_tokens=self.calibration_tokens, device=device, distributed=True, taps=taps,
                              collectors=collectors, cross=sequential, forward=inputs.forward if inputs else None,
                              progress=not sequential or log.isEnabledFor(logging.DEBUG))
        self.model.to(was)
        if fingerprint and rank_world()[0] == 0:  # only data with a fingerprint can be reused safely
            entry.store(*calib.stats_to_tensors(stats))
        self.report_conditioning(stats, sequential)
        return stats

    def layer_inputs(self, names: list[str], collectors: dict, loader, device) -> LayerInputs | None:
        """The hidden states entering the decoder layer that holds ``names``, for a sequential calibration
        that runs that layer alone (``zoo.core.sequential``); None where the whole model must run: targets
        outside one decoder layer, or a statistic of the loss's backward."""
        layers = {layer_of(n) for n in names}
        backward = any(calib.COLLECTORS[k].stream != "input" for k in collectors)
        if len(layers) != 1 or None in layers or backward or self._layer_inputs is False:
            return None
        container = decoder_layers(self.model, names)
        if any(decoder_layers(self.model, [n]) is not container for n in names):
            return None  # layer l of two module lists (a vision tower's and the decoder's): the whole model runs
        if self._layer_inputs is None:
            rank, world = rank_world()
            try:
                self._layer_inputs = LayerInputs(self.model, loader, container, self.calibration_tokens, device,
                                                 rank, world)
            except Unreplayable as e:
                log.info("sequential calibration runs the whole model per layer: %s", e)
                self._layer_inputs = False
                return None
        if self._layer_inputs.layers is not container:
            return None
        self._layer_inputs.advance_to(layers.pop())
        return self._layer_inputs

    def report_conditioning(self, stats: dict[str, calib.ActivationStats], pending: bool = False) -> None:
        """One log line on whether the calibration tokens span every target's inputs (naming the worst
        target), and the counts in the run's summary; ``pending``: one layer of a sequential calibration,
        kept for the one line after the last (``report_pending``)."""
        ranks = calib.conditioning(stats)
        tokens = max((s.count for s in stats.values()), default=0)
        if pending:
            self._pending_ranks.update(ranks)
            self._pending_tokens = max(self._pending_tokens, tokens)
        elif ranks:
            self._report_ranks(ranks, tokens)

    def report_pending(self) -> None:
        if self._pending_ranks:
            self._report_ranks(self._pending_ranks, self._pending_tokens)
        self._pending_ranks, self._pending_tokens = {}, 0

    def _report_ranks(self, ranks: dict[str, tuple[int, int]], tokens: int) -> None:
        short = {n: r for n, r in ranks.items() if r[0] < r[1]}
        worst = min(ranks, key=lambda n: ranks[n][0] / ranks[n][1])
        self.summary["calibration_tokens"] = tokens
        self.summary["calibration_rank_deficient_targets"] = len(short)
        self.summary["calibration_min_effective_rank_fraction"] = ranks[worst][0] / ranks[worst][1]
        message = (f"calibration: {tokens} tokens; {len(short)} of {len(ranks)} full covariances are rank-deficient"
                   f" (lowest: {worst}, effective rank {ranks[worst][0]} of {ranks[worst][1]})")
        (log.warning if short else log.info)(message + ("; collect more calibration tokens" if short else ""))

    # ---- the replacements' protocol, over the whole student ------------------------------------

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def lr_scales(self) -> dict[str, float]:
        """Per-tensor learning-rate multipliers the replacements declare, by full parameter name."""
        scales = {}
        for target, wrapper in replaced_modules(self.model).items():
            for prefix, module in wrapper.replacement.named_modules():
                for name, scale in lr_scales_of(module).items():
                    scales[".".join(p for p in (target, "replacement", prefix, name) if p)] = float(scale)
        return scales

    def replacement_metrics(self) -> dict[str, dict]:
        """{metric name: {target: metric}} that the replacements update while tracking."""
        found: dict[str, dict] = {}
        for target, wrapper in replaced_modules(self.model).items():
            for name, metric in metrics_of(wrapper.replacement).items():
                found.setdefault(name, {})[target] = metric
        return found

    def track(self, on: bool) -> None:
        for wrapper in replaced_modules(self.model).values():
            set_tracking(wrapper.replacement, on)
