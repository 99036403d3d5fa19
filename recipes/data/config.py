"""The data settings every DataModule shares: the split names, the cache format, the code / hologram /
teacher-logit config dataclasses and their checks, and the small helpers the other modules use
(the cache-key hash, running a step in every process, the teacher on a device)."""
from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.core.distributed import all_true
from zoo.core.errors import ZooError, check_choice
from zoo.core.models import DTYPES
from zoo.core.surgery import teacher_view

#: (token ids, loss mask); ``loss_mask[t] = 1`` makes token t a distillation target
Document = tuple[list[int], list[int]]

#: split names; pools are filled in this order, so the heldout set does not move when n_train changes
SPLITS = ("heldout", "calibration", "train")
FORMAT_VERSION = 2  # 2: packed splits in the zoo cache (safetensors, checked on read)
PACKED_COLUMNS = ("input_ids", "loss_mask", "source")


@dataclass
class CodeConfig:
    """Where code / instruction documents come from.

    Args:
        source: ``"stdlib"`` (the running interpreter's standard library, test suites and
            site-packages skipped) or a directory of source files.
        pattern: fnmatch pattern over paths relative to ``source`` (``*`` also crosses ``/``).
        max_files: at most this many files, chosen deterministically with the seed.
        max_chars_per_file: files are cut (at a line end) to this many characters.
        dataset: instead of a source tree, a hub dataset id or a local ``save_to_disk`` directory.
        dataset_config: the hub dataset's configuration name.
        dataset_split: which split of the dataset to read.
        messages_field: column with chat messages (``[{"role", "content"}, ...]``), rendered with the
            tokenizer's chat template; only assistant turns count in the loss (response-only).
        prompt_field: with ``response_field``: a prompt column and a response column instead of
            messages (response-only loss).
        response_field: see ``prompt_field``.
        text_field: a plain-text column instead (every token counts).
        max_examples: at most this many dataset rows, chosen deterministically with the seed.
        num_shards: cut the files (or dataset rows) into this many disjoint shards, before ``max_files`` /
            ``max_examples`` apply within the shard (e.g. one LoRA adapter per shard: ``zoo bank``).
        shard: which shard to read, in ``[0, num_shards)``.
    """

    source: str = "stdlib"
    pattern: str = "**/*.py"
    max_files: int = 400
    max_chars_per_file: int = 12000
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    messages_field: str = "messages"
    prompt_field: str | None = None
    response_field: str | None = None
    text_field: str | None = None
    max_examples: int = 2000
    num_shards: int = 1
    shard: int = 0


#: built-in hologram prompts: short and varied (code, prose, math, dialogue, ...)
DEFAULT_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash table is and when you would use one.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What is the derivative of x^3 * sin(x)? Show the steps.",
    "Summarize the causes of the French Revolution in a few sentences.",
    "Write a SQL query that returns the ten most recent orders per customer.",
    "How do I reverse a linked list in place? Give code.",
    "Give me three tips for learning a new language as an adult.",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "Write a haiku about autumn rain.",
    "Hi! Can you help me plan a weekend trip to the mountains?",
    "Explain recursion to a ten-year-old.",
    "Write a bash command that counts the lines in all .py files in a directory.",
    "What are the differences between a list and a tuple in Python?",
    "Prove that the sum of two even numbers is even.",
    "Describe how photosynthesis works.",
    "Write a JavaScript function that debounces another function.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Compose a polite email declining a meeting invitation.",
    "Solve for x: 3x + 7 = 22.",
    "Write a Python class for a simple bank account with deposit and withdraw methods.",
    "What would happen if the Moon were twice as far from Earth?",
)


@dataclass
class HologramConfig:
    """Teacher-generated samples: the source's Dreamer/Hologram (000, sections 2.5, 4.3).

    Args:
        n_samples: number of generated samples.
        max_new_tokens: tokens generated per sample at most (a row stops at EOS).
        gen_batch_size: samples generated together; also the shard size of the on-disk cache, so an
            interrupted generation resumes at the last finished batch.
        bos_fraction: share of samples that start from BOS alone; the rest start from a prompt.
        temperature: (low, high): each sample's temperature is drawn uniformly from this range.
        top_p: (low, high): each sample's nucleus mass is drawn uniformly from this range.
        prompts: seeding prompts (default: ~20 built-in ones), rendered with the chat template when the
            tokenizer has one.
        dtype: the teacher's dtype for generation; use the model's dtype so one teacher object is shared.
    """

    n_samples: int = 64
    max_new_tokens: int = 128
    gen_batch_size: int = 16
    bos_fraction: float = 0.5
    temperature: tuple[float, float] = (0.7, 1.1)
    top_p: tuple[float, float] = (0.85, 1.0)
    prompts: list[str] | None = None
    dtype: str = "float32"


@dataclass
class TeacherLogitsConfig:
    """Precompute the teacher's predictions on the train split once, so repair runs without a teacher
    forward (issue 9, "Teacher-logit cache"). An approximation: see ``zoo.core.losses.cached_token_kl``.

    Per prediction it keeps the log-probabilities of the teacher's ``top_k`` most likely tokens and the
    log of the remaining mass (one "rest" bucket), of softmax(logits / ``temperature``); the repair
    then minimizes KL over those k + 1 outcomes, a lower bound of the exact KL.

    Args:
        top_k: tokens kept per prediction.
        temperature: must equal the module's distillation temperature (checked when training starts).
        batch_size: blocks per teacher forward; also the shard size of the on-disk cache, so an
            interrupted precomputation resumes at the last finished shard.
        dtype: the teacher's dtype for the forward; use the model's dtype so one teacher object is shared.
    """

    top_k: int = 64
    temperature: float = 1.0
    batch_size: int = 8
    dtype: str = "float32"


def validate_teacher_logits_config(cfg: TeacherLogitsConfig) -> None:
    for name in ("top_k", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ZooError(f"teacher_logits.{name}={getattr(cfg, name)} must be at least 1")
    if not cfg.temperature > 0:
        raise ZooError(f"teacher_logits.temperature={cfg.temperature} must be > 0")
    check_choice("teacher_logits.dtype", cfg.dtype, DTYPES)


#: batch keys of the cached teacher distribution (``cached_token_kl``'s inputs)
TEACHER_CACHE_KEYS = ("teacher_top_logp", "teacher_top_ids", "teacher_rest_logp")


def _check_range(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ZooError(f"{name}={value!r} is outside {bracket}{low}, {high}]")


def validate_code_config(cfg: CodeConfig) -> None:
    """Raise a ZooError for a code config that cannot work (checked before any data is read)."""
    if cfg.max_files < 1:
        raise ZooError(f"code.max_files={cfg.max_files} must be at least 1")
    if cfg.max_chars_per_file < 1:
        raise ZooError(f"code.max_chars_per_file={cfg.max_chars_per_file} must be at least 1")
    if cfg.max_examples < 1:
        raise ZooError(f"code.max_examples={cfg.max_examples} must be at least 1")
    if cfg.num_shards < 1 or not 0 <= cfg.shard < cfg.num_shards:
        raise ZooError(f"code.shard={cfg.shard} of code.num_shards={cfg.num_shards}: need num_shards >= 1 and "
                       f"0 <= shard < num_shards")
    if (cfg.prompt_field is None) != (cfg.response_field is None):
        raise ZooError(
            f"code.prompt_field={cfg.prompt_field!r} and code.response_field={cfg.response_field!r}: "
            "set both (prompt/response columns) or neither (messages or text column)"
        )
    if cfg.dataset is None and cfg.source != "stdlib":
        root = Path(cfg.source).expanduser()
        if not root.is_dir():
            raise ZooError(
                f"code.source {cfg.source!r} is not a directory; valid choices: 'stdlib' or an existing "
                "directory of source files (or set code.dataset to a dataset)"
            )


def validate_hologram_config(cfg: HologramConfig) -> None:
    for name in ("n_samples", "max_new_tokens", "gen_batch_size"):
        if getattr(cfg, name) < 1:
            raise ZooError(f"hologram.{name}={getattr(cfg, name)} must be at least 1")
    _check_range("hologram.bos_fraction", cfg.bos_fraction, 0.0, 1.0)
    for name, low_bound, high_bound in (("temperature", 0.0, math.inf), ("top_p", 0.0, 1.0)):
        value = tuple(getattr(cfg, name))
        if len(value) != 2 or value[0] > value[1]:
            raise ZooError(f"hologram.{name}={value!r} must be a (low, high) pair with low <= high")
        for v in value:
            _check_range(f"hologram.{name}", v, low_bound, high_bound, low_open=True)
    if cfg.prompts is not None and not cfg.prompts and cfg.bos_fraction < 1:
        raise ZooError("hologram.prompts is empty; give prompts, leave it unset, or set bos_fraction=1")
    check_choice("hologram.dtype", cfg.dtype, DTYPES)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]



def _together(step, what: str) -> None:
    """Run ``step`` in every process, then wait for all: a failure anywhere fails every process
    (instead of leaving the others waiting at a barrier)."""
    error = None
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the others learn of it
        error = exc
    if not all_true(error is None):
        if error is not None:
            raise error
        raise ZooError(f"another process failed while {what} (its error is in its output)")



@contextmanager
def teacher_on(model, device):
    """``model`` on ``device`` in eval mode, as the pristine teacher and without gradients; afterwards back on
    its own device and in its own mode, also after an error or an interrupt."""
    home, was_training = next(model.parameters()).device, model.training
    model.to(device).eval()
    try:
        with teacher_view(model), torch.no_grad():
            yield model
    finally:
        model.to(home)
        model.train(was_training)
