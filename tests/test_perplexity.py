"""``zoo ppl``: perplexity in non-overlapping windows, token-weighted, against a plain reference loop over a
Hugging Face model (``labels=`` loss per window); teacher and student side by side from a recipe; the
offline default source; one-line errors for bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zoo_cli import write_rank1_recipe, zoo_cli
from zoo.evaluation.perplexity import PYDOC_TOPICS, load_texts

SEQ = 64


@pytest.fixture()
def texts(tmp_path):
    from pydoc_data.topics import topics

    rows = [topics[k] for k in ("assert", "assignment", "if", "while")]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path, rows


def reference_ppl(model_dir, texts, seq_len, max_windows=None) -> float:
    """The papers' loop (GPTQ's llama_eval): one tokenization of the joined texts, whole windows, HF loss."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids
    n = ids.shape[1] // seq_len
    n = min(n, max_windows or n)
    nlls = []
    with torch.no_grad():
        for i in range(n):
            window = ids[:, i * seq_len:(i + 1) * seq_len]
            nlls.append(model(window, labels=window).loss.double() * (seq_len - 1))
    return math.exp(torch.stack(nlls).sum() / (n * (seq_len - 1)))


def test_zoo_ppl_equals_a_plain_reference_loop(tiny_teacher_dir, texts, tmp_path, capsys):
    path, rows = texts
    out = tmp_path / "ppl.json"
    code, stdout, err = zoo_cli(["ppl", "--model", tiny_teacher_dir, "--source", str(path), "--seq_len", str(SEQ),
                                 "--batch_size", "3", "--output", str(out), "--logger", "false"], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    figure = result["ppl"]["model"]
    assert figure["ppl"] == pytest.approx(reference_ppl(tiny_teacher_dir, rows, SEQ), rel=1e-4)
    n = result["n_windows"]
    assert n > 10 and figure["n_tokens"] == n * (SEQ - 1) and result["source"]["n_texts"] == 4
    assert f"{n} windows x {SEQ} tokens" in stdout and f"ppl = {figure['ppl']:.4f}" in stdout


def test_zoo_ppl_of_a_recipe_gives_student_and_teacher_from_one_model(tiny_teacher_dir, texts, tmp_path, capsys):
    path, rows = texts
    recipe = write_rank1_recipe(tmp_path, tiny_teacher_dir)
    out = tmp_path / "ppl.json"
    code, stdout, err = zoo_cli(["ppl", "--recipe", str(recipe), "--source", str(path), "--seq_len", str(SEQ),
                                 "--max_windows", "5", "--output", str(out), "--logger", "false"], capsys)
    assert code == 0, err
    figures = json.loads(out.read_text())["ppl"]
    assert set(figures) == {"teacher", "student"}
    assert figures["teacher"]["ppl"] == pytest.approx(reference_ppl(tiny_teacher_dir, rows, SEQ, 5), rel=1e-4)
    assert figures["student"]["ppl"] != pytest.approx(figures["teacher"]["ppl"], rel=1e-4)  # rank 1 changes it
    assert "teacher (" in stdout and "student (" in stdout and "student / teacher ppl" in stdout


def test_the_offline_default_source_is_the_language_reference_topics():
    from pydoc_data.topics import topics

    source = load_texts(PYDOC_TOPICS)
    assert source.kind == PYDOC_TOPICS and source.texts == [topics[k] for k in sorted(topics)]
    assert source.describe()["n_chars"] > 400_000  # its SmolLM2 token count: the slow test in test_lm_eval.py


def test_a_directory_of_text_files_is_one_source_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth"}\n')
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "skip.bin").write_text("not text")
    assert load_texts(str(tmp_path)).texts == ["first", "second", "third", "fourth"]


@pytest.mark.parametrize("args, message", [
    (["--source", "{short}", "--seq_len", "64"], "tokens, fewer than one window of seq_len 64"),
    (["--seq_len", "1024"], "seq_len 1024 is above the model's maximum sequence length 512"),
    (["--source", "no_such_dataset_xyz"], "text source 'no_such_dataset_xyz' is not 'pydoc-topics', a local file"),
    (["--source", "{bad_field}"], "has no field 'text' (set --text_field; it has: body)"),
])
def test_zoo_ppl_user_errors_are_one_line(args, message, tiny_teacher_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "short.txt").write_text("hello world")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    args = [a.format(short=tmp_path / "short.txt", bad_field=tmp_path / "bad.jsonl") for a in args]
    code, _, err = zoo_cli(["ppl", "--model", tiny_teacher_dir, *args, "--output_dir", str(tmp_path),
                            "--logger", "false"], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("zoo: error:") == 1 and err.strip().splitlines()[-1].startswith("zoo: error:"), err
