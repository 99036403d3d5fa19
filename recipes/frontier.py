"""``zoo frontier``: whole-model compression methods against the bytes they store (issues 16 and 25). Every
item is a (method, value) pair: a method is a recipe config plus overrides (``svd``, ``asvd``, ``fwsvd``,
``svdllm``, the zoo's low-rank pipeline, round-to-nearest and the zoo's low-bit grid) and the recipe option
its values set (``setting``: ``rank``, the fraction of each replaced map's parameters kept, by default; ``bits``
for a low-bit grid), each value one item (``--model.init_args.parts.<setting> <value>``). Each item runs in
stages, each in its own process into ``OUTPUT_DIR/<method>@<value>/<stage>``:

- ``before``: ``zoo validate`` of the recipe: the unrepaired student is built (calibration, cached, and
  projection) and scored on the heldout split; its ``metrics_validate.json`` gives heldout KL and ppl (and
  the teacher's ppl). A validate, not a ``zoo fit --trainer.max_steps 0``: a fit that takes no step never
  reaches ``on_train_start``, so the gate's ``heldout_kl_before`` is not written, nor any validation.
- ``repair`` (only with ``repair_steps`` or ``repair_minutes``): ``zoo fit`` of the recipe with
  ``--trainer.max_steps`` (and ``--model.init_args.max_minutes``, the repair's wall-clock budget); its repair
  state is the best validated one; once it finished, its resume checkpoint is deleted. With
  ``callbacks.RepairCurve`` in the recipe, the stage's entry holds its points (``curve``: step, wall seconds,
  heldout KL and ppl at train start and each validation).
- ``after``: ``zoo validate --ckpt_path <repair state>``: the repaired student scored exactly as ``before``.
- ``speed`` (with ``decode_tokens``): ``zoo speed`` of the student as shipped (its repair state where repaired;
  exported and loaded back) against its dense teacher: decode and prefill tokens/s side by side.
- ``prose_before`` and ``prose_after`` (with ``prose_windows``): ``zoo ppl`` of the student (unrepaired, then
  with its repair state) and its teacher on pydoc-topics prose in 2048-token windows: what the student keeps
  outside the code it was calibrated and repaired on.
- ``hologram_before`` and ``hologram_after`` (with ``hologram_samples``, issue 27): ``zoo validate`` scored on
  heldout hologram samples (source 000, section 2.5: the teacher's own chat distribution), KL to the teacher.
- ``mc_before``, ``mc_teacher`` and ``mc_after`` (with ``mc_items``): ``zoo lm-eval`` accuracy on a local
  multiple-choice task (``recipes.ood_tasks``) of the student and of its teacher (the teacher's measured
  once per teacher, dtype and task: later items keep it, naming the item in ``kept_from``).

With ``seeds``, each item runs once per seed, seed S > 0 in ``OUTPUT_DIR/<method>@<value>#s<S>``; a row is
the mean over the seeds with the spread (``frontier_rows``).

Bytes are what the student's export stores with floating tensors at 16 bits (``zoo.export.writer.size_report``
in the built student's summary): packed codes and fp16 scales of a grid, factors of a low-rank map, and the
rest of the model; ``bits_per_weight`` is 8 x the replaced maps' bytes over the weights they replace.

Parameters are the built student's where every target is a low-rank map (``low_rank_parameters`` of
``FisherSVD.report``: exact under a rank allocation), else counted from shapes (``zoo.core.plan.plan_student``
on the teacher's architecture on the meta device, as ``zoo plan`` does); ``parameters_built`` says which.
Each stage's wall time (and, on a GPU, CUDA peak) is recorded. A finished item (``item.json`` complete, with
the same repair settings, or any repair when this invocation repairs none: a repaired item holds the
unrepaired numbers too) is not run again, nor a finished stage of an interrupted item; a failed item is a
row. Output: ``frontier.md``, ``frontier.json`` (with the command, commit and hardware)
and ``frontier.png`` (code and prose ppl over the teacher's against bytes, a line per method).

    zoo frontier --config configs/commands/frontier.yaml
    zoo frontier --config configs/commands/frontier.yaml --only '[svdllm@0.8, zoo@0.8]' --repair_steps 100
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo.core.cache import atomic_write_text
from zoo.core.errors import ZooError, check_choice

from .command import command_logger
from .frontier_report import STAGES, format_table, hardware, plot
from .frontier_rows import (RESULT, built_summary, config_sha256, count_parameters, finished_with, heldout,
                            item_name, item_row, seed_rows, stage_elsewhere)
from .ood_tasks import TASK, write_task
from .report import log_outputs, row_table
from .series import Item, Series, check_configs, check_unique, one_line, run_stage, zoo_args

DEFAULT_RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5]
PROSE = "pydoc-topics"
#: the data seed of the hologram stages' samples: one heldout set for every item and seed, and none a recipe
#: trains on (the shipped mixes draw theirs with seed 0)
HOLOGRAM_SEED = 1_000_003


@dataclass
class Method:
    """One compression method of the frontier: a recipe config and the overrides that make it this method.

    Args:
        name: the method's name (items are called ``<name>@<value>``).
        config: the recipe YAML (as for ``zoo fit --config``); its ``setting`` is set to each value.
        label: what the table and the chart call it (default: ``name``).
        overrides: extra recipe options, e.g. ``['--model.init_args.parts.weighting', 'asvd']``.
        setting: the option of the recipe's part that the values set (``rank``: a parameter ratio; ``bits``).
        values: this method's values (default: the frontier's ``ratios``).
        repair: whether the frontier's repair applies to this method (False: a baseline that is never
            repaired, e.g. round-to-nearest).
        heldout: overrides of the ``before`` and ``after`` validates only: the split the method is scored on where
            it is not the one its repair validates on (a mix recipe scored on the code-only recipe's blocks);
            ``{seed}`` in one stands for the item's seed.
    """

    name: str
    config: str
    label: str = ""
    overrides: list[str] = field(default_factory=list)
    setting: str = "rank"
    values: list[float] | None = None
    repair: bool = True
    heldout: list[str] = field(default_factory=list)


class Frontier(Series):
    title, noun = "frontier item", "item(s)"

    def __init__(self, methods: list[Method], ratios: list[float], overrides: list[str], repair_steps: int,
                 repair_minutes: float | None, output_dir: str, only: list[str] | None, rerun: bool, logger: bool,
                 seeds: tuple[int, ...] = (0,), prose_windows: int = 0, prose_seq_len: int = 2048,
                 decode_tokens: int = 0, decode_dtype: str = "bfloat16", hologram: dict | None = None,
                 mc_task: str | None = None, mc_items: int = 0):
        self.methods = {m.name: m for m in methods}
        self.ratios, self.overrides, self.seeds = list(ratios), list(overrides), list(seeds)
        self.repair = {"steps": repair_steps, "minutes": repair_minutes}
        self.prose_windows, self.prose_seq_len = prose_windows, prose_seq_len
        self.decode_tokens, self.decode_dtype = decode_tokens, decode_dtype
        self.hologram, self.mc_task, self.mc_items = hologram, mc_task, mc_items
        self.pairs: dict[str, tuple[Method, float, int]] = {}
        items, runs = [], {}
        for m in methods:
            for v in (m.values if m.values is not None else ratios):
                for seed in seeds:
                    name = item_name(m.name, v, seed)
                    self.pairs[name] = (m, v, seed)
                    runs.setdefault(item_name(m.name, v), []).append(name)
                    # seed 0 runs the recipe as written (its own seeds): items finished before seeds stay so
                    seeded = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)] if seed else []
                    items.append(Item(name, config=m.config, overrides=[
                        *overrides, *m.overrides, f"--model.init_args.parts.{m.setting}", f"{v:g}", *seeded]))
        # `only` names an item (every seed of it) or one run of it (`<method>@<value>#s<seed>`)
        only = None if only is None else [n for o in map(str, only) for n in runs.get(o, [o])]
        super().__init__(items, output_dir, "frontier", only, rerun, logger)

    def ood_settings(self) -> dict[str, dict]:
        """The settings of each optional evaluation stage that is on, by stage prefix: a finished stage is
        kept only under the same settings."""
        on = {"prose": {"windows": self.prose_windows} if self.prose_windows else None,
              "hologram": self.hologram, "mc": {"items": self.mc_items} if self.mc_task else None}
        return {k: v for k, v in on.items() if v}

    @property
    def repairs(self) -> bool:
        return self.repair["steps"] > 0 or self.repair["minutes"] is not None

    def repairs_item(self, item: Item) -> bool:
        return self.repairs and self.pairs[item.name][0].repair

    def record(self, run_dir: Path) -> dict:
        path = run_dir / RESULT
        return json.loads(path.read_text()) if path.is_file() else {}

    def record_of(self, item: Item, run_dir: Path) -> dict:
        """What an earlier run of ``item`` left, if it ran the same recipe (config, its parsed values where the record
        has it, and overrides), else {}: an edited recipe runs again."""
        record = self.record(run_dir)
        same = record.get("config") == item.config and record.get("overrides") == item.overrides
        sha = config_sha256(item.config)
        same = same and record.get("config_sha256", sha) == sha
        return record if same and record.get("heldout", []) == self.pairs[item.name][0].heldout else {}

    def done(self, item: Item, run_dir: Path) -> dict | None:
        record = self.record_of(item, run_dir)
        stages = record.get("stages", {})
        whole = all(stages.get(k, {}).get("full_heldout") for k in ("before", "after") if k in stages)
        # a repaired item also holds the unrepaired student's numbers: an invocation without repair keeps it
        same_repair = record.get("repair") == self.repair or not self.repairs_item(item)
        ood = all(all(stages.get(f"{prefix}_{when}", {}).get(k) == v for k, v in settings.items())
                  for prefix, settings in self.ood_settings().items()
                  for when in ("before", "after") if when in stages)
        speed = not self.decode_tokens or (stages.get("speed", {}).get("tokens"), stages.get("speed", {}).get("dtype")) \
            == (self.decode_tokens, self.decode_dtype)
        return record if record.get("complete") and same_repair and whole and ood and speed else None

    def kept(self, item: Item, run_dir: Path) -> str:
        return f"finished earlier ({run_dir / RESULT})"

    def stage(self, name: str, subcommand: str, item: Item, run_dir: Path, overrides: list[str],
              record: dict) -> str | None:
        """Run one stage (a ``zoo validate`` or ``zoo fit`` into ``run_dir/name``), its seconds and numbers
        into ``record``; None, or why it failed."""
        stage_dir = run_dir / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        logger_name = f"frontier/{item.dir_name}/{name}" if self.logger and subcommand == "fit" else None
        if subcommand == "validate":  # the whole heldout split, whatever the recipe validates on while training
            overrides = [*overrides, "--trainer.limit_val_batches", "1.0"]
        args = zoo_args(subcommand, item.config, [*item.overrides, *overrides], stage_dir, logger_name)
        curve = stage_dir / "repair_curve.json"  # callbacks.RepairCurve's, if the recipe has it
        entry, code, last = run_stage(args, stage_dir / f"{subcommand}.log",
                                      (curve, stage_dir / "metrics.json", stage_dir / "metrics_validate.json"))
        metrics = stage_dir / ("metrics_validate.json" if subcommand == "validate" else "metrics.json")
        written = json.loads(metrics.read_text()) if metrics.is_file() else {}
        entry["cuda_peak_gib"] = written.get("cuda_peak_gib")  # the stage's process's peak (None off CUDA)
        if subcommand == "validate":
            entry.update(heldout(written) or {}, full_heldout=True)
        else:
            fit = written
            summary, steps = fit.get("summary", {}), fit.get("global_step")
            # steps taken; the state kept is the best validated one (an earlier step, where it was better)
            entry.update(steps=steps, state_step=summary.get("repair_state_step", steps),
                         kl_gate_after=summary.get("heldout_kl_after"))
            if curve.is_file():
                entry["curve"] = json.loads(curve.read_text())["points"]
        record.setdefault("stages", {})[name] = entry
        if code != 0:
            return f"{name} failed (exit {code}): {last[:120]}"
        if subcommand == "validate" and "kl" not in entry:
            return f"{name} failed: no heldout metrics in {stage_dir / 'metrics_validate.json'}"
        return None

    def command_stage(self, name: str, item: Item, run_dir: Path, record: dict, old: dict, settings: dict,
                      after: bool, command: list[str], read) -> str | None:
        """A ``zoo`` command on the item's student (``after``: with its repair state) into ``run_dir/name``, its
        output JSON read by ``read`` into the stage's entry; kept from ``old`` when it finished with the same
        ``settings`` (and, ``after`` repair, the same repair)."""
        kept = old.get("stages", {}).get(name, {})
        if finished_with(kept, settings) and (not after or old.get("repair") == self.repair):
            record["stages"][name] = kept
            return None
        stage_dir = run_dir / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        output, results = stage_dir / f"{command[0]}.json", stage_dir / "results"
        state = ["--repair_state", str(run_dir / "repair" / "repair_state.safetensors")] if after else []
        # lm-eval names its results file itself (under --output_dir); the others write --output
        target = ["--output_dir", str(results)] if command[0] == "lm-eval" else ["--output", str(output)]
        shutil.rmtree(results, ignore_errors=True)
        args = [sys.executable, "-m", "recipes.cli", command[0], "--recipe", item.config,
                "--overrides", json.dumps([*item.overrides, "--trainer.enable_progress_bar", "false"]), *state,
                *command[1:], *target]
        entry, code, last = run_stage(args, stage_dir / f"{command[0]}.log", (output,))
        entry |= settings
        output = max(results.glob("**/results_*.json"), default=output) if command[0] == "lm-eval" else output
        if output.is_file():
            entry |= read(json.loads(output.read_text()))
        record["stages"][name] = entry
        return None if code == 0 and output.is_file() else f"{name} failed (exit {code}): {last[:120]}"

    def prose(self, when: str, item: Item, run_dir: Path, record: dict, old: dict) -> str | None:
        """``zoo ppl`` of the student (with its repair state ``after`` repair) and its teacher on prose."""
        command = ["ppl", "--source", PROSE, "--seq_len", str(self.prose_seq_len), "--max_windows",
                   str(self.prose_windows), "--device", "cpu", "--logger", "null"]
        read = lambda out: {"ppl": out["ppl"]["student"]["ppl"], "teacher_ppl": out["ppl"]["teacher"]["ppl"]}  # noqa: E731
        return self.command_stage(f"prose_{when}", item, run_dir, record, old, {"windows": self.prose_windows},
                                  when == "after", command, read)

    def mc(self, when: str, item: Item, run_dir: Path, record: dict, old: dict) -> str | None:
        """``zoo lm-eval`` on the local multiple-choice task: the student (with its repair state ``after``
        repair), or the teacher (``when`` = ``teacher``: the originals inside the student, ``--view teacher``);
        ``acc`` is lm-eval's ``acc_norm`` (the choices differ in length), ``acc_raw`` its ``acc``."""
        command = ["lm-eval", "--tasks", self.mc_task, "--device", "cpu", "--logger", "null",
                   *(["--view", "teacher"] if when == "teacher" else [])]
        read = lambda out: {"acc": out["results"][TASK]["acc_norm,none"], "acc_raw": out["results"][TASK]["acc,none"]}  # noqa: E731
        settings = {"items": self.mc_items}
        if when == "teacher":  # the teacher's own figure: any item with the same teacher, dtype and task has it
            count = record.get("count", {})
            settings |= {"task": self.mc_task, "teacher": count.get("teacher"), "dtype": count.get("dtype")}
            shared = count.get("teacher") and not self.rerun and stage_elsewhere(self.out, "mc_teacher", settings)
            if shared:
                record["stages"]["mc_teacher"] = shared
                return None
        return self.command_stage(f"mc_{when}", item, run_dir, record, old, settings, when == "after", command, read)

    def validate_stage(self, name: str, item: Item, run_dir: Path, record: dict, old: dict, extra: list[str],
                       settings: dict, keep: bool) -> str | None:
        """A ``zoo validate`` stage (``stage``), kept from ``old`` where ``keep`` allows and it finished on the
        whole heldout split with the same ``settings``."""
        kept = old.get("stages", {}).get(name, {})
        if keep and finished_with(kept, settings) and "kl" in kept and kept.get("full_heldout"):
            record["stages"][name] = kept
            return None
        failure = self.stage(name, "validate", item, run_dir, extra, record)
        record["stages"][name] |= settings
        return failure

    def hologram_stage(self, when: str, item: Item, run_dir: Path, record: dict, old: dict, keep: bool,
                       state: list[str]) -> str | None:
        """``zoo validate`` of the item's student (built on its own calibration data as ever) scored on heldout
        hologram samples, the teacher's own chat distribution (source 000, section 2.5): the recipe's data
        with ``heldout_data`` a ``recipes.HologramDataModule`` of seed ``HOLOGRAM_SEED``."""
        h, nested = self.hologram, "--data.init_args.heldout_data"
        extra = [nested, "recipes.HologramDataModule", f"{nested}.init_args.seed", str(HOLOGRAM_SEED),
                 f"{nested}.init_args.seq_len", str(h["seq_len"]), f"{nested}.init_args.n_heldout", str(h["blocks"]),
                 f"{nested}.init_args.n_calibration", "1", f"{nested}.init_args.n_train", "1",
                 f"{nested}.init_args.hologram.n_samples", str(h["samples"]),
                 f"{nested}.init_args.hologram.max_new_tokens", str(h["new_tokens"]), *state]
        return self.validate_stage(f"hologram_{when}", item, run_dir, record, old, extra, h, keep)

    def speed(self, item: Item, run_dir: Path, record: dict, old: dict, repaired: bool) -> str | None:
        """``zoo speed`` of the student as shipped (exported, loaded back) against its dense teacher: decode and
        prefill tokens/s, batch 1, one thread, in ``decode_dtype``."""
        command = ["speed", "--dtype", self.decode_dtype, "--new", str(self.decode_tokens), "--threads", "1"]
        read = lambda out: {k: out[k] for k in ("decode_speedup", "prefill_speedup", "decode_tokens_per_s",  # noqa: E731
                                                 "dense_decode_tokens_per_s", "decode_of_limit")}
        settings = {"tokens": self.decode_tokens, "dtype": self.decode_dtype}
        return self.command_stage("speed", item, run_dir, record, old, settings, repaired, command, read)

    def ood_stages(self, when: str, item: Item, run_dir: Path, record: dict, old: dict, save,
                   keep: bool) -> str | None:
        """The optional evaluation stages of the student ``before`` or ``after`` repair (``keep``: a finished
        one may be kept), in order; the first failure."""
        state = ["--ckpt_path", str(run_dir / "repair" / "repair_state.safetensors")] if when == "after" else []
        runs = [(self.hologram, lambda: self.hologram_stage(when, item, run_dir, record, old, keep, state)),
                (self.prose_windows, lambda: self.prose(when, item, run_dir, record, old)),
                (self.mc_task, lambda: self.mc(when, item, run_dir, record, old)),
                (self.mc_task and when == "before", lambda: self.mc("teacher", item, run_dir, record, old))]
        for on, run in runs:
            if on:
                failure = run()
                save()
                if failure:
                    return failure
        return None

    def execute(self, item: Item, run_dir: Path) -> str:
        path = run_dir / RESULT
        old = {} if self.rerun else self.record_of(item, run_dir)
        method, ratio, seed = self.pairs[item.name]
        record = {"method": method.name, "ratio": ratio, "seed": seed, "config": item.config,
                  "config_sha256": config_sha256(item.config), "overrides": item.overrides, "heldout": method.heldout,
                  "repair": self.repair, "complete": False, "stages": {}}
        save = lambda: atomic_write_text(path, json.dumps(record, indent=2))  # noqa: E731
        try:
            count = old.get("count") or {}
            record["count"] = count if "teacher" in count else count_parameters(item.config, item.overrides)
        except Exception as exc:  # the recipe does not parse or does not fit: a row, not the end of the series
            record["status"] = f"failed: {one_line(exc)}"
            save()
            return record["status"]
        heldout = [o.replace("{seed}", str(seed)) for o in method.heldout]
        failure = self.validate_stage("before", item, run_dir, record, old, heldout, {}, keep=True)
        if failure is None and (built := built_summary(run_dir) or old.get("built")):
            record["built"] = built  # the row's bytes and built ranks, from the record alone where run files go
        save()
        if failure is None:
            failure = self.ood_stages("before", item, run_dir, record, old, save, keep=True)
        if failure is None and self.repairs_item(item):
            old_stages = old.get("stages", {})
            kept = old.get("repair") == self.repair and old_stages.get("repair", {}).get("exit_code") == 0
            if kept:  # the same repair finished earlier: its state is there
                record["stages"]["repair"] = old_stages["repair"]
            else:
                steps, minutes = self.repair["steps"], self.repair["minutes"]
                extra = ["--trainer.max_steps", str(steps if steps > 0 else -1)]
                if minutes is not None:
                    extra += ["--model.init_args.max_minutes", f"{minutes:g}"]
                failure = self.stage("repair", "fit", item, run_dir, extra, record)
                if failure is None:  # a finished repair is never resumed; its optimizer moments are 4x its state
                    from zoo.core.state import RESUME_FILE

                    (run_dir / "repair" / RESUME_FILE).unlink(missing_ok=True)
            save()
            state = run_dir / "repair" / "repair_state.safetensors"
            if failure is None:
                failure = self.validate_stage("after", item, run_dir, record, old,
                                              [*heldout, "--ckpt_path", str(state)], {}, keep=kept)
            save()
            if failure is None:
                failure = self.ood_stages("after", item, run_dir, record, old, save, keep=kept)
        if failure is None and self.decode_tokens:
            failure = self.speed(item, run_dir, record, old, repaired=self.repairs_item(item))
        record["status"] = failure or "ok"
        record["complete"] = failure is None
        save()
        return record["status"]

    def row(self, item: Item, result: dict | None, status: str, run_dir: Path) -> dict:
        method, value, seed = self.pairs[item.name]
        record = result or self.record(run_dir)
        if status == "not run" and record.get("complete") and self.record_of(item, run_dir):
            status = "ok"  # finished under other repair settings: its row says how long it was repaired
        count = record.get("count") or {}
        built = built_summary(run_dir) or record.get("built", {})
        ranks = {k: v for k, v in built.items() if k.startswith("ranks/")}
        if not ranks and result and result.get("complete") and "ranks" not in count:  # recorded before ranks were
            try:  # counted: from shapes, once; a recipe that no longer loads leaves the cell empty
                count["ranks"] = count_parameters(item.config, item.overrides)["ranks"]
                atomic_write_text(run_dir / RESULT, json.dumps(record, indent=2))
            except Exception as exc:  # noqa: BLE001 - the table must still be written
                print(f"{item.name}: no ranks ({one_line(exc)})")
        names = {"item": item.name, "method": method.name, "label": method.label or method.name,
                 "setting": method.setting, "value": value, "seed": seed}
        return item_row(names, record, status, built, ranks or count.get("ranks", {}))

    def payload(self, rows: list[dict]) -> dict:
        from .lightning_cli import git_commit

        teacher = next((r["teacher_ppl"] for r in rows if r["teacher_ppl"]), None)
        return {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "commit": git_commit(), "hardware": hardware(),
                "methods": [asdict(m) for m in self.methods.values()], "ratios": self.ratios,
                "overrides": self.overrides, "repair": self.repair, "seeds": self.seeds, "teacher_ppl": teacher,
                "rows": seed_rows(rows)}


def run_frontier(
    methods: list[Method],
    ratios: list[float] = DEFAULT_RATIOS,
    overrides: list[str] = [],
    repair_steps: int = 0,
    repair_minutes: float | None = None,
    output_dir: str = "runs/frontier",
    only: list[str] | None = None,
    rerun: bool = False,
    logger: bool = True,
    prose_windows: int = 0,
    prose_seq_len: int = 2048,
    decode_tokens: int = 0,
    decode_dtype: str = "bfloat16",
    seeds: list[int] = [0],
    hologram_samples: int = 0,
    hologram_new_tokens: int = 128,
    hologram_blocks: int = 16,
    hologram_seq_len: int = 128,
    mc_items: int = 0,
) -> list[dict]:
    """Run every (method, value) item not finished under each seed, then write the table, JSON and chart.

    Each item: heldout KL and ppl before and after repair, prose ppl (with ``prose_windows``), hologram KL
    (with ``hologram_samples``), multiple-choice accuracy (with ``mc_items``), the student's bytes, bits per
    weight and parameters, the seconds of each stage; a row per (method, value): the mean over its seeds,
    the spread (``<key>_std``) and each seed's figures (``per_seed``).

    Args:
        methods: the compression methods, in table order.
        ratios: parameter ratios kept per replaced map (``--model.init_args.parts.rank``) of each method that gives
            no ``values`` of its own.
        overrides: recipe options given to every item (before the method's own), e.g. a heldout size.
        repair_steps: repair steps per item (``zoo fit --trainer.max_steps``); 0 with no ``repair_minutes``:
            no repair, the unrepaired student only.
        repair_minutes: the wall-clock budget of each repair (``--model.init_args.max_minutes``); None: none.
        output_dir: each item runs in ``output_dir/<method>@<value>``; the table, JSON and chart go here.
        only: run only these items (``<method>@<value>``, e.g. ``svdllm@0.8``); the table shows every finished one.
        rerun: run finished items (and their finished stages) again.
        logger: log each repair, and the table, to W&B (offline unless ``WANDB_MODE=online``).
        prose_windows: windows of pydoc-topics prose each student (before and after repair) and its teacher are
            scored on (``zoo ppl``); 0: none.
        prose_seq_len: tokens per prose window (2048, as papers report perplexity).
        decode_tokens: greedy tokens each student as shipped (exported, loaded back) and its dense teacher decode,
            interleaved, batch 1, one thread (``zoo speed``): ``decode_speedup`` in each row; 0: not measured.
        decode_dtype: the dtype both decode in (``bfloat16``: where a low-bit grid runs its int4 kernel).
        seeds: each item runs once per seed: ``--seed_everything S --data.init_args.seed S`` (the data seed
            redraws the files, the split into calibration / train / heldout, the train order and hologram
            sampling), in ``<method>@<value>#s<S>``; seed 0 runs the recipe as written, in ``<method>@<value>``.
        hologram_samples: heldout hologram samples (the teacher's own, seed ``HOLOGRAM_SEED``) each student
            (before and after repair) is scored on, KL to the teacher (``zoo validate``); 0: none.
        hologram_new_tokens: tokens each hologram sample generates at most.
        hologram_blocks: heldout blocks of ``hologram_seq_len`` tokens packed from those samples.
        hologram_seq_len: tokens per hologram block.
        mc_items: items of the local multiple-choice task (``recipes.ood_tasks``: next sentence on the pydoc
            topics, written to ``output_dir/mc_task``) each student (before and after repair) and its
            teacher answer through ``zoo lm-eval``; 0: none.
    """
    if not methods:
        raise ZooError("the frontier has no methods")
    if not ratios:
        raise ZooError("the frontier has no ratios")
    if repair_steps < 0 or (repair_minutes is not None and repair_minutes <= 0):
        raise ZooError(f"repair_steps must be >= 0 and repair_minutes > 0, got {repair_steps}, {repair_minutes}")
    check_unique([m.name for m in methods], "method names")
    check_unique([f"{r:g}" for r in ratios], "ratios")
    check_choice("decode_dtype", decode_dtype, ("float32", "bfloat16"))
    if decode_tokens < 0:
        raise ZooError(f"decode_tokens must be >= 0 (0: no decode speed), got {decode_tokens}")
    for name, value in (("prose_windows", prose_windows), ("hologram_samples", hologram_samples),
                        ("mc_items", mc_items)):
        if value < 0:
            raise ZooError(f"{name} must be >= 0 (0: not measured), got {value}")
    if hologram_samples and min(hologram_new_tokens, hologram_blocks, hologram_seq_len - 1) < 1:
        raise ZooError(f"hologram_new_tokens and hologram_blocks must be >= 1 and hologram_seq_len >= 2, got "
                       f"{hologram_new_tokens}, {hologram_blocks}, {hologram_seq_len}")
    if not seeds or any(s < 0 for s in seeds):
        raise ZooError(f"seeds must be a non-empty list of seeds >= 0, got {seeds}")
    check_unique([str(s) for s in seeds], "seeds")
    hologram = {"samples": hologram_samples, "new_tokens": hologram_new_tokens, "blocks": hologram_blocks,
                "seq_len": hologram_seq_len} if hologram_samples else None
    mc_task = str(write_task(Path(output_dir) / "mc_task", mc_items)) if mc_items else None
    for m in methods:
        if m.values is not None:
            check_unique([f"{v:g}" for v in m.values], f"values of method {m.name}")
    frontier = Frontier(methods, ratios, overrides, repair_steps, repair_minutes, output_dir, only, rerun, logger,
                        seeds, prose_windows, prose_seq_len, decode_tokens, decode_dtype, hologram, mc_task, mc_items)
    check_configs(frontier.items, "method")
    runs = frontier.run()
    rows = seed_rows(runs)
    out = frontier.outputs
    table = format_table(rows)
    print("\n" + table)
    out.markdown(table)
    out.add(frontier.save(runs))
    chart = out.chart(plot, rows)
    print(f"\n{out.wrote()}")
    nested = ("seconds", "ranks", "cuda_peak_gib", "per_seed", "seeds")
    flat = [{k: v for k, v in r.items() if k not in nested} | (r.get("ranks") or {})
            | {f"seconds_{k}": r["seconds"].get(k) for k in STAGES}
            | {f"cuda_peak_gib_{k}": r["cuda_peak_gib"].get(k) for k in STAGES} for r in rows]
    log_outputs(command_logger(logger, "frontier", out.dir), tables={"frontier": row_table(flat)},
                images={"frontier_chart": chart})
    return rows
