"""What the benchmark scripts share: timing after warm-up (CUDA events on a GPU), peak memory, and the
``--json`` file each script writes for ``benchmarks/gpu_suite.py``.

Run the scripts as ``python benchmarks/NAME.py``: this folder is then first on ``sys.path``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps / 1000
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def peak_gib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def write_json(path: str | None, data: dict) -> None:
    """Write ``data`` to ``path`` (no-op without one), replacing the file whole: a script killed by the
    suite's time cap or by an OOM leaves the last complete version, with what it had measured so far."""
    if not path:
        return
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
