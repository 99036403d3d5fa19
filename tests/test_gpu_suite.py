"""The GPU suite (benchmarks/gpu_suite.py) on a CPU: its dry run goes through every step and writes every
target unmeasured with the reason, and its step runner survives a step that hangs or fails."""
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite") / "dry.json"
    env = {**os.environ, "ZOO_CACHE": str(out.parent / "cache")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--teacher-dir", tiny_teacher_dir,
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text()) if out.is_file() else None, time.monotonic() - t0


def test_dry_run_passes_and_lists_every_target_unmeasured_with_the_reason(dry_run):
    proc, report, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert report["environment"]["torch"] and "cuda" in report["environment"]
    assert [t["id"] for t in report["targets"]] == [t[0] for t in gpu_suite.TARGETS]
    for t in report["targets"]:
        assert t["measured"] is None and t["pass"] is None, t
        assert t["reason"].startswith("dry run on CPU"), t
    values = {t["id"]: t["dry_run_value"] for t in report["targets"]}
    # figures measured at tiny sizes through the GPU run's code; peak memory is CUDA-only
    for tid in ("gpu_tests_failed", "repair_step_ratio", "calibration_ratio", "phd_forward_ratio",
                "eigen_kv_ratio", "eigen_decode_ratio", "fit_fisher_heldout_kl", "fit_coupled_heldout_kl",
                "frontier_before_s", "frontier_repair_s"):
        assert isinstance(values[tid], (int, float)), (tid, values[tid])
    assert values["gpu_tests_failed"] == 0
    assert values["eigen_kv_ratio"] == pytest.approx(0.5)  # k = head_dim / 2 for keys and values
    assert values["repair_step_peak_gib"] is None
    targets = {t["id"]: t for t in report["targets"]}
    assert "CUDA only" in targets["repair_step_peak_gib"]["reason"]
    assert values["frontier_peak_gib"] is None and "CUDA only" in targets["frontier_peak_gib"]["reason"]
    item = targets["frontier_before_s"]["details"]["zoo@0.8"]  # the frontier's row: every stage ran
    assert item["status"] == "ok" and set(item["seconds"]) == {"before", "repair", "after"}
    assert 0 < item["parameters"] < item["teacher_parameters"]
    assert targets["fit_fisher_heldout_kl"]["details"]["trainables_fp32"] is True
    assert targets["fit_coupled_heldout_kl"]["details"]["trainables_fp32"] is True


def test_dry_run_runs_every_step_and_records_the_hadamard_pick(dry_run):
    _, report, wall = dry_run
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["pytest", "repair", "phd", "eigen", "export", "fit-fisher", "fit-coupled", "frontier"]
    for name, step in steps.items():
        if name == "export" and not (ROOT / "benchmarks" / "export.py").is_file():
            assert step["status"] == "skipped" and "does not exist" in step["reason"]
        else:
            assert step["status"] == "ok", step
    assert report["hadamard"]["kernel"] != "available"  # no CUDA here: the reason instead
    assert {p["width"] for p in report["hadamard"]["picks"]} == {4096, 14336}
    assert all(p["pick"] in p["seconds"] for p in report["hadamard"]["picks"])
    assert report["wall_s"] < wall


def test_a_step_past_its_cap_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    t0 = time.monotonic()
    result = gpu_suite.run_step("hang", [sys.executable, "-c", code], 3.0, dict(os.environ), tmp_path / "hang.log")
    assert result["status"] == "timeout" and result["rc"] is None
    assert "3 s cap" in result["reason"]
    assert time.monotonic() - t0 < 30
    child = Path(f"/proc/{pid_file.read_text()}/status")

    def gone() -> bool:
        try:
            return "zombie" in child.read_text() or "(dead)" in child.read_text()
        except FileNotFoundError:
            return True

    # SIGKILL to the group is sent before run_step returns; the kernel finishes a busy child's exit a moment
    # later (it was seen in state R right after, on a loaded CPU): it must be gone within a few seconds
    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(), child.read_text()


def test_a_failed_step_reports_its_error_line(tmp_path):
    result = gpu_suite.run_step("bad", [sys.executable, "-c", "print('working'); raise ValueError('bad rank 7')"],
                                60.0, dict(os.environ), tmp_path / "bad.log")
    assert result["status"] == "failed" and result["rc"] == 1
    assert result["reason"] == "ValueError: bad rank 7"
    assert "working" in result["log_tail"]


def write_wheel(folder: Path, name: str, tag: str = "py3-none-any") -> Path:
    """A real (minimal) wheel of a one-module package ``name``: what pip installs from .whl/."""
    path = folder / f"{name}-1.0-{tag}.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", "ANSWER = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{info}/RECORD", f"{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def test_missing_modules_install_from_wheels_and_one_bad_wheel_does_not_stop_the_rest(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    write_wheel(wheels, "zoo_probe_good")
    write_wheel(wheels, "zoo_probe_other_python", "cp27-cp27mu-manylinux1_x86_64")
    report = gpu_suite.ensure_dependencies(tmp_path / "site", wheels,
                                           needed=("json", "zoo_probe_good", "zoo_probe_other_python",
                                                   "zoo_probe_absent"), optional=("zoo_probe_optional",))
    assert report["installed_from_wheels"] == ["zoo_probe_good-1.0-py3-none-any.whl"]
    assert set(report["missing"]) == {"zoo_probe_other_python-1.0-cp27-cp27mu-manylinux1_x86_64.whl", "zoo_probe_absent"}
    assert "not a supported wheel" in report["missing"]["zoo_probe_other_python-1.0-cp27-cp27mu-manylinux1_x86_64.whl"]
    assert "no zoo_probe_absent-*.whl" in report["missing"]["zoo_probe_absent"]
    proc = subprocess.run([sys.executable, "-c", "import zoo_probe_good; print(zoo_probe_good.ANSWER)"],
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert proc.stdout.strip() == "42", proc.stderr


def test_the_export_benchmark_gets_the_options_its_source_declares(tmp_path):
    source = 'ap.add_argument("--device")\nap.add_argument("--dtype")\nap.add_argument("--tiny")\nap.add_argument("--json")'
    assert gpu_suite.export_options(source, True, "random:/t", tmp_path) == ["--json", str(tmp_path / "export.json"), "--tiny"]
    assert gpu_suite.export_options(source, False, "random:/t", tmp_path) == [
        "--json", str(tmp_path / "export.json"), "--device", "cuda", "--dtype", "bfloat16"]
    # no tiny mode of its own: the dry run's tiny teacher instead, where it takes one
    assert gpu_suite.export_options("'--teacher'", True, "random:/t", tmp_path) == ["--teacher", "random:/t"]
    assert gpu_suite.export_options("print('--json is mentioned, not declared')", False, None, tmp_path) == []
