"""A small local multiple-choice task for ``zoo lm-eval`` (issue 27: out-of-domain accuracy in every frontier
item, no network): next-sentence choice on CPython's pydoc topics (``pydoc_data.topics``, the language
reference shipped with the interpreter, the prose the frontier's prose stage also reads). Each item is two
consecutive sentences of one topic as the context; the choices are the sentence that follows and three
sentences of other topics, HellaSwag's format (lm-eval's ``acc_norm``: the choice with the highest
per-character log-likelihood, the choices differing in length). The items are drawn with a fixed seed, so
every item of a frontier, and every frontier on the same interpreter, reads the same task."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from zoo.core.errors import ZooError, check_at_least

TASK = "zoo_pydoc_next_sentence"
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(text: str) -> list[str]:
    """The prose sentences of a topic: paragraphs joined, code lines (indented) and headings dropped, cut
    at a stop before a capital; 40 to 240 characters (shorter ones are mostly fragments, longer ones lists)."""
    prose = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or lines[0].startswith((" ", "\t")) or set(lines[-1].strip()) <= set("*=-"):
            continue
        prose += SENTENCE.split(" ".join(line.strip() for line in lines))
    return [s for s in prose if 40 <= len(s) <= 240 and s[-1] in ".!?"]


def next_sentence_items(n_items: int, seed: int = 0) -> list[dict]:
    """``n_items`` items (``context``, ``choices``, ``answer``) from the pydoc topics."""
    from zoo.evaluation.perplexity import pydoc_topics

    check_at_least(1, mc_items=n_items)
    topics = [sentences(t) for t in pydoc_topics().texts]
    rng = random.Random(seed)
    slots = [(t, i) for t, ss in enumerate(topics) for i in range(len(ss) - 2)]
    if len(slots) < n_items:
        raise ZooError(f"mc_items={n_items}: the pydoc topics hold {len(slots)} items; give at most that")
    items = []
    for t, i in rng.sample(slots, n_items):
        others = [s for u, ss in enumerate(topics) if u != t for s in ss]
        choices = [topics[t][i + 2], *rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": f"{topics[t][i]} {topics[t][i + 1]}", "choices": [choices[k] for k in order],
                      "answer": order.index(0)})
    return items


def write_task(folder: str | Path, n_items: int, seed: int = 0) -> Path:
    """The task YAML (and its JSONL, by absolute path: lm-eval reads it from any directory) in ``folder``."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in next_sentence_items(n_items, seed)))
    spec = {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "target_delimiter": " ", "doc_to_choice": "choices", "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "items": n_items, "seed": seed}}
    path = folder / f"{TASK}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
