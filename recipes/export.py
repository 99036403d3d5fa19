"""``zoo export``: a compressed student as a self-contained transformers directory (issue 15).

The student is rebuilt from a recipe and its repair state (``recipes.recipe.load_recipe``: calibration from
the recipe's data, cached), or from a finished run directory (its ``config.yaml``, which is a recipe, its
``repair_state.safetensors`` and its ``metrics.json`` for the model card), then written by
``zoo.export.export_model``:

    zoo export --run runs/fisher_svd_repair --output runs/fisher_svd_repair/export
    zoo export --recipe configs/recipes/compress_svdllm.yaml --repair_state runs/compress_svdllm/repair_state.safetensors \\
        --output exports/svdllm --dtype bfloat16
    zoo export --config configs/commands/export.yaml
    zoo export --run runs/compress_int4 --output exports/int4-ct --format compressed-tensors   # no remote code
"""
from __future__ import annotations

import json
from pathlib import Path

from zoo.core.errors import ZooError, check_choice
from zoo.export import export_model
from zoo.export.stock import FORMATS, export_compressed_tensors

from .recipe import load_recipe

RUN_CONFIG, RUN_STATE, RUN_METRICS = "config.yaml", "repair_state.safetensors", "metrics.json"


def export_run(
    output: str,
    run: str | None = None,
    recipe: str | None = None,
    repair_state: str | None = None,
    overrides: list[str] | None = None,
    dtype: str | None = None,
    merge: bool = False,
    overwrite: bool = False,
    format: str = "zoo",
) -> Path:
    """Write the student of a run (or of a recipe + repair state) as a transformers directory.

    Args:
        output: the directory to write (must not exist unless ``overwrite``).
        run: a finished run directory holding ``config.yaml`` and ``repair_state.safetensors`` (``zoo fit``
            writes both); its ``metrics.json`` gives the model card's heldout KL / perplexity.
        recipe: a recipe YAML (instead of ``run``; default with ``run``: the run's ``config.yaml``).
        repair_state: the repair state to load (default with ``run``: the run's); none: the unrepaired student.
        overrides: extra recipe options, e.g. ``['--model.init_args.parts.rank', '0.5']`` (as given to the run).
        dtype: dtype of the stored tensors: ``float32``, ``bfloat16`` or ``float16`` (default: the recipe's);
            tensors a replacement keeps in fp32 (sigma, cores) stay fp32.
        merge: fold every replacement into dense weights and write a plain checkpoint (no remote code); only
            for repairs that keep the architecture's size (LoRA, coefficient adapters, full-rank students).
        overwrite: replace an existing ``output``.
        format: ``zoo`` (the op programs and ``modeling_zoo.py``, loaded with ``trust_remote_code``; every
            technique) or ``compressed-tensors`` (a stock pack-quantized checkpoint that transformers and vLLM
            load without remote code; a student of one symmetric ``zoo.Quantize`` grid alone).
    """
    check_choice("format", format, FORMATS)
    if merge and format != "zoo":
        raise ZooError(f"--merge writes dense weights; it does not combine with --format {format}")
    metrics = None
    if run is not None:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise ZooError(f"run directory {run!r} does not exist")
        recipe = recipe or _need(run_dir / RUN_CONFIG, "its recipe")
        repair_state = repair_state or _need(run_dir / RUN_STATE, "its repair state")
        if (run_dir / RUN_METRICS).is_file():
            metrics = json.loads((run_dir / RUN_METRICS).read_text())
    if recipe is None:
        raise ZooError("give --run (a finished run directory) or --recipe (a recipe YAML, with --repair_state)")
    if Path(output).exists() and not overwrite:  # before the minutes of rebuilding the student
        raise ZooError(f"output directory {output!r} exists; pass --overwrite to replace it")
    loaded = load_recipe(recipe, list(overrides or []), repair_state=repair_state)
    module = loaded.module
    info = {"path": str(recipe), "repair_state": repair_state, "overrides": list(overrides or []),
            "model": loaded.config["model"]}
    if format == "compressed-tensors":
        path = export_compressed_tensors(module, output, dtype=dtype, overwrite=overwrite)
    else:
        path = export_model(module, output, dtype=dtype, merge=merge, overwrite=overwrite, recipe=info, metrics=metrics)
    summary = json.loads((path / "config.json").read_text()).get("zoo", {}).get("summary", {})
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    ratio = f", {summary['parameter_ratio']:.4f} x the teacher's parameters" if "parameter_ratio" in summary else ""
    print(f"zoo export: wrote {path} ({size / 2**20:.1f} MiB of weights{ratio})")
    return path


def _need(path: Path, what: str) -> str:
    if not path.is_file():
        raise ZooError(f"run directory {str(path.parent)!r} has no {path.name} ({what})")
    return str(path)
