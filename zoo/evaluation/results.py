"""Results files of code-benchmark runs and their paired comparison (source 001, phases 11-14:
per-task pass/fail of two models compared with the exact McNemar test).

A result is one JSON file: the dataset (name, version, md5 of the file scored), the subset, the model,
the generation settings, and per task the raw generation, the sanitized solution, evalplus's statuses
and whether it passed. "passed" is the strict score: base and plus tests for HumanEval+/MBPP+, the
original tests for "HumanEval (base tests)".
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from ..core.errors import ZooError

FORMAT = "zoo.eval/1"


@dataclass
class TaskResult:
    task_id: str
    passed: bool
    base_status: str
    plus_status: str | None
    generation: str
    solution: str


@dataclass
class EvalResult:
    dataset: dict  # ProblemSet.describe()
    subset: str
    model: dict
    generation: dict
    tasks: list[TaskResult]
    timing: dict = field(default_factory=dict)
    created: str = ""

    @property
    def label(self) -> str:
        return f"{self.dataset['name']} [{self.dataset['version']}]"

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def n_passed(self) -> int:
        return sum(t.passed for t in self.tasks)

    @property
    def pass_at_1(self) -> float:
        return self.n_passed / max(self.n_tasks, 1)

    @property
    def n_passed_base(self) -> int:
        return sum(t.base_status == "pass" for t in self.tasks)

    def outcomes(self) -> dict[str, bool]:
        return {t.task_id: t.passed for t in self.tasks}

    def summary(self) -> str:
        name = self.model.get("name") or self.model.get("source", "?")
        line = (f"{self.label}, subset {self.subset}, {name}: "
                f"pass@1 = {self.pass_at_1:.1%} ({self.n_passed}/{self.n_tasks})")
        if self.dataset["tests"] == "plus":
            line += f" [base tests only: {self.n_passed_base}/{self.n_tasks}]"
        return line

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self), "n_tasks": self.n_tasks, "n_passed": self.n_passed,
                "pass_at_1": self.pass_at_1}

    @classmethod
    def from_dict(cls, data: dict) -> "EvalResult":
        return cls(dataset=data["dataset"], subset=data["subset"], model=data["model"],
                   generation=data["generation"], tasks=[TaskResult(**t) for t in data["tasks"]],
                   timing=data.get("timing", {}), created=data.get("created", ""))

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): an interrupted run never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    def save_samples(self, path: str | Path) -> Path:
        """The sanitized solutions in evalplus's samples format, one ``{"task_id", "solution"}`` line per
        task, so that ``evalplus.evaluate --samples PATH`` scores the same programs (evalplus runs a
        "solution" as given; a "completion" it would append to the prompt)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps({"task_id": t.task_id, "solution": t.solution}) + "\n" for t in self.tasks))
        os.replace(tmp, path)
        return path


def samples_path(result_path: str | Path) -> Path:
    """Where ``zoo eval`` writes the evalplus samples of the result at ``result_path``: ``x.json`` ->
    ``x.samples.jsonl``."""
    result_path = Path(result_path)
    return result_path.with_name(result_path.stem + ".samples.jsonl")


def load_result(path: str | Path) -> EvalResult:
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"results file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ZooError(f"results file {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ZooError(f"{str(path)!r} is not a `zoo eval` results file (format {FORMAT!r})")
    try:
        return EvalResult.from_dict(data)
    except KeyError as exc:
        raise ZooError(f"results file {str(path)!r} lacks the field {exc.args[0]!r}") from None
    except (TypeError, AttributeError) as exc:
        raise ZooError(f"results file {str(path)!r} has a malformed entry: {exc}") from None


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: a binomial(n, 1/2) test on the n = only_a + only_b discordant pairs.

    p = min(1, 2 * P[X <= min(only_a, only_b)]), computed exactly with integers.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


@dataclass
class PairedComparison:
    a: EvalResult
    b: EvalResult
    task_ids: list[str]
    both: int
    only_a: int
    only_b: int
    neither: int

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.only_a, self.only_b)

    def table(self, name_a: str = "A", name_b: str = "B") -> str:
        n = len(self.task_ids)
        pa, pb = self.both + self.only_a, self.both + self.only_b
        lines = [
            f"{self.a.label}: {n} paired tasks",
            f"  A = {name_a} ({self.a.model.get('name', '?')})",
            f"  B = {name_b} ({self.b.model.get('name', '?')})",
            "",
            f"  both pass   {self.both:5d}",
            f"  only A      {self.only_a:5d}",
            f"  only B      {self.only_b:5d}",
            f"  neither     {self.neither:5d}",
            "",
            f"  pass@1  A {pa / n:6.1%} ({pa}/{n})   B {pb / n:6.1%} ({pb}/{n})   B - A {pb - pa:+d} tasks",
            f"  exact McNemar (two-sided, binomial on {self.only_a + self.only_b} discordant pairs): "
            f"p = {self.p_value:.4g}",
        ]
        return "\n".join(lines)


def compare(a: EvalResult, b: EvalResult) -> PairedComparison:
    """Pair the per-task outcomes of two results on the same dataset (on the tasks both contain)."""
    if a.dataset["name"] != b.dataset["name"] or a.dataset["md5"] != b.dataset["md5"]:
        raise ZooError(f"results are on different datasets: {a.label} (md5 {a.dataset['md5'][:8]}) vs "
                       f"{b.label} (md5 {b.dataset['md5'][:8]}); a paired test needs the same problems and tests")
    outcome_a, outcome_b = a.outcomes(), b.outcomes()
    common = [t for t in outcome_a if t in outcome_b]
    if not common:
        raise ZooError("the two results share no task; evaluate both on the same subset")
    pairs = [(outcome_a[t], outcome_b[t]) for t in common]
    return PairedComparison(a, b, common, both=pairs.count((True, True)), only_a=pairs.count((True, False)),
                            only_b=pairs.count((False, True)), neither=pairs.count((False, False)))
