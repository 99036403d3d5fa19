"""Perplexity the way compression papers report it: one long token stream cut into non-overlapping
windows of ``seq_len`` tokens (2048 by default), token-weighted NLL over every predicted token.

This is the protocol of GPTQ (Frantar et al. 2022, ``datautils.get_wikitext2`` / ``llama_eval``), reused by
SparseGPT, Wanda and SVD-LLM (Wang et al. 2024): join the split's texts with ``"\\n\\n"``, tokenize once with
the tokenizer's defaults, keep ``n = len // seq_len`` whole windows (the tail is dropped), and report
``exp(sum of NLL / number of predicted tokens)``. Each window predicts its tokens 2..seq_len from the ones
before it, so every window counts ``seq_len - 1`` tokens.

Sources (``load_texts``):

- ``pydoc-topics`` (the default, no network): the English text of CPython's ``pydoc_data.topics`` module,
  the topic pages of the Python language reference that ``help()`` shows, shipped with every CPython.
  Natural-language prose with some code, unlike the stdlib-source heldout split that ``zoo fit`` measures;
  466k characters on CPython 3.11.7: 113,108 SmolLM2 tokens, 55 windows of 2048 (112,640 tokens).
- a local file or directory: ``.txt``/``.md`` files are one text each, ``.jsonl`` files one text per line
  (its ``text_field``); a directory takes those files below it in sorted order.
- any other name is a ``datasets`` dataset: ``wikitext`` with config ``wikitext-2-raw-v1``, split ``test``,
  field ``text`` is the papers' WikiText-2.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import ZooError


PYDOC_TOPICS = "pydoc-topics"
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSON_SUFFIXES = (".jsonl", ".json")


@dataclass
class TextSource:
    name: str  # what the user gave
    kind: str  # pydoc-topics | local | datasets
    texts: list[str]
    detail: dict = field(default_factory=dict)

    def describe(self) -> dict:
        joined = "\n\n".join(self.texts).encode()
        return {"name": self.name, "kind": self.kind, "n_texts": len(self.texts), "n_chars": len(joined),
                "md5": hashlib.md5(joined).hexdigest(), **self.detail}


def pydoc_topics() -> TextSource:
    import platform

    from pydoc_data.topics import topics

    return TextSource(PYDOC_TOPICS, PYDOC_TOPICS, [topics[k] for k in sorted(topics)],
                      {"python": platform.python_version()})


def read_text(path: Path, least_printable: float = 0.95) -> str:
    """The file as UTF-8 text, refused in one line if it does not decode or is mostly control characters (a
    binary file would otherwise tokenize into a perplexity of nothing)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ZooError(f"text source {str(path)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                       f"{exc.start}); give a text file") from None
    printable = sum(c.isprintable() or c in "\t\n\r\f" for c in text)
    if text and printable < least_printable * len(text):
        raise ZooError(f"text source {str(path)!r} is not text: {1 - printable / len(text):.0%} of its characters "
                       "are control characters; give a text file")
    return text


def _local_texts(path: Path, text_field: str) -> list[str]:
    if path.suffix in TEXT_SUFFIXES:
        return [read_text(path)]
    texts = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ZooError(f"{path}:{number} is not a JSON line: {exc}") from None
        if not isinstance(row, dict) or text_field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ZooError(f"{path}:{number} has no field {text_field!r} (set --text_field; it has: {keys})")
        texts.append(str(row[text_field]))
    return texts


def load_texts(source: str = PYDOC_TOPICS, dataset_config: str | None = None, split: str = "test",
               text_field: str = "text") -> TextSource:
    """The texts of ``source`` in order (see the module docstring for what ``source`` may be)."""
    if source == PYDOC_TOPICS:
        return pydoc_topics()
    path = Path(source).expanduser()
    if path.exists():
        suffixes = TEXT_SUFFIXES + JSON_SUFFIXES
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes) if path.is_dir() else [path]
        if not files or (path.is_file() and path.suffix not in suffixes):
            raise ZooError(f"text source {source!r} has no {', '.join(suffixes)} file; give one, a directory of "
                           f"them, {PYDOC_TOPICS!r}, or a `datasets` name")
        texts = [t for f in files for t in _local_texts(f, text_field)]
        return TextSource(source, "local", texts, {"files": len(files)})
    try:
        import datasets

        data = datasets.load_dataset(source, dataset_config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a missing name or no network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZooError(f"text source {source!r} is not {PYDOC_TOPICS!r}, a local file or directory, nor a loadable "
                       f"`datasets` dataset (config {dataset_config!r}, split {split!r}): {first}") from None
    if text_field not in data.column_names:
        raise ZooError(f"dataset {source!r} has no column {text_field!r}; its columns: {', '.join(data.column_names)}")
    return TextSource(source, "datasets", list(data[text_field]),
                      {"config": dataset_config, "split": split, "fingerprint": data._fingerprint})


def max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def token_windows(texts: list[str], tokenizer, seq_len: int, max_windows: int | None = None,
                  source: str = "the text source", model=None) -> torch.Tensor:
    """[n, seq_len] token ids: the joined texts tokenized once, cut into non-overlapping windows."""
    if seq_len < 2:
        raise ZooError(f"seq_len must be >= 2 (a window predicts its tokens from the ones before), got {seq_len}")
    limit = max_positions(model) if model is not None else None
    if limit is not None and seq_len > limit:
        raise ZooError(f"seq_len {seq_len} is above the model's maximum sequence length {limit} "
                       f"(max_position_embeddings); use --seq_len {limit} or less")
    if max_windows is not None and max_windows < 1:
        raise ZooError(f"max_windows must be >= 1, got {max_windows}")
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "longer than the maximum length" is the point here
    try:
        ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    finally:
        transformers.logging.set_verbosity(verbosity)
    n = ids.numel() // seq_len
    if n == 0:
        raise ZooError(f"{source} has {ids.numel()} tokens, fewer than one window of seq_len {seq_len}; "
                       f"give a longer source or a smaller --seq_len")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


@dataclass
class Perplexity:
    nll_sum: float
    n_tokens: int  # predicted tokens: n_windows * (seq_len - 1)
    n_windows: int
    seq_len: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict:
        return {**asdict(self), "nll": self.nll, "ppl": self.ppl}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = False,
               desc: str = "perplexity") -> Perplexity:
    """Token-weighted perplexity of ``model`` (in whatever view it is in) over ``windows``.

    NLL is summed in float64 per window, from fp32 log-softmax, so the result does not depend on the
    batch size beyond the model's own arithmetic.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ZooError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        # a long run (minutes per model on a CPU) shows its progress even in a log file, every 30 s
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress,
                          mininterval=0.1 if sys.stderr.isatty() else 30):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            total += nll.double().sum().cpu()
    finally:
        model.train(was_training)
    n, seq_len = windows.shape
    return Perplexity(float(total), n * (seq_len - 1), n, seq_len)
