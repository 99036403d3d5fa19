"""Code documents: source files of a local tree (default: the running interpreter's standard library,
real code that needs no network), or an instruction / text dataset from the hub or a local
``save_to_disk`` directory (chat template applied, response-only loss mask)."""
from __future__ import annotations

import fnmatch
import os
import random
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from zoo.core.errors import ZooError, check_choice

from .config import CodeConfig, Document, _hash

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".venv", "venv", "node_modules"}
STDLIB_TEST_DIRS = {"test", "tests", "idle_test", "unittest"}


def _source_root(cfg: CodeConfig) -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) if cfg.source == "stdlib" else Path(cfg.source).expanduser()


def code_files(cfg: CodeConfig, seed: int) -> tuple[Path, list[Path]]:
    """(root, selected files): matching files under the source, at most ``max_files`` of them."""
    root = _source_root(cfg)
    if not root.is_dir():
        raise ZooError(f"code.source {cfg.source!r} is not a directory")
    stdlib = cfg.source == "stdlib"
    patterns = [cfg.pattern] + ([cfg.pattern[3:]] if cfg.pattern.startswith("**/") else [])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not (stdlib and d in STDLIB_TEST_DIRS)]
        for name in filenames:
            if stdlib and name.startswith("test_"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if any(fnmatch.fnmatch(rel, p) for p in patterns):
                found.append(Path(rel))
    found.sort()
    if not found:
        raise ZooError(f"no files match code.pattern {cfg.pattern!r} under code.source {cfg.source!r} ({root})")
    found = found[cfg.shard::cfg.num_shards]  # disjoint shards of the sorted file list
    if not found:
        raise ZooError(f"code.shard={cfg.shard} of code.num_shards={cfg.num_shards} is empty; use fewer shards")
    if len(found) > cfg.max_files:
        found = sorted(random.Random(f"code-files:{seed}").sample(found, cfg.max_files))
    return root, found


def _read_code(path: Path, max_chars: int) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    if len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        text = text[: cut + 1 if cut > 0 else max_chars]
    return text


def render_conversation(messages: Sequence[dict], tokenizer) -> Document:
    """Tokens of a chat, with ``loss_mask = 1`` on the assistant turns only (response-only).

    With a chat template, an assistant turn spans from the end of the rendered history with the
    generation prompt to the end of the rendered history including the turn (so the turn's
    end-of-message tokens count too). Without one, turns are joined with blank lines.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    spans: list[tuple[int, int]] = []
    if getattr(tokenizer, "chat_template", None):
        def render(msgs, gen=False):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

        text = render(messages)
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = len(render(messages[:i], gen=True)), len(render(messages[: i + 1]))
            if not (text.startswith(render(messages[: i + 1])) and start < end):
                # a template that rewrites history: fall back to locating the content itself
                start = text.find(m["content"], cursor)
                if start < 0:
                    continue
                end = start + len(m["content"])
            spans.append((start, end))
            cursor = end
    else:
        parts, pos = [], 0
        for m in messages:
            if parts:
                pos += 2
            if m["role"] == "assistant":
                spans.append((pos, pos + len(m["content"])))
            parts.append(m["content"])
            pos += len(m["content"])
        text = "\n\n".join(parts)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _load_rows(cfg: CodeConfig, seed: int):
    import datasets

    path = Path(cfg.dataset).expanduser()
    if path.exists():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure is the user's directory
            raise ZooError(f"code.dataset {cfg.dataset!r} is not a datasets save_to_disk directory: {exc}") from None
    elif cfg.dataset.startswith((".", "/", "~")):
        raise ZooError(f"code.dataset directory {cfg.dataset!r} does not exist")
    else:
        try:
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split)
        except Exception as exc:  # noqa: BLE001 - network, unknown id, bad config: all user-facing
            raise ZooError(
                f"could not load code.dataset {cfg.dataset!r} (config {cfg.dataset_config!r}, split "
                f"{cfg.dataset_split!r}): {exc}"
            ) from None
    if isinstance(ds, datasets.DatasetDict):
        check_choice("code.dataset_split", cfg.dataset_split, list(ds))
        ds = ds[cfg.dataset_split]
    if cfg.prompt_field is not None:
        wanted = {"code.prompt_field": cfg.prompt_field, "code.response_field": cfg.response_field}
    elif cfg.text_field is not None:
        wanted = {"code.text_field": cfg.text_field}
    else:
        wanted = {"code.messages_field": cfg.messages_field}
    for setting, column in wanted.items():
        if column not in ds.column_names:
            raise ZooError(
                f"{setting}={column!r} is not a column of dataset {cfg.dataset!r}; columns: "
                f"{', '.join(ds.column_names)}"
            )
    if cfg.num_shards > 1:
        ds = ds.shard(cfg.num_shards, cfg.shard, contiguous=False)
    if len(ds) > cfg.max_examples:
        ds = ds.shuffle(seed=seed).select(range(cfg.max_examples))
    return ds


def code_documents(cfg: CodeConfig, tokenizer, seed: int) -> list[Document]:
    """Documents from the configured code tree or dataset (see ``CodeConfig``)."""
    if cfg.dataset is None:
        root, files = code_files(cfg, seed)
        texts = [t for t in (_read_code(root / f, cfg.max_chars_per_file) for f in files) if t.strip()]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(list(x), [1] * len(x)) for x in ids if x]
    rows = _load_rows(cfg, seed)
    if cfg.text_field is not None:
        texts = [t for t in rows[cfg.text_field] if t]
        return [(list(x), [1] * len(x)) for x in tokenizer(texts, add_special_tokens=False)["input_ids"] if x]
    docs = []
    for row in rows:
        if cfg.prompt_field is not None:
            messages = [{"role": "user", "content": str(row[cfg.prompt_field])},
                        {"role": "assistant", "content": str(row[cfg.response_field])}]
        else:
            messages = row[cfg.messages_field]
        ids, mask = render_conversation(messages, tokenizer)
        if any(mask):  # a conversation without an assistant turn has nothing to distil
            docs.append((ids, mask))
    return docs


def code_fingerprint(cfg: CodeConfig, seed: int) -> dict:
    """What identifies the code documents, cheaply: the selected files' sizes and mtimes, or the dataset."""
    if cfg.dataset is None:
        root, files = code_files(cfg, seed)
        stats = [(str(f), (root / f).stat().st_size, (root / f).stat().st_mtime_ns) for f in files]
        return {"root": str(root.resolve()), "files": _hash(stats)}
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        import datasets

        ds = datasets.load_from_disk(str(path))
        fp = {k: v._fingerprint for k, v in ds.items()} if isinstance(ds, datasets.DatasetDict) else ds._fingerprint
        return {"dataset_dir": str(path.resolve()), "fingerprint": fp}
    return {"dataset": cfg.dataset}

