"""A table of bad inputs and damaged files, each driven through the ``zoo`` CLI in-process: every row must end
with exit code 2, one ``zoo: error:`` line and no traceback, and the message must name the offending value or
file. Rows marked ``early`` give a teacher that does not exist as well: their error must come first, before
any model is loaded."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from test_cli import assert_clean_error, run
from zoo_cli import write_config

MISSING_TEACHER = "no_such_teacher_dir"


def files(tmp_path, teacher_dir) -> None:
    """The damaged and foreign files the rows refer to (``{tmp}`` in a row is ``tmp_path``)."""
    (tmp_path / "garbage.safetensors").write_bytes(b"\x07" * 64)
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "a_file").write_text("")
    (tmp_path / "torn.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    (tmp_path / "not.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something/else"}))
    (tmp_path / "fieldless.json").write_text(json.dumps({"format": "zoo.eval/1", "dataset": {}, "subset": "x"}))
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    (tmp_path / "random.txt").write_bytes(os.urandom(4096))
    (tmp_path / "control.txt").write_text("".join(chr(i % 32) for i in range(4096)))
    config = json.loads(open(f"{teacher_dir}/config.json").read())
    for name, edit in (("string_size", {"hidden_size": "64"}), ("no_layers", {"num_hidden_layers": None}),
                       ("negative_size", {"intermediate_size": -128})):
        (tmp_path / name).mkdir()
        edited = {k: v for k, v in {**config, **edit}.items() if v is not None}
        (tmp_path / name / "config.json").write_text(json.dumps(edited))
    shutil.copytree(teacher_dir, tmp_path / "torn_teacher")
    weights = tmp_path / "torn_teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])


FIT = ["fit", "--config", "{config}"]
EIGEN = ["--model.init_args.parts", "[{{class_path: zoo.EigenAttention, init_args: {{targets: model.layers.*.self_attn}}}}]"]

# (id, argv, needles, early): {config} is a tiny recipe on the tiny teacher, {tmp} the test's directory
ROWS = [
    ("target typo", FIT + ["--model.init_args.parts.targets", "model.layers.0.mlp.dwn_proj"],
     ["dwn_proj", "matches no linear module", "model.layers.0.mlp.down_proj"], False),
    ("target beyond the last layer", FIT + ["--model.init_args.parts.targets", "model.layers.7.mlp.down_proj"],
     ["model.layers.7.mlp.down_proj"], False),
    ("rank above the matrix rank", FIT + ["--model.init_args.parts.rank", "100"], ["rank 100", "= 64"], False),
    ("rank zero", FIT + ["--model.init_args.parts.rank", "0"], ["rank 0", "at least 1"], True),
    ("rank negative", FIT + ["--model.init_args.parts.rank=-1"], ["rank -1", "at least 1"], True),
    ("rank ratio zero", FIT + ["--model.init_args.parts.rank", "0.0"], ["rank ratio 0.0", "(0, 1]"], True),
    ("batch size zero", FIT + ["--data.init_args.batch_size", "0"], ["batch_size=0", "at least 1"], True),
    ("sequence length zero", FIT + ["--data.init_args.seq_len", "0"], ["seq_len=0", "at least 2"], True),
    ("empty config file", ["fit", "--config", "{tmp}/empty.yaml"], ["empty.yaml", "is empty"], True),
    ("config file of a list", ["validate", "--config", "{tmp}/list.yaml"], ["list.yaml", "not a mapping"], True),
    ("teacher config: a size as a string", FIT + ["--model.init_args.teacher", "{tmp}/string_size"],
     ["string_size/config.json", "hidden_size", "'64'"], False),
    ("teacher with a torn weights file", FIT + ["--model.init_args.teacher", "{tmp}/torn_teacher"],
     ["torn_teacher", "not a readable safetensors file"], False),
    ("plan: config without num_hidden_layers", ["plan", "--recipe", "{config}", "--model", "{tmp}/no_layers"],
     ["no_layers/config.json", "no num_hidden_layers"], False),
    ("plan: negative intermediate_size", ["plan", "--recipe", "{config}", "--model", "{tmp}/negative_size"],
     ["negative_size/config.json", "intermediate_size is -128"], False),
    ("plan: a size as a string", ["plan", "--recipe", "{config}", "--model", "{tmp}/string_size"],
     ["string_size/config.json", "hidden_size"], False),
    ("ppl: a source of random bytes", ["ppl", "--model", "{tmp}/" + MISSING_TEACHER, "--source", "{tmp}/random.txt"],
     ["random.txt", "not UTF-8 text"], True),
    ("ppl: a source of control characters", ["ppl", "--model", "{tmp}/" + MISSING_TEACHER, "--source",
                                             "{tmp}/control.txt"], ["control.txt", "not text"], True),
    ("ppl: seq_len zero", ["ppl", "--model", "{tmp}/" + MISSING_TEACHER, "--seq_len", "0"], ["seq_len=0"], True),
    ("ppl: batch_size zero", ["ppl", "--model", "{tmp}/" + MISSING_TEACHER, "--batch_size", "0"], ["batch_size=0"],
     True),
    ("ppl: output under a file", ["ppl", "--model", "{tmp}/" + MISSING_TEACHER, "--output", "{tmp}/a_file/p.json"],
     ["a_file", "not writable"], True),
    ("model option typo", FIT + ["--model.init_args.parts.rnk", "3"], ["rnk", "closest: rank"], True),
    ("technique option given to the module", FIT + ["--model.init_args.rank", "8"],
     ["option of the technique", "--model.init_args.parts.rank"], True),
    ("data option typo", FIT + ["--data.init_args.seq_lem", "3"], ["seq_lem", "closest: seq_len"], True),
    ("trainer option typo", FIT + ["--trainer.max_stepz", "3"], ["max_stepz", "max_steps"], True),
    ("unknown weighting", FIT + ["--model.init_args.parts.weighting", "cov"], ["cov", "covariance, diagonal"], True),
    ("unknown dtype", FIT + ["--model.init_args.dtype", "float8"], ["float8", "float32"], True),
    ("learning rate inf", FIT + ["--model.init_args.lr=inf"], ["lr", "inf"], True),
    ("learning rate nan", FIT + ["--model.init_args.lr=nan"], ["lr", "nan"], True),
    ("temperature inf", FIT + ["--model.init_args.temperature=inf"], ["temperature", "inf"], True),
    ("negative learning rate", FIT + ["--model.init_args.lr=-0.001"], ["lr", "-0.001"], True),
    ("zero temperature", FIT + ["--model.init_args.temperature=0"], ["temperature"], True),
    ("unknown model class", FIT + ["--model", "zoo.NoSuchRepair"], ["NoSuchRepair"], True),
    ("missing config file", ["fit", "--config", "{tmp}/nope.yaml"], ["nope.yaml"], True),
    ("malformed config file", ["fit", "--config", "{tmp}/broken.yaml"], ["broken.yaml"], True),
    ("missing teacher", FIT + ["--model.init_args.teacher", "{tmp}/nope"], ["nope"], True),
    ("torn GGUF teacher", FIT + ["--model.init_args.teacher", "{tmp}/torn.gguf"], ["torn.gguf", "could not be read"],
     False),
    ("missing GGUF teacher", FIT + ["--model.init_args.teacher", "{tmp}/absent.gguf"], ["absent.gguf", "does not exist"],
     False),
    ("ckpt_path URL", ["validate", "--config", "{config}", "--ckpt_path", "https://example.com/s.safetensors"],
     ["https://example.com/s.safetensors", "URL"], True),
    ("ckpt_path Lightning pickle", ["validate", "--config", "{config}", "--ckpt_path", "{tmp}/model.ckpt"],
     ["model.ckpt", "not a repair state"], True),
    ("ckpt_path missing", ["validate", "--config", "{config}", "--ckpt_path", "{tmp}/absent.safetensors"],
     ["absent.safetensors", "does not exist"], True),
    ("ckpt_path garbage", ["validate", "--config", "{config}", "--ckpt_path", "{tmp}/garbage.safetensors"],
     ["garbage.safetensors", "not a safetensors file"], True),
    ("ckpt_path foreign safetensors", ["validate", "--config", "{config}", "--ckpt_path", "{tmp}/foreign.safetensors"],
     ["foreign.safetensors", "not a zoo repair state"], True),
    ("ckpt_path run directory without a state", ["validate", "--config", "{config}", "--ckpt_path", "{tmp}/empty_run"],
     ["empty_run", "repair_state.safetensors"], True),
    ("repair_state garbage", FIT + ["--model.init_args.repair_state", "{tmp}/garbage.safetensors"],
     ["garbage.safetensors"], True),
    ("run directory under a file", FIT + ["--trainer.default_root_dir", "{tmp}/a_file/run"],
     ["a_file", "not writable"], True),
    ("EigenAttention k above head_dim", FIT + EIGEN + ["--model.init_args.parts.k", "100"], ["k", "100"], False),
    ("EigenAttention variance above one", FIT + EIGEN + ["--model.init_args.parts.variance", "1.5"], ["1.5"], True),
    ("unknown command", ["frobnicate"], ["frobnicate", "valid commands"], True),
    ("compare: missing results file", ["compare", "{tmp}/a.json", "{tmp}/b.json"], ["a.json", "does not exist"], True),
    ("compare: not JSON", ["compare", "{tmp}/not.json", "{tmp}/not.json"], ["not.json", "not JSON"], True),
    ("compare: another format", ["compare", "{tmp}/other.json", "{tmp}/other.json"], ["other.json", "zoo eval"], True),
    ("compare: a field missing", ["compare", "{tmp}/fieldless.json", "{tmp}/fieldless.json"],
     ["fieldless.json", "lacks the field"], True),
]


@pytest.mark.parametrize("argv, needles, early", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_ends_in_one_clear_line(argv, needles, early, tmp_path, tiny_teacher_dir, capsys):
    files(tmp_path, tiny_teacher_dir)
    teacher = str(tmp_path / MISSING_TEACHER) if early else tiny_teacher_dir
    config = write_config(tmp_path, teacher, max_steps=1)
    args = [a.format(config=config, tmp=tmp_path) for a in argv]
    code, err = run(args, capsys)
    assert_clean_error(code, err, *[n.format(tmp=tmp_path) for n in needles])
    assert err.count("zoo: error:") == 1
    if early:
        message = err[err.index("zoo: error: "):]
        assert MISSING_TEACHER not in message, "the bad input must be reported before the teacher is looked at"


def test_the_table_is_large_enough():
    assert len(ROWS) >= 50
