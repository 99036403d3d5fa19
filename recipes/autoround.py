"""``zoo autoround``: the established-quantizer baseline of issue 25, AutoRound (Cheng et al., 2023, "Optimize
Weight Rounding via Signed Gradient Descent for the Quantization of LLMs": per-block sign-gradient tuning of the
rounding offsets and the clipping range of a grouped integer grid) through its own package, ``auto-round``, on
the recipe's dense teacher and the recipe's own calibration tokens.

    zoo autoround --recipe configs/recipes/compress_int4.yaml --bits 4 --group 128 --iters 50 \\
        --output runs/autoround/w4g128
    zoo validate --config configs/recipes/compress_int4.yaml --model.init_args.parts \\
        "[{class_path: zoo.Transplant, init_args: {targets: [...], source: runs/autoround/w4g128, bits_per_weight: 4.125}}]"

Only the recipe's target linears are quantized (every other linear of the decoder blocks is kept at 16 bits
through auto-round's ``layer_config``; it never quantizes the LM head by default). The output is a plain
transformers checkpoint with the fake-quantized (dequantized) fp32 weights, auto-round's ``fake`` format: it
loads and evaluates at fp32 speed on a CPU, where auto-round's packed ``auto_round`` format runs through its
fp16 backend and is very slow. ``zoo.Transplant`` reads those weights into the recipe's student, so ``zoo
validate`` measures AutoRound against the real teacher with the zoo's own data and gates. Every target is
checked to lie on the grid (at most 2^bits distinct values per group) before the directory is published;
``zoo_quantizer.json`` records the settings, the version and the wall time. A finished directory is reused
unless ``--overwrite true``; it is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from zoo.core.errors import ZooError, check_choice
from zoo.core.models import claim
from zoo.transplant import safetensors_index

from .recipe import load_recipe

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
MARKER = "zoo_quantizer.json"


def stored_bits(bits: int, group: int, sym: bool) -> float:
    """Bits per weight of auto-round's packed export: the codes, an fp16 scale per group and, asymmetric, a
    ``bits``-wide zero point per group."""
    return bits + (16 + (0 if sym else bits)) / group


def transplant_part(targets: list[str], source: str, bits_per_weight: float, label: str) -> str:
    """The ``--model.init_args.parts`` value that measures ``source`` in place of the recipe's parts."""
    return json.dumps([{"class_path": "zoo.Transplant", "init_args": {
        "targets": targets, "source": source, "bits_per_weight": bits_per_weight, "label": label}}])


def autoround(
    recipe: str,
    output: str,
    bits: int = 4,
    group: int = 128,
    sym: bool = True,
    iters: int | None = None,
    nsamples: int | None = None,
    batch_size: int = 8,
    amp: bool = False,
    seed: int = 42,
    overrides: list[str] = [],
    overwrite: bool = False,
) -> dict:
    """AutoRound on a recipe's teacher and calibration tokens, written as a dequantized checkpoint.

    Args:
        recipe: a recipe YAML (as for ``zoo fit``): its teacher, its targets and its data's calibration split.
        output: the directory to write (a transformers checkpoint of the fake-quantized teacher + ``zoo_quantizer.json``).
        bits: bits per code: 2, 3, 4 or 8.
        group: input channels sharing one scale (auto-round's ``group_size``).
        sym: symmetric grid (no zero points); false: asymmetric, a zero point per group.
        iters: sign-gradient steps per decoder block (default: auto-round's, 200; 0: its RTN mode).
        nsamples: calibration sequences (default: the whole calibration split of the recipe's data).
        batch_size: sequences per tuning step (auto-round's ``batch_size``).
        amp: tune in bf16, auto-round's default on a CPU; false (default): in fp32, the teacher's dtype.
        seed: auto-round's seed.
        overrides: extra recipe options, e.g. ``['--data.init_args.n_calibration', '128']``.
        overwrite: quantize again even if ``output`` holds a finished result.
    """
    try:
        import auto_round
    except ImportError:
        raise ZooError("zoo autoround needs the auto-round package: pip install auto-round") from None
    check_choice("bits", bits, BITS)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ZooError(f"group must be a positive number of input channels, got {group!r}")
    out = Path(output)
    marker = out / MARKER
    if marker.is_file() and not overwrite:
        result = json.loads(marker.read_text())
        print(f"zoo autoround: {out} is finished ({result['quantizer']} {result['version']}, W{result['bits']}G"
              f"{result['group']}); reusing it (--overwrite true quantizes again)")
        return result
    if out.exists() and not overwrite:
        raise ZooError(f"output {str(out)!r} exists and is not a finished zoo autoround result (no {MARKER}); "
                       "give another --output or --overwrite true")

    loaded = load_recipe(recipe, overrides, build=False)
    module, data = loaded.module, loaded.data
    model, tokenizer = module.model, module.tokenizer
    targets = [n for names in module.resolve_targets() for n in names]
    for name in targets:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise ZooError(f"target {name!r} of {recipe} is a {type(model.get_submodule(name)).__name__}; "
                           "auto-round quantizes linear maps only")
    ids = calibration_ids(data, nsamples)
    claim(model)  # auto-round rewrites the weights in place: this process's teacher is no longer pristine
    kept = {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in n and n not in targets}
    settings = {"quantizer": "auto-round", "version": auto_round.__version__, "bits": bits, "group": group,
                "sym": sym, "iters": iters, "nsamples": len(ids), "seq_len": ids.shape[1], "amp": amp,
                "teacher": module.teacher, "recipe": str(recipe), "targets": len(targets),
                "bits_per_weight": stored_bits(bits, group, sym)}
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        started = time.perf_counter()
        folder = run_autoround(model, tokenizer, ids, tmp, bits, group, sym, iters, batch_size, amp, seed,
                               {n: {"bits": 16} for n in kept})
        settings["seconds"] = round(time.perf_counter() - started, 1)
        check_grid(folder, targets, bits, group)
        for name, weight in kept.items():
            if not torch.equal(model.get_submodule(name).weight.float(), weight.float()):
                raise ZooError(f"auto-round changed {name}, which is not a target of {recipe}")
        (folder / MARKER).write_text(json.dumps(settings, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        folder.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    label = f"auto-round W{bits}G{group}{'' if sym else ' asym'}"
    patterns = [t for part in module.parts for t in (part.targets or [])]  # the recipe's, not 210 names
    print(f"zoo autoround: {len(targets)} maps quantized ({label}, {settings['bits_per_weight']:.4g} bits per weight) "
          f"in {settings['seconds']:.0f} s -> {out}\nmeasure it against the teacher:\n  zoo validate --config {recipe} "
          f"--model.init_args.parts '{transplant_part(patterns, str(out), settings['bits_per_weight'], label)}'")
    return settings


def calibration_ids(data, nsamples: int | None) -> torch.Tensor:
    """The first ``nsamples`` rows [n, seq_len] of the calibration split: the tokens the zoo calibrates on."""
    if data is None or not hasattr(data, "split_tensors"):
        raise ZooError("the recipe's data module has no calibration split (a recipes.TokenDataModule has)")
    ids = data.split_tensors("calibration")["input_ids"]
    if nsamples is None:
        return ids
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or not 1 <= nsamples <= ids.shape[0]:
        raise ZooError(f"nsamples must be in 1..{ids.shape[0]} (the recipe's calibration sequences; raise "
                       f"--overrides '[--data.init_args.n_calibration, N]' for more), got {nsamples!r}")
    return ids[:nsamples]


def run_autoround(model, tokenizer, ids: torch.Tensor, tmp: Path, bits: int, group: int, sym: bool,
                  iters: int | None, batch_size: int, amp: bool, seed: int, layer_config: dict) -> Path:
    """auto-round's own API on the CPU: the token rows as its dataset (with their attention masks, so it never
    guesses padding), written in its ``fake`` format. Returns the folder it wrote."""
    from auto_round import AutoRound, QuantizationScheme, SignRoundConfig

    rows = [{"input_ids": row[None].long(), "attention_mask": torch.ones(1, ids.shape[1], dtype=torch.long)}
            for row in ids]
    algorithm = SignRoundConfig() if iters is None else SignRoundConfig(iters=iters)
    quantizer = AutoRound(model, tokenizer, scheme=QuantizationScheme(bits=bits, group_size=group, sym=sym),
                          alg_configs=algorithm, dataset=rows, nsamples=len(rows), seqlen=ids.shape[1],
                          batch_size=min(batch_size, len(rows)), device_map="cpu", amp=amp, seed=seed,
                          layer_config=layer_config or None)
    _, folders = quantizer.quantize_and_save(str(tmp), format="fake")
    folder = Path(folders[0] if isinstance(folders, list | tuple) else folders)
    if not (folder / "config.json").is_file():
        raise ZooError(f"auto-round wrote no checkpoint in {folder} (its folders: {folders!r})")
    return folder


def check_grid(folder: Path, targets: list[str], bits: int, group: int) -> None:
    """Every target's weight has at most 2^bits distinct values in each group of ``group`` input channels (a
    dense map has about ``group``, so where group > 2^bits this also catches a map left unquantized)."""
    from safetensors import safe_open

    index = safetensors_index(folder)
    for name in targets:
        key = f"{name}.weight"
        if key not in index:
            raise ZooError(f"auto-round's output {folder} has no tensor {key!r}")
        with safe_open(str(index[key]), "pt") as f:
            W = f.get_tensor(key).float()
        out_f, in_f = W.shape
        pad = -in_f % group  # a shorter last group: pad with its own first value, which adds no new value
        groups = torch.cat([W, W[:, -(in_f % group or group):][:, :1].expand(out_f, pad)], 1) if pad else W
        ordered = groups.reshape(out_f, -1, group).sort(-1).values
        distinct = (ordered.diff(dim=-1) != 0).sum(-1) + 1
        if int(distinct.max()) > 2 ** bits:
            raise ZooError(f"{name}: a group of auto-round's output holds {int(distinct.max())} distinct values, "
                           f"more than the 2^{bits} of a {bits}-bit grid; it is not on the grid")
