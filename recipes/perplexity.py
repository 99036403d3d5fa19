"""``zoo ppl``: perplexity as compression papers report it (non-overlapping windows of 2048 tokens,
token-weighted; GPTQ's WikiText-2 protocol, see ``zoo.evaluation.perplexity``), for a teacher, or for a
recipe's student and its teacher side by side from one model in memory (the teacher is the student
under ``teacher_view``).

    zoo ppl --model smollm2-135m-instruct                               # offline default: pydoc-topics
    zoo ppl --recipe configs/recipes/compress_svdllm.yaml                       # student and teacher
    zoo ppl --model meta-llama/Llama-3.1-8B --source wikitext --dataset_config wikitext-2-raw-v1
"""
from __future__ import annotations

import re
from pathlib import Path

from lightning.pytorch.loggers import Logger

from zoo.core.cache import check_writable
from zoo.core.errors import check_at_least
from zoo.core.surgery import teacher_view
from zoo.evaluation.perplexity import PYDOC_TOPICS, load_texts, perplexity, token_windows

from .evaluate import _device, load_subject
from .report import Outputs, log_outputs


def ppl(
    model: str | None = None,
    recipe: str | None = None,
    repair_state: str | None = None,
    overrides: list[str] = [],
    source: str = PYDOC_TOPICS,
    dataset_config: str | None = None,
    split: str = "test",
    text_field: str = "text",
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    dtype: str | None = None,
    device: str = "auto",
    output_dir: str = "runs/ppl",
    output: str | None = None,
    logger: Logger | None = None,
) -> dict:
    """Perplexity over a text set in non-overlapping windows of ``seq_len`` tokens (token-weighted).

    Args:
        model: the teacher: embedded alias, .gguf file, local directory or hub id (default
            smollm2-135m-instruct; with ``recipe``: overrides the recipe's teacher).
        recipe: a recipe YAML: measure its student and its teacher (the originals) in one run.
        repair_state: the repair state (safetensors) loaded into the recipe's student.
        overrides: extra recipe options, e.g. ``['--model.init_args.parts.rank', '0.6']``.
        source: ``pydoc-topics`` (CPython's language-reference topics, offline), a local .txt/.md/.jsonl file
            or a directory of them, or a ``datasets`` name (``wikitext``).
        dataset_config: the ``datasets`` config (``wikitext-2-raw-v1``).
        split: the ``datasets`` split.
        text_field: the text column of a ``datasets`` dataset or of .jsonl lines.
        seq_len: tokens per window (at most the model's max_position_embeddings).
        max_windows: use only the first N windows (default: all).
        batch_size: windows per forward pass (does not change the result beyond float rounding).
        dtype: weight dtype (float32, bfloat16, float16); default float32, or the recipe's.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ...
        output_dir: where the results JSON and the W&B run go.
        output: the results JSON (default: <output_dir>/<name>-<source>-<seq_len>.json).
        logger: a Lightning logger for the figures (true: W&B offline in output_dir; null: none).
    """
    # what can be wrong without the model fails before it loads
    check_at_least(1, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows)
    check_writable(Path(output).parent if output else output_dir, "output directory")
    texts = load_texts(source, dataset_config, split, text_field)
    lm, tokenizer, teacher, dtype, name = load_subject(model, recipe, repair_state, overrides, dtype, _device(device))
    windows = token_windows(texts.texts, tokenizer, seq_len, max_windows, f"text source {source!r}", lm)
    figures = {}
    if recipe:
        figures["student"] = perplexity(lm, windows, batch_size, True, "student")
        with teacher_view(lm):
            figures["teacher"] = perplexity(lm, windows, batch_size, True, "teacher")
    else:
        figures["model"] = perplexity(lm, windows, batch_size, True, name)
    n_windows, _ = windows.shape
    header = (f"{source} [{texts.kind}]: {n_windows} windows x {seq_len} tokens "
              f"({n_windows * seq_len} tokens, {n_windows * (seq_len - 1)} predicted), non-overlapping, token-weighted")
    print(header)
    label = {"model": name, "teacher": f"teacher ({teacher})", "student": f"student ({name})"}
    for key in ("model", "teacher", "student"):
        if key in figures:
            print(f"  {label[key]:<50s} ppl = {figures[key].ppl:.4f}  (nll {figures[key].nll:.6f})")
    if recipe:
        print(f"  student / teacher ppl = {figures['student'].ppl / figures['teacher'].ppl:.4f}")
    result = {"format": "zoo.ppl/1", "name": name, "teacher": teacher, "dtype": dtype, "recipe": recipe,
              "repair_state": repair_state, "overrides": list(overrides), "source": texts.describe(),
              "seq_len": seq_len, "n_windows": n_windows, "ppl": {k: v.to_dict() for k, v in figures.items()}}
    path = Path(output or Path(output_dir) / default_output(name, source, seq_len))
    outputs = Outputs(path.parent, path.stem)
    outputs.json(result, name=path.name, indent=1)
    print(outputs.wrote())
    log_outputs(logger, hyperparams={k: result[k] for k in ("name", "teacher", "dtype", "recipe", "repair_state",
                                                            "seq_len")},
                metrics={f"ppl/{k}": v.ppl for k, v in figures.items()} | {"ppl/n_windows": n_windows})
    return result


def default_output(name: str, source: str, seq_len: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{name}-{Path(source).name or source}-{seq_len}").strip("_")
    return f"{slug[:120]}.json"
