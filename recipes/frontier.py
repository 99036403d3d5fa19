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
  state is the best validated one. With ``callbacks.RepairCurve`` in the recipe, the stage's entry holds its points
  (``curve``: step, wall seconds, heldout KL and ppl at train start and each validation).
- ``after``: ``zoo validate --ckpt_path <repair state>``: the repaired student scored exactly as ``before``.
- ``speed`` (with ``decode_tokens``): ``zoo speed`` of the student as shipped (its repair state where repaired;
  exported and loaded back) against its dense teacher: decode and prefill tokens/s side by side.
- ``prose_before`` and ``prose_after`` (with ``prose_windows``): ``zoo ppl`` of the student (unrepaired, then
  with its repair state) and its teacher on pydoc-topics prose in 2048-token windows: what the student keeps
  outside the code it was calibrated and repaired on.

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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo.core.cache import atomic_write_text
from zoo.core.errors import ZooError, check_choice

from .command import command_logger
from .frontier_report import STAGES, format_table, hardware, plot
from .report import log_outputs, row_table
from .series import Item, Series, check_configs, check_unique, run_streaming, zoo_args

DEFAULT_RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5]
RESULT = "item.json"
PROSE = "pydoc-topics"


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
    """

    name: str
    config: str
    label: str = ""
    overrides: list[str] = field(default_factory=list)
    setting: str = "rank"
    values: list[float] | None = None
    repair: bool = True


def item_name(method: str, value: float) -> str:
    return f"{method}@{value:g}"


def heldout(metrics: dict) -> dict | None:
    """(heldout KL, ppl, teacher ppl) of a ``zoo validate`` run's ``metrics_validate.json`` (parsed)."""
    final = metrics.get("final", {})
    if "heldout_kl" not in final:
        return None
    return {"kl": final["heldout_kl"], "ppl": final.get("heldout_ppl"), "teacher_ppl": final.get("heldout_ppl_teacher")}


def count_parameters(config: str, overrides: list[str]) -> dict:
    """Parameters of the student and of its teacher, from shapes (the teacher on the meta device)."""
    from zoo.core import plan as zp
    from zoo.core.models import parse_dtype

    from .recipe import load_recipe

    module = load_recipe(config, overrides, build=False, meta=True).module
    resolved = module.resolve_targets()
    plan = zp.plan_student(module.model, module.parts, resolved, parse_dtype(module.dtype_name))
    return {"parameters": plan.student_parameters, "teacher_parameters": plan.model_parameters,
            "replaced_parameters": plan.original, "targets": len(plan.targets),
            "ranks": shape_ranks(module.model, module.parts, resolved)}


def shape_ranks(model, parts, resolved: list[list[str]]) -> dict[str, float]:
    """The mean rank per layer type that the parts' shapes give (a ``sigma`` of r entries: a rank-r map), as
    ``ranks/<type>/mean``; under a planned allocation the built student's own ranks replace these (they are
    the uniform rank of the budget, see ``Technique.footprint_note``)."""
    by_type: dict[str, list[int]] = {}
    for part, names in zip(parts, resolved):
        for name in names:
            sigma = part.footprint(name, model.get_submodule(name)).get("sigma")
            if sigma is not None:
                by_type.setdefault(name.rsplit(".", 1)[-1], []).append(sigma.shape[0])
    return {f"ranks/{t}/mean": sum(rs) / len(rs) for t, rs in sorted(by_type.items())}


def built_summary(run_dir: Path) -> dict:
    """The unrepaired student's summary as its validate built it (``ranks/<type>/<stat>`` and
    ``low_rank_parameters`` from ``FisherSVD.report``; bytes and bits per weight from ``size_report``)."""
    path = run_dir / "before" / "metrics_validate.json"
    return json.loads(path.read_text()).get("summary", {}) if path.is_file() else {}


def one_line(exc: Exception) -> str:
    """The reason of a recipe that does not parse (jsonargparse's union error names it on a ``- `` line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    reasons = [line[2:] for line in lines if line.startswith("- ") and "NoneType" not in line]
    return (reasons[0] if reasons else lines[0] if lines else type(exc).__name__)[:160]


def run_stage(args: list[str], log: Path, stale: tuple[Path, ...]) -> tuple[dict, int, str]:
    """A stage's command in its own process, streamed to ``log``, after the ``stale`` files an earlier attempt
    left are removed (they must not pass for this run's); ({seconds, exit_code}, exit code, last line)."""
    for left in stale:
        left.unlink(missing_ok=True)
    print(f"$ {shlex.join(['zoo', *args[3:]])}", flush=True)
    start = time.monotonic()
    code, last = run_streaming(args, log)
    return {"seconds": round(time.monotonic() - start, 1), "exit_code": code}, code, last


class Frontier(Series):
    title, noun = "frontier item", "item(s)"

    def __init__(self, methods: list[Method], ratios: list[float], overrides: list[str], repair_steps: int,
                 repair_minutes: float | None, output_dir: str, only: list[str] | None, rerun: bool, logger: bool,
                 prose_windows: int = 0, prose_seq_len: int = 2048, decode_tokens: int = 0,
                 decode_dtype: str = "bfloat16"):
        self.methods = {m.name: m for m in methods}
        self.ratios, self.overrides = list(ratios), list(overrides)
        self.repair = {"steps": repair_steps, "minutes": repair_minutes}
        self.prose_windows, self.prose_seq_len = prose_windows, prose_seq_len
        self.decode_tokens, self.decode_dtype = decode_tokens, decode_dtype
        self.pairs: dict[str, tuple[Method, float]] = {}
        items = []
        for m in methods:
            for v in (m.values if m.values is not None else ratios):
                name = item_name(m.name, v)
                self.pairs[name] = (m, v)
                items.append(Item(name, config=m.config,
                                  overrides=[*overrides, *m.overrides, f"--model.init_args.parts.{m.setting}", f"{v:g}"]))
        super().__init__(items, output_dir, "frontier", only, rerun, logger)

    @property
    def repairs(self) -> bool:
        return self.repair["steps"] > 0 or self.repair["minutes"] is not None

    def repairs_item(self, item: Item) -> bool:
        return self.repairs and self.pairs[item.name][0].repair

    def record(self, run_dir: Path) -> dict:
        path = run_dir / RESULT
        return json.loads(path.read_text()) if path.is_file() else {}

    def record_of(self, item: Item, run_dir: Path) -> dict:
        """What an earlier run of ``item`` left, if it ran the same recipe (config and overrides), else {}."""
        record = self.record(run_dir)
        same = record.get("config") == item.config and record.get("overrides") == item.overrides
        return record if same else {}

    def done(self, item: Item, run_dir: Path) -> dict | None:
        record = self.record_of(item, run_dir)
        stages = record.get("stages", {})
        whole = all(stages.get(k, {}).get("full_heldout") for k in ("before", "after") if k in stages)
        # a repaired item also holds the unrepaired student's numbers: an invocation without repair keeps it
        same_repair = record.get("repair") == self.repair or not self.repairs_item(item)
        prose = not self.prose_windows or all(stages.get(f"prose_{k}", {}).get("windows") == self.prose_windows
                                              for k in ("before", "after") if k in stages)
        speed = not self.decode_tokens or (stages.get("speed", {}).get("tokens"), stages.get("speed", {}).get("dtype")) \
            == (self.decode_tokens, self.decode_dtype)
        return record if record.get("complete") and same_repair and whole and prose and speed else None

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
        if kept.get("exit_code") == 0 and all(kept.get(k) == v for k, v in settings.items()) and \
                (not after or old.get("repair") == self.repair):
            record["stages"][name] = kept
            return None
        stage_dir = run_dir / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        output = stage_dir / f"{command[0]}.json"
        state = ["--repair_state", str(run_dir / "repair" / "repair_state.safetensors")] if after else []
        args = [sys.executable, "-m", "recipes.cli", command[0], "--recipe", item.config,
                "--overrides", json.dumps([*item.overrides, "--trainer.enable_progress_bar", "false"]), *state,
                *command[1:], "--output", str(output)]
        entry, code, last = run_stage(args, stage_dir / f"{command[0]}.log", (output,))
        entry |= settings
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

    def speed(self, item: Item, run_dir: Path, record: dict, old: dict, repaired: bool) -> str | None:
        """``zoo speed`` of the student as shipped (exported, loaded back) against its dense teacher: decode and
        prefill tokens/s, batch 1, one thread, in ``decode_dtype``."""
        command = ["speed", "--dtype", self.decode_dtype, "--new", str(self.decode_tokens), "--threads", "1"]
        read = lambda out: {k: out[k] for k in ("decode_speedup", "prefill_speedup", "decode_tokens_per_s",  # noqa: E731
                                                 "dense_decode_tokens_per_s", "decode_of_limit")}
        settings = {"tokens": self.decode_tokens, "dtype": self.decode_dtype}
        return self.command_stage("speed", item, run_dir, record, old, settings, repaired, command, read)

    def execute(self, item: Item, run_dir: Path) -> str:
        path = run_dir / RESULT
        old = {} if self.rerun else self.record_of(item, run_dir)
        method, ratio = self.pairs[item.name]
        record = {"method": method.name, "ratio": ratio, "config": item.config, "overrides": item.overrides,
                  "repair": self.repair, "complete": False, "stages": {}}
        save = lambda: atomic_write_text(path, json.dumps(record, indent=2))  # noqa: E731
        try:
            record["count"] = old.get("count") or count_parameters(item.config, item.overrides)
        except Exception as exc:  # the recipe does not parse or does not fit: a row, not the end of the series
            record["status"] = f"failed: {one_line(exc)}"
            save()
            return record["status"]
        failure = None
        before = old.get("stages", {}).get("before")
        if before and before.get("exit_code") == 0 and "kl" in before and before.get("full_heldout"):
            record["stages"]["before"] = before
        else:
            failure = self.stage("before", "validate", item, run_dir, [], record)
        save()
        if failure is None and self.prose_windows:
            failure = self.prose("before", item, run_dir, record, old)
            save()
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
            save()
            state = run_dir / "repair" / "repair_state.safetensors"
            if failure is None:
                after = old_stages.get("after")
                if kept and after and after.get("exit_code") == 0 and "kl" in after and after.get("full_heldout"):
                    record["stages"]["after"] = after
                else:
                    failure = self.stage("after", "validate", item, run_dir, ["--ckpt_path", str(state)], record)
            save()
            if failure is None and self.prose_windows:
                failure = self.prose("after", item, run_dir, record, old)
        if failure is None and self.decode_tokens:
            failure = self.speed(item, run_dir, record, old, repaired=self.repairs_item(item))
        record["status"] = failure or "ok"
        record["complete"] = failure is None
        save()
        return record["status"]

    def row(self, item: Item, result: dict | None, status: str, run_dir: Path) -> dict:
        method, value = self.pairs[item.name]
        record = result or self.record(run_dir)
        if status == "not run" and record.get("complete") and self.record_of(item, run_dir):
            status = "ok"  # finished under other repair settings: its row says how long it was repaired
        stages, count = record.get("stages", {}), record.get("count") or {}
        before, after = stages.get("before", {}), stages.get("after", {})
        teacher_ppl = before.get("teacher_ppl") or after.get("teacher_ppl")
        ratio_of = lambda ppl: ppl / teacher_ppl if ppl is not None and teacher_ppl else None  # noqa: E731
        teacher_params = count.get("teacher_parameters")
        built = built_summary(run_dir)
        ranks = {k: v for k, v in built.items() if k.startswith("ranks/")}
        if not ranks and result and result.get("complete") and "ranks" not in count:  # recorded before ranks were
            try:  # counted: from shapes, once; a recipe that no longer loads leaves the cell empty
                count["ranks"] = count_parameters(item.config, item.overrides)["ranks"]
                atomic_write_text(run_dir / RESULT, json.dumps(record, indent=2))
            except Exception as exc:  # noqa: BLE001 - the table must still be written
                print(f"{item.name}: no ranks ({one_line(exc)})")
        ranks = ranks or count.get("ranks", {})
        parameters = count.get("parameters")
        # the built maps' size: under a planned allocation the shapes' count is the uniform rank's
        exact = "low_rank_parameters" in built and count.get("replaced_parameters") is not None \
            and count.get("targets") == built.get("low_rank_maps")  # every target one of those maps
        if exact:
            parameters = teacher_params - count["replaced_parameters"] + built["low_rank_parameters"]
        prose_before, prose_after = stages.get("prose_before", {}), stages.get("prose_after", {})
        teacher_prose = prose_before.get("teacher_ppl") or prose_after.get("teacher_ppl")
        prose_of = lambda ppl: ppl / teacher_prose if ppl is not None and teacher_prose else None  # noqa: E731
        repair = stages.get("repair", {})
        curve = repair.get("curve") or []
        minutes = (curve[-1].get("wall_s") if curve else repair.get("seconds"))
        repaired = "kl" in after
        # the student as shipped: after repair where it was repaired
        code_ratio, prose_ratio = (ratio_of(after.get("ppl")), prose_of(prose_after.get("ppl"))) if repaired else \
            (ratio_of(before.get("ppl")), prose_of(prose_before.get("ppl")))
        return {"item": item.name, "method": method.name, "label": method.label or method.name,
                "setting": method.setting, "value": value, "ratio": value if method.setting == "rank" else None,
                "status": status, "bits_per_weight": built.get("bits_per_weight"), "bytes": built.get("student_bytes"),
                "teacher_bytes": built.get("teacher_bytes"),
                "bytes_fraction": built["student_bytes"] / built["teacher_bytes"] if built.get("teacher_bytes") else None,
                "ppl_code_ratio": code_ratio, "ppl_prose_ratio": prose_ratio,
                "repair_minutes": minutes / 60 if minutes is not None else None,
                "decode_speedup": stages.get("speed", {}).get("decode_speedup"),
                "decode_tokens_per_s": stages.get("speed", {}).get("decode_tokens_per_s"),
                "decode_dtype": stages.get("speed", {}).get("dtype"),
                "prose_ppl_before": prose_before.get("ppl"), "prose_ppl_after": prose_after.get("ppl"),
                "teacher_prose_ppl": teacher_prose, "prose_x_teacher_before": prose_of(prose_before.get("ppl")),
                "prose_x_teacher_after": prose_of(prose_after.get("ppl")),
                "parameters": parameters, "teacher_parameters": teacher_params, "parameters_built": exact,
                "parameter_fraction": parameters / teacher_params if teacher_params and parameters else None,
                "kl_before": before.get("kl"), "kl_after": after.get("kl"),
                "ppl_before": before.get("ppl"), "ppl_after": after.get("ppl"), "teacher_ppl": teacher_ppl,
                "ppl_x_teacher_before": ratio_of(before.get("ppl")), "ppl_x_teacher_after": ratio_of(after.get("ppl")),
                "repair_steps": stages.get("repair", {}).get("steps"), "ranks": ranks,
                "seconds": {k: v.get("seconds") for k, v in stages.items()},
                "cuda_peak_gib": {k: v.get("cuda_peak_gib") for k, v in stages.items()}}

    def payload(self, rows: list[dict]) -> dict:
        from .lightning_cli import git_commit

        teacher = next((r["teacher_ppl"] for r in rows if r["teacher_ppl"]), None)
        return {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "commit": git_commit(), "hardware": hardware(),
                "methods": [asdict(m) for m in self.methods.values()], "ratios": self.ratios,
                "overrides": self.overrides, "repair": self.repair, "teacher_ppl": teacher, "rows": rows}


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
) -> list[dict]:
    """Run every (method, value) item not finished, then write the table, JSON and chart.

    Each item: heldout KL and ppl before and after repair, prose ppl (with ``prose_windows``), the student's
    bytes, bits per weight and parameters, the seconds of each stage.

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
    if prose_windows < 0:
        raise ZooError(f"prose_windows must be >= 0 (0: no prose perplexity), got {prose_windows}")
    for m in methods:
        if m.values is not None:
            check_unique([f"{v:g}" for v in m.values], f"values of method {m.name}")
    frontier = Frontier(methods, ratios, overrides, repair_steps, repair_minutes, output_dir, only, rerun, logger,
                        prose_windows, prose_seq_len, decode_tokens, decode_dtype)
    check_configs(frontier.items, "method")
    rows = frontier.run()
    out = frontier.outputs
    table = format_table(rows)
    print("\n" + table)
    out.markdown(table)
    out.add(frontier.save(rows))
    chart = out.chart(plot, rows)
    print(f"\n{out.wrote()}")
    flat = [{k: v for k, v in r.items() if k not in ("seconds", "ranks", "cuda_peak_gib")} | (r.get("ranks") or {})
            | {f"seconds_{k}": r["seconds"].get(k) for k in STAGES}
            | {f"cuda_peak_gib_{k}": r["cuda_peak_gib"].get(k) for k in STAGES} for r in rows]
    log_outputs(command_logger(logger, "frontier", out.dir), tables={"frontier": row_table(flat)},
                images={"frontier_chart": chart})
    return rows
