"""Greedy, batched code generation for HumanEval+/MBPP+ (source 000, section 3.1: "EvalPlus pass@1").

Prompts follow evalplus's own codegen, so numbers compare with published EvalPlus results: a chat
model gets evalplus's instruction and a response pre-filled up to a ```python fence
(``evalplus.provider.utility.make_raw_chat_prompt``); a base model (no chat template) completes the
problem's prompt. Generation stops at evalplus's stop strings.

Determinism: greedy decoding, prompts batched in a fixed order (longest first, ties by dataset order)
and left-padded by hand, so the same model, batch size and device give the same text every run.

Resumable: with a ``journal`` file every finished batch is appended to it, and a rerun with the same
prompts, settings and weights skips those batches; the remaining batches are the same batches as in an
uninterrupted run, so an interrupted and resumed run gives the same text.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from ..core.errors import check_choice

log = logging.getLogger(__name__)

PROMPT_STYLES = ("auto", "chat", "completion")
# evalplus.codegen's instruction for greedy HumanEval+/MBPP+ runs (local variables there, so copied)
INSTRUCTION_PREFIX = ("Please provide a self-contained Python script that solves the following problem in a "
                      "markdown code block:")
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem and passes "
                   "corresponding tests:")


def resolve_style(tokenizer, style: str = "auto") -> str:
    """``chat`` when the tokenizer has a chat template (instruct models), else ``completion``."""
    check_choice("prompt style", style, PROMPT_STYLES)
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "completion"
    return style


def build_prompt(task_prompt: str, tokenizer, style: str) -> str:
    from evalplus.provider.utility import make_raw_chat_prompt

    task_prompt = task_prompt.strip() + "\n"
    if style == "chat":
        return make_raw_chat_prompt(task_prompt, INSTRUCTION_PREFIX, RESPONSE_PREFIX, tokenizer)
    return task_prompt


def stop_strings(dataset: str, style: str) -> list[str]:
    from evalplus.provider.utility import EOS, extra_eos_for_direct_completion

    return [*EOS, "\n```\n"] if style == "chat" else [*EOS, *extra_eos_for_direct_completion(dataset)]


def truncate_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut].replace("\t", "    ")


class _StopOnStrings(StoppingCriteria):
    """Per-sequence stop once any stop string appears in the generated text.

    Decodes only the last few tokens of each row per step (a stop string spans at most as many tokens
    as it has characters), which is cheap next to transformers' ``stop_strings`` vocabulary tables.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len
        self.window = max(map(len, stops)) + 2

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_len:]
        tails = self.tokenizer.batch_decode(new[:, -self.window:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], device=input_ids.device)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], stops: list[str], max_new_tokens: int = 512,
             batch_size: int = 8, add_special_tokens: bool = False, progress: bool = True,
             journal: str | Path | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (in their order), each cut at its first stop string.

    The tokenizer is shared with the rest of the process, so padding is done here rather than by
    changing its ``padding_side``. ``journal``: a JSONL file that makes the run resumable (module doc).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    outputs: list[str] = [""] * len(prompts)
    done = _Journal(journal, _run_key(model, encoded, stops, max_new_tokens, batch_size)) if journal else None
    bar = tqdm(total=len(prompts), desc="generating", unit="task", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if done is not None and start in done.batches:
            for i, text in zip(batch, done.batches[start]):
                outputs[i] = text
            bar.update(len(batch))
            continue
        ids, mask = _left_pad([encoded[i] for i in batch], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, temperature=None, top_p=None, top_k=None,
            max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([_StopOnStrings(tokenizer, stops, ids.shape[1])]),
        )
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            outputs[i] = truncate_at_stop(text, stops)
        if done is not None:
            done.append(start, [outputs[i] for i in batch])
        bar.update(len(batch))
    bar.close()
    return outputs


def _run_key(model, encoded: list[list[int]], stops: list[str], max_new_tokens: int, batch_size: int) -> str:
    """What a journal's batches depend on: the token ids, the settings, and the weights (a sum per tensor
    is enough to tell a different repair state or adapter from the same one)."""
    weights = [float(p.float().sum()) for p in model.parameters()]  # called under generate's inference_mode
    blob = json.dumps([encoded, stops, max_new_tokens, batch_size, weights])
    return hashlib.sha256(blob.encode()).hexdigest()


class _Journal:
    """Finished batches of one generation run: a key line, then one line per batch, appended as they finish."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key
        self.batches: dict[int, list[str]] = {}
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        if lines and _json_line(lines[0]).get("key") == key:
            kept = [lines[0]]
            for line in lines[1:]:
                entry = _json_line(line)  # a line cut by an interruption is skipped (its batch reruns)
                if "batch" in entry:
                    self.batches[entry["batch"]] = entry["outputs"]
                    kept.append(line)
            if self.batches:
                n = sum(map(len, self.batches.values()))
                log.warning("resuming generation from %s: %d prompt(s) already generated", self.path, n)
            # rewritten without the cut line, which the next appended batch would otherwise run into
            self.path.write_text("".join(line + "\n" for line in kept))
        else:
            if lines:
                log.warning("%s belongs to another run (prompts, settings or weights differ); starting over", self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"key": key}) + "\n")

    def append(self, start: int, outputs: list[str]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"batch": start, "outputs": outputs}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _json_line(line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
