"""benchmarks/export_speed.py (issue 26) as a dry run: tiny models, every student, both dtypes and batches, in
seconds; the rows carry what the README's table reads, related to the dense rows of the same setting."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import export_speed  # noqa: E402
import gemv_ceiling  # noqa: E402


def test_quick_run_writes_every_row_against_the_dense_model(tiny_teacher_dir, tmp_path):
    out = tmp_path / "results.json"
    export_speed.main(["--quick", "--teacher", tiny_teacher_dir, "--output", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    keys = {(r["model"], r["dtype"], r["batch"], r["kernel"], r["student"]) for r in rows}
    assert keys == {(m, d, b, k, s) for m in ("embedded", "1b") for d in ("float32", "bfloat16") for b in (1, 8)
                    for k in export_speed.KERNELS for s in ["dense", *export_speed.STUDENTS]}
    for r in rows:
        assert {"bytes_ratio", "decode_speedup", "prefill_speedup", "decode_of_limit"} <= set(r)
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        assert abs(r["decode_of_limit"] * r["limit"] - r["decode_speedup"]) < 1e-9
        if r["student"] == "dense":
            assert r["bytes_ratio"] == 1.0
        elif r["student"].startswith("svdllm"):  # a rank ratio below 1 stores fewer bytes than the dense maps
            assert r["bytes_ratio"] < 1.0
        if r["kernel"] == "stock":
            assert r["decode_vs_stock_dense"] == r["decode_speedup"]
    ratios = {r["student"]: r["bytes_ratio"] for r in rows
              if (r["model"], r["dtype"], r["batch"], r["kernel"]) == ("1b", "float32", 1, "onednn")}
    assert ratios["svdllm-0.5"] < ratios["svdllm-0.6"] < ratios["svdllm-0.8"] < 1.0
    assert result["command"].startswith("python benchmarks/export_speed.py --quick")


def test_gemv_ceiling_dry_run_relates_every_student_to_the_dense_step(tmp_path):
    rows = gemv_ceiling.main(["--quick", "--output", str(tmp_path / "ceiling.json")])
    kernels = {r["kernel"] for r in rows}
    assert {"stock"} <= kernels <= set(gemv_ceiling.KERNELS)
    for dtype in ("bfloat16", "float32"):
        for kernel in kernels:
            got = {r["student"]: r for r in rows if (r["dtype"], r["kernel"]) == (dtype, kernel)}
            assert set(got) == {"dense", "svdllm-0.8", "svdllm-0.5"}
            assert got["dense"]["ceiling_speedup"] == 1.0 and got["dense"]["bytes_ratio"] == 1.0
            assert got["svdllm-0.5"]["bytes_ratio"] < got["svdllm-0.8"]["bytes_ratio"] < 1.0
            assert all(r["step_ms"] > 0 for r in got.values())
    assert json.loads((tmp_path / "ceiling.json").read_text())["rows"] == rows


def test_onednn_rows_come_a_student_at_a_time_where_every_model_packed_would_not_fit(tmp_path, monkeypatch):
    calls = iter([0])  # the first question (every model at once) gets no memory, each pair all it asks
    monkeypatch.setattr(export_speed, "available_bytes", lambda: next(calls, 1 << 50))
    result = export_speed.main(["--quick", "--models", "1b", "--dtypes", "bfloat16", "--batches", "1",
                                "--output", str(tmp_path / "r.json")])
    onednn = [r for r in result["rows"] if r["kernel"] == "onednn"]
    students = [r for r in onednn if r["student"] != "dense"]
    assert sorted(r["student"] for r in students) == sorted(export_speed.STUDENTS)
    for row in students:  # against the dense run of its own group
        dense = next(r for r in onednn if r["student"] == "dense" and r["group"] == row["group"] == row["student"])
        assert row["decode_speedup"] == row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    assert export_speed.table(result["rows"]).count("| onednn | dense |") == 1
