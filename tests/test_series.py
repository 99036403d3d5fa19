"""The series runner (``recipes.series``) and the output writer (``recipes.report``) on a toy series: every
item runs once, a finished one is kept, ``only`` and ``rerun`` select, a failure is a row, the JSON is
rewritten after every run."""
import json

import pytest

from recipes.report import Outputs, markdown_table
from recipes.series import Item, Series
from zoo.core.errors import ZooError


class Toy(Series):
    title, noun = "toy", "item(s)"

    def __init__(self, tmp_path, **kwargs):
        self.ran, self.seen = [], []
        super().__init__([Item("a"), Item("b", directory="dir_b"), Item("bad")], tmp_path, "toy", **kwargs)

    def done(self, item, run_dir):
        path = run_dir / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def execute(self, item, run_dir):
        self.ran.append(item.name)
        self.seen.append(json.loads((self.out / "toy.json").read_text())["rows"] if self.ran[1:] else [])
        if item.name == "bad":
            return "failed: boom"
        (run_dir / "result.json").write_text(json.dumps({"value": len(self.ran)}))
        return "ok"

    def row(self, item, result, status, run_dir):
        return {"name": item.name, "status": status, "value": (result or {}).get("value")}

    def payload(self, rows):
        return {"rows": rows}


def test_series_runs_each_item_once_and_resumes(tmp_path, capsys):
    toy = Toy(tmp_path)
    rows = toy.run()
    assert toy.ran == ["a", "b", "bad"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed: boom"] and rows[1]["value"] == 2
    assert (tmp_path / "dir_b" / "result.json").is_file()
    assert [r["name"] for r in toy.seen[2]] == ["a", "b"]  # the JSON held the rows so far before the third run
    assert json.loads((tmp_path / "toy.json").read_text())["rows"] == rows
    capsys.readouterr()

    again = Toy(tmp_path)
    assert [r["value"] for r in again.run()] == [1, 2, None]
    assert again.ran == ["bad"]  # only the unfinished one runs again
    assert "=== toy 1/3: a: finished earlier" in capsys.readouterr().out

    only = Toy(tmp_path, only=["a"], rerun=True)
    assert [r["status"] for r in only.run()] == ["ok", "ok", "not run"] and only.ran == ["a"]
    with pytest.raises(ZooError, match=r"unknown item\(s\) \['c'\]; valid: a, b, bad"):
        Toy(tmp_path, only=["c"])


def test_outputs_write_atomically_and_list_what_they_wrote(tmp_path):
    out = Outputs(tmp_path / "new", "report")
    out.json({"x": 1})
    out.markdown(markdown_table(["a", "b"], [[1, 0.5], ["-", float("nan")]]))
    assert json.loads((tmp_path / "new" / "report.json").read_text()) == {"x": 1}
    assert (tmp_path / "new" / "report.md").read_text() == "| a | b |\n|---|---|\n| 1 | 0.5000 |\n| - | - |\n"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["report.json", "report.md"]  # no temp files
    assert out.wrote() == f"wrote {tmp_path / 'new' / 'report.json'} and {tmp_path / 'new' / 'report.md'}"


def test_a_pipe_inside_a_cell_does_not_split_it():
    table = markdown_table(["method", "ppl"], [["ASVD (mean |x|)", 2.5]])
    assert table.splitlines()[-1] == "| ASVD (mean \\|x\\|) | 2.5000 |"
    assert all(line.count("|") - line.count("\\|") == 3 for line in table.splitlines())
