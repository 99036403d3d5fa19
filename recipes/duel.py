"""``zoo duel``: the basis duel on one layer of a teacher (source 000, section 4.2 and section 6 items 1-2;
"Phase 1.5: Structured Basis Duel"). The bases, tuning and metrics are ``zoo.basis_duel``; this file is the
command: teacher, data (a recipe DataModule: its calibration split trains, its heldout split
measures), the activation cache, and the outputs (table on stdout, ``duel.json``, ``duel.png``, and the
same to the run's logger: W&B offline by default).

    zoo duel --config configs/commands/basis_duel.yaml [--rank 32] [--bases '[covariance, hadamard]'] ...
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from lightning.pytorch.loggers import Logger

from zoo import basis_duel as bd
from zoo.core.cache import Entry
from zoo.core.errors import ZooError, check_choice
from zoo.core.models import DEFAULT_TEACHER, load_causal_lm
from zoo.core.targets import find_targets

from .data import TokenDataModule
from .report import Outputs, log_outputs

log = logging.getLogger("zoo.duel")


def basis_duel(
    data: TokenDataModule,
    teacher: str = DEFAULT_TEACHER,
    dtype: str = "float32",
    target: str = "model.layers.15.mlp.down_proj",
    rank: int = 64,
    bases: list[str] = list(bd.DEFAULT_BASES),
    steps: list[int] = list(bd.DEFAULT_STEPS),
    lr: float = 0.01,
    batch_tokens: int | None = 512,
    alpha: float = 0.5,
    seed: int = 0,
    calibration_tokens: int | None = None,
    full_cov_max: int = 8192,
    output_dir: str = "runs/basis_duel",
    device: str | None = None,
    logger: Logger | None = None,
) -> bd.DuelResult:
    """Compare bases of one layer at one rank, before and after sigma-only tuning.

    Args:
        data: a recipe DataModule; its calibration split gives the statistics and the tuning
            activations, its heldout split the activations every metric is measured on.
        teacher: the model (embedded alias, .gguf, directory or hub id); linked to ``data``.
        dtype: the teacher's weight dtype.
        target: one linear module (a name or a pattern matching exactly one).
        rank: the rank r of every basis.
        bases: which bases, in table order; valid: covariance, svd, diagonal, fisher, hadamard,
            permuted_hadamard, random_orthogonal (``fisher`` runs a backward pass per calibration batch).
        steps: sigma-only tuning step counts to report (0 = the initial sigma).
        lr: Adam learning rate of sigma, relative to the RMS of the initial sigma.
        batch_tokens: calibration tokens per tuning step (None: all of them).
        alpha: exponent of the diagonal (ASVD) weighting.
        seed: seeds the random frames, signs, permutations and the tuning minibatches.
        calibration_tokens: cap on calibration tokens (None: the whole calibration split).
        full_cov_max: widest input whose full covariance is collected (else its diagonal).
        output_dir: where ``duel.json`` and ``duel.png`` go.
        device: where the teacher runs to collect activations (e.g. ``cuda``; default: the CPU); the
            duel's own math runs on the CPU in fp64.
        logger: a Lightning logger for the table, chart and metrics (null: none).
    """
    if rank < 1:
        raise ZooError(f"rank={rank} must be at least 1")
    for name in bases:
        check_choice("basis", name, bd.BASES)
    model, _ = load_causal_lm(teacher, dtype)
    names = find_targets(model, target)
    if len(names) != 1:
        raise ZooError(f"the duel compares bases of one layer; target {target!r} matches {len(names)}: "
                       f"{', '.join(names[:6])}")
    name = names[0]
    module = model.get_submodule(name)
    fisher = "fisher" in bases
    data.setup("fit")
    entry = Entry("duel", teacher=teacher, dtype=dtype, target=name, fisher=fisher,
                  calibration=data.fingerprint("calibration"), heldout=data.fingerprint("heldout"),
                  tokens=calibration_tokens, full_cov_max=full_cov_max)

    def collect():
        if device is not None:
            model.to(device)
        return bd.activations_to_tensors(*bd.collect_activations(
            model, name, data.calibration_dataloader(), data.val_dataloader(), fisher=fisher,
            max_tokens=calibration_tokens, full_cov_max=full_cov_max, progress=sys.stderr.isatty())), {}

    stats, x_train, x_heldout = bd.activations_from_tensors(entry.get(collect)[0])
    result = bd.run_duel(module.weight, getattr(module, "bias", None), stats, x_train, x_heldout, rank, bases,
                         steps, lr, batch_tokens, seed, alpha, target=name)
    result.config.update(teacher=teacher, dtype=dtype, data=type(data).__name__)

    outputs = Outputs(output_dir, "duel")
    table = bd.format_table(result)
    print(table)
    outputs.json(result.to_dict())
    outputs.markdown(table)
    chart = outputs.chart(bd.plot, result)
    print(f"\n{outputs.wrote()}")
    log_result(logger, result, chart)
    return result


def log_result(logger: Logger | None, result: bd.DuelResult, chart: Path) -> None:
    """Metrics to any Lightning logger (None: nothing); the table and the chart too where it takes them (W&B)."""
    metrics = {}
    for basis, row in result.rows.items():
        for step, values in row["steps"].items():
            for metric, value in values.items():
                metrics[f"duel/{basis}/{metric}@{step}"] = value
        metrics[f"duel/{basis}/heldout_rel_mse@sigma_opt"] = row["sigma_optimum"]["heldout_rel_mse"]
    log_outputs(logger, hyperparams={"target": result.target, "rank": result.rank, "steps": result.steps,
                                     **result.config},
                metrics=metrics, step=0, tables={"basis_duel": bd.table_rows(result)},
                texts={"basis_duel_findings": bd.findings_text(result)}, images={"basis_duel_chart": chart})
