"""EvalPlusGate: non-zero pass@1 on a code smoke set before long runs (source 000, section 3.2 "Gates").

At the end of fit (and, optionally, every N validations) the student generates greedily on a smoke
subset (HE10, MBPP20, ...; offline: "HumanEval (base tests)") and is scored through evalplus. The run
fails if the student solves nothing while the teacher solves something, or (with ``min_fraction``) if
its pass@1 falls below that fraction of the teacher's. The teacher is the same model object under
``teacher_view``; its per-task outcomes are computed once and cached under the zoo cache.

A small teacher may solve none of the first ten tasks, which makes a first-N smoke set vacuous:
``subset="teacher-solved:N"`` is the first N tasks the teacher passes (found once, cached), on which the
teacher scores N/N, so a student regression is visible.
"""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from zoo.core.errors import ZooError, check_choice
from zoo.evaluation import (DATASETS, PROMPT_STYLES, Limits, evaluate, load_problems, parse_teacher_solved,
                            select, teacher_outcomes, teacher_solved)

from .gates import GateFailed


class EvalPlusGate(L.Callback):
    """Greedy pass@1 of the student on a code smoke set, checked against the teacher's.

    Args:
        dataset: ``humaneval`` or ``mbpp``.
        subset: ``HE10``, ``MBPP20``, ``first:N``, ``teacher-solved:N``, task ids, or ``full``.
        min_fraction: also fail when the student's pass@1 is below this fraction of the teacher's
            (None: only the zero rule).
        every_n_validations: also check after every N-th validation (None: at the end of fit only).
        prompt_style: ``auto``, ``chat`` or ``completion``.
        max_new_tokens: generation budget per task.
        batch_size: prompts generated together.
        parallel: sandboxed test processes at once (default: half the CPU cores).
        min_time_limit: evalplus's floor on a test's time limit, in seconds.
        gt_time_limit_factor: evalplus's time limit as a multiple of the canonical solution's time.
        save_results: write each check's student results JSON into the run directory.
    """

    def __init__(self, dataset: str = "humaneval", subset: str = "HE10", min_fraction: float | None = None,
                 every_n_validations: int | None = None, prompt_style: str = "auto", max_new_tokens: int = 512,
                 batch_size: int = 8, parallel: int | None = None, min_time_limit: float = 1.0,
                 gt_time_limit_factor: float = 4.0, save_results: bool = True):
        check_choice("dataset", dataset, DATASETS)
        check_choice("prompt style", prompt_style, PROMPT_STYLES)
        parse_teacher_solved(subset)  # a malformed teacher-solved:N fails at construction, not after training
        if min_fraction is not None and not 0 < min_fraction <= 1:
            raise ZooError(f"min_fraction={min_fraction} must be in (0, 1] (or null for the zero rule only)")
        if every_n_validations is not None and every_n_validations < 1:
            raise ZooError(f"every_n_validations={every_n_validations} must be >= 1 (or null: end of fit only)")
        self.dataset, self.subset, self.min_fraction = dataset, subset, min_fraction
        self.every_n_validations = every_n_validations
        self.settings = dict(prompt_style=prompt_style, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             limits=Limits(min_time_limit, gt_time_limit_factor), parallel=parallel)
        self.save_results = save_results
        self.history: list[dict] = []  # one record per check: step, student and teacher pass@1
        self._validations = 0
        self._problems = None
        self._task_ids: list[str] | None = None

    def on_fit_start(self, trainer, pl_module):
        # rank 0 generates alone; a sharded model needs every rank in each forward, so the others would hang
        if trainer.world_size > 1 and isinstance(trainer.strategy, FSDPStrategy):
            raise ZooError(f"EvalPlusGate generates in one process, which a model sharded over {trainer.world_size} "
                           f"fsdp processes cannot do; use strategy ddp (or one process), or score the saved "
                           f"repair state afterwards with `zoo eval --recipe ... --repair_state ...`")
        # a missing dataset or a bad subset fails here, not after the training it was meant to gate
        self._problems = load_problems(self.dataset)
        if parse_teacher_solved(self.subset) is None:
            self._task_ids = select(self._problems, self.subset)

    def _resolve(self, pl_module) -> tuple[list[str], dict[str, bool]]:
        """The subset's task ids and the teacher's outcomes on them (both cached after the first check)."""
        if self._problems is None:
            self._problems = load_problems(self.dataset)
        model, tokenizer = pl_module.model, pl_module.tokenizer
        identity = (pl_module.teacher, pl_module.dtype_name)
        if self._task_ids is None:
            n = parse_teacher_solved(self.subset)
            self._task_ids = (teacher_solved(model, tokenizer, self._problems, n, *identity, **self.settings)
                              if n else select(self._problems, self.subset))
        teacher = teacher_outcomes(model, tokenizer, self._problems, self._task_ids, *identity, **self.settings)
        return self._task_ids, teacher

    def check(self, trainer: L.Trainer, pl_module) -> str | None:
        """Evaluate the student; return why the gate fails (None: it passes)."""
        with trainer.strategy.precision_plugin.forward_context():
            task_ids, teacher = self._resolve(pl_module)
            result = evaluate(pl_module.model, pl_module.tokenizer, subset=self.subset, problem_set=self._problems,
                              task_ids=task_ids, model_info={"name": "student", "source": pl_module.teacher,
                                                             "step": trainer.global_step}, **self.settings)
        n, student_n, teacher_n = len(task_ids), result.n_passed, sum(teacher.values())
        where = f"{result.label} {self.subset}"
        record = {"step": trainer.global_step, "student_pass@1": student_n / n, "teacher_pass@1": teacher_n / n}
        self.history.append(record)
        pl_module.summary.update({"evalplus_student_pass@1": record["student_pass@1"],
                                  "evalplus_teacher_pass@1": record["teacher_pass@1"]})
        for logger in trainer.loggers:
            logger.log_metrics({"evalplus_student_pass@1": record["student_pass@1"],
                                "evalplus_teacher_pass@1": record["teacher_pass@1"]}, step=trainer.global_step)
        if self.save_results:
            slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{self.dataset}-{self.subset}")
            result.save(Path(trainer.default_root_dir) / f"evalplus_{slug}_step{trainer.global_step}.json")
        rank_zero_info(f"EvalPlusGate: {where}: student {student_n}/{n}, teacher {teacher_n}/{n}")
        if teacher_n == 0:
            rank_zero_warn(f"EvalPlusGate: the teacher solves none of {where}, so the gate cannot fail; "
                           f"use subset='teacher-solved:{min(n, 10)}' for a subset the teacher solves")
            return None
        if student_n == 0:
            return (f"EvalPlusGate: the student's pass@1 on {where} is 0/{n} while the teacher's is "
                    f"{teacher_n}/{n} (step {trainer.global_step})")
        if self.min_fraction is not None and student_n < self.min_fraction * teacher_n:
            return (f"EvalPlusGate: the student's pass@1 on {where} is {student_n}/{n}, below "
                    f"min_fraction={self.min_fraction} of the teacher's {teacher_n}/{n} (step {trainer.global_step})")
        return None

    def _gate(self, trainer, pl_module) -> None:
        # one process evaluates; the others wait for its verdict so every rank stops together
        failure = self.check(trainer, pl_module) if trainer.is_global_zero else None
        failure = trainer.strategy.broadcast(failure, src=0)
        if failure:
            raise GateFailed(failure)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.every_n_validations is None or trainer.state.fn != "fit":
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._gate(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return  # the last validation already checked this very student
        self._gate(trainer, pl_module)
