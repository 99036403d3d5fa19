"""``zoo bank``, ``zoo basis``, ``zoo project``: the WIZORB pipeline (source 001, sections 3.3, 4, 6;
phases 4-14). The math is ``zoo.universal_basis`` and ``zoo.lora``; this file is the
commands, their files (PEFT adapters, safetensors bases, JSON/Markdown tables, PNG charts) and logging
(W&B offline by default, as every run).

    zoo bank    --config configs/commands/wizorb_bank.yaml      # N LoRA adapters on N disjoint code shards (resumable)
    zoo basis   --config configs/commands/wizorb_basis.yaml     # per-module bases; train/holdout error vs k
    zoo project --config configs/commands/wizorb_project.yaml   # an adapter projected into the basis (+ controls)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

import torch

from zoo.core.errors import ZooError, check_choice
from zoo.core.models import DEFAULT_TEACHER
from zoo.lora import is_adapter_dir, read_adapter
from zoo.universal_basis import (CONTROLS, MODES, DeltaBank, extract_basis, leave_out_errors, load_basis,
                                 project_adapter, save_projection)

from .command import command_logger
from .data import TokenDataModule
from .report import Outputs, log_outputs, markdown_table
from .series import Item, Series, fit_in_process

log = logging.getLogger("zoo.wizorb")

#: the source's targets (001, section 3.2): the attention and MLP projections of every layer
DEFAULT_TARGETS = "model.layers.*.{self_attn.{q,k,v,o}_proj,mlp.{gate,up,down}_proj}"


# --------------------------------------------------------------------------------------------------
# zoo bank


def bank_members(path: str | Path) -> list[str]:
    """The adapters of a bank directory: those ``bank.json`` lists, else its adapter subdirectories."""
    path = Path(path)
    manifest = path / "bank.json"
    if manifest.is_file():
        entries = json.loads(manifest.read_text())["adapters"]
        paths = [str((path / e["path"]).resolve()) if not Path(e["path"]).is_absolute() else e["path"]
                 for e in entries]
    elif path.is_dir():
        paths = [str(p) for p in sorted(path.iterdir()) if p.is_dir() and is_adapter_dir(p)]
    else:
        raise ZooError(f"bank {str(path)!r} is not a directory (make one with `zoo bank`)")
    if not paths:
        raise ZooError(f"bank {str(path)!r} holds no PEFT adapters (adapter_config.json + adapter_model.safetensors)")
    missing = [p for p in paths if not is_adapter_dir(p)]
    if missing:
        raise ZooError(f"bank {str(path)!r} lists adapters that are missing or incomplete: {missing[:3]}")
    return paths


def shard_data(data: TokenDataModule, shard: int, num_shards: int) -> TokenDataModule:
    """The same DataModule reading shard ``shard`` of ``num_shards`` of its code documents."""
    if not hasattr(data, "code"):
        raise ZooError(f"zoo bank shards code documents; {type(data).__name__} has none "
                       "(use recipes.CodeDataModule or recipes.DistillationDataModule)")
    sharded = copy.copy(data)
    sharded.code = dataclasses.replace(data.code, shard=shard, num_shards=num_shards)
    sharded._splits = None
    return sharded


def train_bank(
    data: TokenDataModule | None = None,
    adapters: str | None = None,
    teacher: str = DEFAULT_TEACHER,
    dtype: str = "float32",
    targets: str | list[str] = DEFAULT_TARGETS,
    rank: int = 4,
    alpha: float = 8.0,
    dropout: float = 0.0,
    lr: float = 1e-3,
    steps: int = 20,
    n_adapters: int = 6,
    num_shards: int | None = None,
    same_init: bool = False,
    seed: int = 0,
    accelerator: str = "auto",
    precision: str | None = None,
    output_dir: str = "runs/wizorb/bank",
    logger: bool = True,
) -> dict:
    """Train a delta bank: adapter i is a LoRA fine-tune (next-token loss) on code shard i.

    Args:
        data: the DataModule of every adapter (a code source); adapter i reads shard i of ``num_shards``
            of its code documents, so no two adapters see the same file.
        adapters: instead of training, a directory of existing PEFT adapters (one per subdirectory); they
            are checked for consistency and listed in ``bank.json``.
        teacher: the base model (embedded alias, .gguf, directory or hub id); linked to ``data``.
        dtype: the base model's weight dtype.
        targets: module name patterns that get LoRA (default: q/k/v/o and gate/up/down of every layer).
        rank: LoRA rank r.
        alpha: LoRA alpha (delta = alpha / r * B A).
        dropout: LoRA dropout.
        lr: AdamW learning rate.
        steps: optimizer steps per adapter.
        n_adapters: adapters in the bank.
        num_shards: shards the code is cut into (default ``n_adapters``; more leaves shards unused, e.g.
            for a control adapter trained apart on shard ``n_adapters``).
        same_init: every adapter starts from the same LoRA initialization (seed ``seed``); default: adapter i
            uses seed ``seed + i``.
        seed: the base seed.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        precision: Lightning precision (e.g. ``bf16-mixed``; default: the trainer's default).
        output_dir: where ``adapter_XX/`` (PEFT format), ``bank.json`` and ``bank.md`` go. An adapter
            already saved there is kept (resumable).
        logger: log each adapter's training to W&B (offline unless ``WANDB_MODE=online``).
    """
    if adapters is not None:
        paths = bank_members(adapters)
        bank = DeltaBank(paths)  # consistency: same modules and shapes
        entries = [{"name": Path(p).name, "path": str(Path(p).resolve()), "trained": False} for p in paths]
        manifest = {"source": str(adapters), "rank": bank.rank, "modules": len(bank.modules), "adapters": entries}
        outputs = Outputs(output_dir, "bank")
        outputs.json(manifest, default=str)
        print(f"bank of {len(paths)} existing adapters ({len(bank.modules)} modules, rank {bank.rank}); "
              f"{outputs.wrote()}")
        return manifest
    if data is None:
        raise ZooError("zoo bank needs --data (to train adapters) or --adapters (a directory of PEFT adapters)")
    num_shards = n_adapters if num_shards is None else num_shards
    if n_adapters < 2 or num_shards < n_adapters:
        raise ZooError(f"n_adapters={n_adapters} must be >= 2 and num_shards={num_shards} >= n_adapters")
    if steps < 1:
        raise ZooError(f"steps={steps} must be at least 1")
    lora = dict(targets=targets, rank=rank, alpha=alpha, dropout=dropout, teacher=teacher, dtype=dtype, lr=lr)
    bank = Bank(data, lora, n_adapters, num_shards, steps, same_init, seed, accelerator, precision, output_dir, logger)
    entries = bank.run()
    columns = ["adapter", "shard", "steps", "train nll (last)", "heldout ppl base", "heldout ppl LoRA", "heldout KL",
               "seconds"]
    rows = [[e["name"], e["shard"], e["steps"], e["metrics"].get("train_nll", math.nan),
             e["metrics"].get("heldout_ppl_teacher", math.nan), e["metrics"].get("heldout_ppl", math.nan),
             e["metrics"].get("heldout_kl", math.nan), f"{e['seconds']:.0f}"] for e in entries]
    table = markdown_table(columns, rows, compact=False)
    print(table)
    bank.outputs.add(bank.save(entries))
    bank.outputs.markdown(table)
    print(f"\n{len(entries)} adapters; {bank.outputs.wrote()}")
    return bank.payload(entries)


class Bank(Series):
    """The bank as a series: adapter i (``adapter_XX/``, kept once saved) is a LoRA fine-tune on code shard i,
    fitted in this process (the series holds the DataModule)."""

    title = "bank"

    def __init__(self, data: TokenDataModule, lora: dict, n_adapters: int, num_shards: int, steps: int,
                 same_init: bool, seed: int, accelerator: str, precision: str | None, output_dir: str, logger: bool):
        self.data, self.lora, self.num_shards, self.steps = data, lora, num_shards, steps
        self.same_init, self.seed, self.accelerator, self.precision = same_init, seed, accelerator, precision
        super().__init__([Item(f"adapter_{i:02d}") for i in range(n_adapters)], output_dir, "bank", logger=logger)

    def done(self, item: Item, run_dir: Path) -> dict | None:
        info_path = run_dir / "zoo_adapter.json"
        return json.loads(info_path.read_text()) if is_adapter_dir(run_dir) and info_path.is_file() else None

    def kept(self, item: Item, run_dir: Path) -> str:
        return f"already trained ({run_dir}), kept"

    def execute(self, item: Item, run_dir: Path) -> str:
        import lightning as L

        from zoo import DistillationModule, LoRA
        from zoo.lora import save_lora_adapter

        i, steps = self.items.index(item), self.steps
        seed = self.seed if self.same_init else self.seed + i
        t0 = time.perf_counter()
        L.seed_everything(seed, verbose=False)
        lora = self.lora
        module = DistillationModule(parts=[LoRA(lora["targets"], lora["rank"], lora["alpha"], lora["dropout"])],
                                    teacher=lora["teacher"], dtype=lora["dtype"], lr=lora["lr"], objective="next_token")
        metrics = fit_in_process(
            module, shard_data(self.data, i, self.num_shards), self.out / "runs" / item.name,
            f"bank-{item.name}" if self.logger else None, max_steps=steps, accelerator=self.accelerator,
            num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=steps,
            log_every_n_steps=max(1, min(5, steps)), **({"precision": self.precision} if self.precision else {}))
        info = {"name": item.name, "path": item.name, "trained": True, "shard": i, "num_shards": self.num_shards,
                "steps": steps, "rank": self.lora["rank"], "alpha": self.lora["alpha"], "lr": self.lora["lr"],
                "teacher": self.lora["teacher"], "targets": self.lora["targets"], "seed": seed,
                "seconds": round(time.perf_counter() - t0, 1), "metrics": metrics}
        save_lora_adapter(module, run_dir, metadata=info)
        print(f"{item.name}: shard {i}/{self.num_shards}, {steps} steps, heldout ppl "
              f"{metrics.get('heldout_ppl', float('nan')):.3f} (base {metrics.get('heldout_ppl_teacher', float('nan')):.3f}), "
              f"{info['seconds']:.0f} s")
        return "ok"

    def row(self, item: Item, info: dict | None, status: str, run_dir: Path) -> dict:
        return info

    def payload(self, rows: list[dict]) -> dict:
        return {"teacher": self.lora["teacher"], "rank": self.lora["rank"], "alpha": self.lora["alpha"],
                "targets": self.lora["targets"], "num_shards": self.num_shards, "adapters": rows}


# --------------------------------------------------------------------------------------------------
# zoo basis


def default_ks(max_k: int) -> list[int]:
    ks, k = [0], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max_k]


def build_basis(
    bank: str,
    mode: str = "separate",
    ks: list[int] | None = None,
    holdout: int = 1,
    controls: list[str] = ["universal", "random"],
    exclude: list[str] = [],
    seed: int = 0,
    output_dir: str = "runs/wizorb/basis",
    logger: bool = True,
) -> dict:
    """Extract the per-module universal bases of a bank and measure train/holdout reconstruction vs k.

    Args:
        bank: a bank directory (``zoo bank``'s output, or any directory of PEFT adapter subdirectories).
        mode: ``separate`` (bases for the a and b halves apart) or ``joint`` (one basis over v = [a; b]).
        ks: numbers of components to measure (default: 0, 1, 2, 4, ... and the full rank of the
            leave-out bases). k = 0 is the mean-only control.
        holdout: adapters left out per fold (folds cover the bank; 1 = leave-one-out).
        controls: bases measured on the held-out adapters: ``universal``, ``random``, ``secondary``, ``mean``.
        exclude: adapter names (directory names) kept out of everything here, e.g. an adapter to project later.
        seed: seeds the random control.
        output_dir: where ``basis.safetensors`` (the full bank's bases, all components, with their
            explained-variance spectra), ``basis.json``, ``basis.md`` and ``basis.png`` go.
        logger: log the table and chart to W&B (offline unless ``WANDB_MODE=online``).
    """
    check_choice("mode", mode, MODES)
    for c in controls:
        check_choice("control", c, CONTROLS)
    paths = bank_members(bank)
    names = [Path(p).name for p in paths]
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ZooError(f"exclude names {unknown} are not in the bank; its adapters: {', '.join(names)}")
    paths = [p for p, n in zip(paths, names) if n not in exclude]
    if len(paths) < 2:
        raise ZooError(f"the basis needs at least 2 adapters, the bank has {len(paths)} after exclude")
    t0 = time.perf_counter()
    delta_bank = DeltaBank(paths)
    progress = os.isatty(2)
    full = extract_basis(delta_bank, mode, progress=progress)
    outputs = Outputs(output_dir, "basis")
    basis_path = outputs.add(full.save(outputs.path("safetensors")))
    max_k = (len(paths) - holdout) * delta_bank.rank - 1
    ks = default_ks(max_k) if ks is None else sorted(set(ks))
    result = leave_out_errors(delta_bank, ks, mode, holdout, controls, seed, progress=progress)

    variance = {}
    for k in ks:
        fractions = [float(s.explained_variance()[:k].sum()) for mb in full.modules.values() for s in mb.halves.values()]
        variance[k] = sum(fractions) / len(fractions)
    columns = ["k", "explained variance (all adapters)", "train rel err", "holdout rel err"]
    columns += [f"holdout rel err ({c})" for c in controls if c != "universal"]
    rows, table_data = [], []
    for k in ks:
        uni = result.get("universal", {}).get(k)
        row = [k, variance[k], statistics.fmean(uni["train"]) if uni else math.nan,
               statistics.fmean(uni["holdout"]) if uni else math.nan]
        row += [statistics.fmean(result[c][k]["holdout"]) for c in controls if c != "universal"]
        rows.append(row)
        table_data.append({"k": k, "explained_variance": variance[k],
                           **{c: {"train_mean": statistics.fmean(result[c][k]["train"]),
                                  "holdout_mean": statistics.fmean(result[c][k]["holdout"]),
                                  "holdout_std": statistics.pstdev(result[c][k]["holdout"]),
                                  "train": result[c][k]["train"], "holdout": result[c][k]["holdout"],
                                  "k_effective": result[c][k]["k_effective"]} for c in controls}})
    table = markdown_table(columns, rows, compact=False)
    header = (f"bank: {len(paths)} adapters x rank {delta_bank.rank}, {len(delta_bank.modules)} modules, mode {mode}; "
              f"holdout {holdout} adapter(s) per fold ({math.ceil(len(paths) / holdout)} folds); relative L2 error "
              f"of dW over all modules, mean over adapters; k capped at each basis's rank ({max_k} for the leave-out "
              f"bases, {full_rank(full)} for the full bank)")
    print(header)
    print(table)
    payload = {"bank": paths, "mode": mode, "holdout": holdout, "controls": controls, "seed": seed,
               "rank": delta_bank.rank, "modules": len(delta_bank.modules), "basis": str(basis_path),
               "full_rank": full_rank(full), "seconds": round(time.perf_counter() - t0, 1), "rows": table_data}
    outputs.json(payload, default=str)
    outputs.markdown(header + "\n\n" + table)
    chart = outputs.chart(plot_basis, payload, full)
    print(f"\n{outputs.wrote()} ({payload['seconds']:.0f} s)")
    log_wizorb(command_logger(logger, "wizorb-basis", outputs.dir), "wizorb_basis", columns, rows,
               {f"basis/holdout_rel_err@{r[0]}": r[3] for r in rows}, chart)
    return payload


def full_rank(basis) -> int:
    return min(mb.rank for mb in basis.modules.values())


def plot_basis(payload: dict, full, path: Path) -> Path:
    """Left: train/holdout relative error vs k (and the controls); right: the explained-variance spectra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ks = [r["k"] for r in payload["rows"]]
    xs = [k + 0.5 for k in ks]  # k = 0 (mean only) on a log axis
    for c in payload["controls"]:
        holdout = [r[c]["holdout_mean"] for r in payload["rows"]]
        ax.plot(xs, holdout, marker="o", label=f"holdout ({c})")
        if c == "universal":
            ax.plot(xs, [r[c]["train_mean"] for r in payload["rows"]], marker="s", label="train (universal)")
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(k) for k in ks], fontsize=7)
    ax.set_xlabel("k (components; 0 = mean only)")
    ax.set_ylabel("relative L2 error of dW")
    ax.set_title("leave-adapters-out reconstruction", fontsize=10)
    ax.legend(fontsize=8)
    for half in next(iter(full.modules.values())).halves:
        spectra = [mb.halves[half].explained_variance() for mb in full.modules.values()]
        n = min(len(s) for s in spectra)
        mean = torch.stack([s[:n] for s in spectra]).mean(0)
        ax2.plot(range(1, n + 1), mean.cumsum(0).numpy(), marker=".", label=f"{half} half" if half != "AB" else "joint")
    ax2.set_xlabel("components")
    ax2.set_ylabel("cumulative explained variance (mean over modules)")
    ax2.set_title(f"spectrum of the full bank ({payload['mode']})", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# zoo project


def _kind(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def project(
    adapter: str,
    basis: str,
    k: int = 8,
    control: str | list[str] = "universal",
    seed: int = 0,
    output_dir: str = "runs/wizorb/projected",
    logger: bool = True,
) -> dict:
    """Project a PEFT adapter into a universal basis and write the projection as a PEFT adapter.

    Args:
        adapter: the PEFT adapter directory to project (e.g. a LoRA trained apart from the bank).
        basis: a basis file from ``zoo basis``.
        k: components per half.
        control: ``universal`` (top k), ``random`` (random orthonormal, same k), ``secondary`` (components
            k..2k), ``mean`` (the bank's mean alone, k = 0), or a list of them.
        seed: seeds the random control.
        output_dir: each control's adapter goes to ``<output_dir>/<control>-k<k>/`` (PEFT format, with
            ``projection.json``: the relative L2 error per module); ``projection.{json,md,png}`` compare them.
        logger: log the table and chart to W&B (offline unless ``WANDB_MODE=online``).
    """
    controls = [control] if isinstance(control, str) else list(control)
    for c in controls:
        check_choice("control", c, CONTROLS)
    source = read_adapter(adapter)
    ubasis = load_basis(basis)
    ranks = {source.rank(m) for m in source.modules}
    alpha = float(source.config.get("lora_alpha", 1.0)) if len(ranks) == 1 and not source.config.get("use_rslora") \
        and not source.config.get("alpha_pattern") else None
    outputs = Outputs(output_dir, "projection")
    summary, per_module = [], {}
    for c in controls:
        proj = project_adapter(ubasis, source, k, c, seed)
        k_used = 0 if c == "mean" else k
        errors = {m: proj.relative_error(m) for m in proj.error_sq}
        target = outputs.dir / f"{c}-k{k_used}"
        info = {"source_adapter": str(adapter), "basis": str(basis), "control": c, "k": k_used, "seed": seed,
                "relative_error": proj.relative_error(), "mean_module_error": proj.mean_module_error(),
                "module_errors": errors}
        save_projection(target, proj, alpha, source.base_model, metadata=info)
        Outputs(target, "projection").json(info, default=str)
        per_module[c] = errors
        kinds = {}
        for m, e in errors.items():
            kinds.setdefault(_kind(m), []).append(e)
        summary.append({"control": c, "k": k_used, "overall": proj.relative_error(),
                        "mean_module": proj.mean_module_error(), "max_module": max(errors.values()),
                        "by_kind": {kk: statistics.fmean(v) for kk, v in kinds.items()}, "adapter": str(target)})
    kinds = list(summary[0]["by_kind"])
    columns = ["control", "k", "overall rel err", "mean module rel err", "max module rel err"] + kinds + ["adapter"]
    rows = [[s["control"], s["k"], s["overall"], s["mean_module"], s["max_module"],
             *[s["by_kind"][kk] for kk in kinds], s["adapter"]] for s in summary]
    table = markdown_table(columns, rows, compact=False)
    print(f"{adapter} projected into {basis} ({ubasis.mode}, rank-{ubasis.rank} bank); relative L2 error of dW:")
    print(table)
    payload = {"adapter": str(adapter), "basis": str(basis), "k": k, "seed": seed, "summary": summary,
               "module_errors": per_module}
    for s in summary:
        outputs.add(s["adapter"])
    outputs.json(payload, default=str)
    outputs.markdown(table)
    chart = outputs.chart(plot_projection, per_module, k)
    print(f"\n{outputs.wrote()}")
    log_wizorb(command_logger(logger, "wizorb-project", outputs.dir), "wizorb_projection", columns, rows,
               {f"project/{s['control']}/rel_err": s["overall"] for s in summary}, chart)
    return payload


def plot_projection(per_module: dict[str, dict[str, float]], k: int, path: Path) -> Path:
    """Relative error per module (in model order) for each control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    for c, errors in per_module.items():
        ax.plot(range(len(errors)), list(errors.values()), marker=".", lw=0.8, label=c)
    ax.set_xlabel("module (model order)")
    ax.set_ylabel("relative L2 error of dW")
    ax.set_title(f"projection error per module, k = {k}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_wizorb(logger, key: str, columns: list[str], rows: list[list], metrics: dict, chart: Path) -> None:
    """A WIZORB table (cells as text), its headline metrics and its chart to the logger (None: nothing)."""
    log_outputs(logger, metrics=metrics, step=0, tables={key: (columns, [[str(v) for v in r] for r in rows])},
                images={f"{key}_{chart.stem}": chart})
