"""``zoo eval`` writes evalplus's samples format next to its results: evalplus's own evaluator
(``python -m evalplus.evaluate --dataset humaneval --samples ...``), run as a separate program on that file,
gives the same pass/fail per task as the zoo's result.

evalplus needs its HumanEval+ file, which cannot be downloaded offline; the test points evalplus (and the
zoo) at a local file in evalplus's HumanEval+ format through ``HUMANEVAL_OVERRIDE_PATH``, so both score
the same problems with base and plus inputs. The generations are fixed (generation is not what is tested:
right, right on base inputs only, wrong, a syntax error, chatter around right code).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from zoo_cli import zoo_cli
from zoo.evaluation import harness, load_result, samples_path


def write_plus(path):
    def task(i, entry, prompt, solution, base, plus):
        return {"task_id": f"HumanEval/{i}", "entry_point": entry, "prompt": prompt, "canonical_solution": solution,
                "contract": "", "atol": 0, "base_input": base, "plus_input": plus}

    rows = [
        task(0, "add", 'def add(a, b):\n    """a + b"""\n', "    return a + b\n", [[1, 2], [3, 4]], [[10**6, -7]]),
        task(1, "absolute", 'def absolute(x):\n    """|x|"""\n', "    return abs(x)\n", [[1], [5]], [[-3]]),
        task(2, "double", 'def double(x):\n    """2x"""\n', "    return 2 * x\n", [[1], [2]], [[-4]]),
        task(3, "neg", 'def neg(x):\n    """-x"""\n', "    return -x\n", [[1]], [[0]]),
        task(4, "square", 'def square(x):\n    """x*x"""\n', "    return x * x\n", [[2], [3]], [[-5]]),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ANSWERS = [
    "def add(a, b):\n    return a + b\n",
    "def absolute(x):\n    return x\n",  # passes the base inputs only
    "def double(x):\n    return x + 1\n",  # wrong
    "def neg(x)\n    return -x\n",  # syntax error
    "Here it is:\n```python\ndef square(x):\n    return x * x\n```\nHope this helps.",
]


def test_evalplus_scores_zoo_eval_samples_as_the_zoo_does(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    plus = write_plus(tmp_path / "HumanEvalPlus-local.jsonl")
    monkeypatch.setenv("HUMANEVAL_OVERRIDE_PATH", str(plus))
    monkeypatch.setattr(harness, "generate", lambda model, tokenizer, prompts, *a, **k: ANSWERS[:len(prompts)])
    out = tmp_path / "eval" / "tiny.json"
    code, stdout, err = zoo_cli(["eval", "--model", tiny_teacher_dir, "--subset", "full", "--output", str(out)], capsys)
    assert code == 0, err
    result = load_result(out)
    zoo = {t.task_id: (t.base_status, t.plus_status, t.passed) for t in result.tasks}
    assert [v[2] for v in zoo.values()] == [True, False, False, False, True]

    samples = samples_path(out)
    assert samples.name == "tiny.samples.jsonl" and str(samples) in stdout
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"task_id", "solution"}] * 5
    assert rows[4]["solution"] == "def square(x):\n    return x * x"  # sanitized, as the zoo scored it

    env = dict(os.environ, HUMANEVAL_OVERRIDE_PATH=str(plus), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    proc = subprocess.run([sys.executable, "-m", "evalplus.evaluate", "--dataset", "humaneval", "--samples",
                           str(samples), "--parallel", "2"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evalplus = json.loads(samples.with_name("tiny.samples_eval_results.json").read_text())["eval"]
    theirs = {}
    for task_id, [row] in evalplus.items():
        theirs[task_id] = (row["base_status"], row["plus_status"],
                           row["base_status"] == "pass" and row["plus_status"] == "pass")
    assert theirs == zoo
    assert theirs["HumanEval/1"] == ("pass", "fail", False)
