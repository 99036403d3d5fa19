"""The fp64 SVD of a wide matrix vs the same SVD of its transpose, side by side in one run (why
``zoo.core.linalg.thin_svd`` works on the tall orientation), and eigvalsh of a covariance (the calibration
report's effective rank) against the SVD it accompanies.

    python benchmarks/svd_orientation.py                  # the embedded teacher's shapes
    python benchmarks/svd_orientation.py --json out.json

Shapes: the embedded teacher's down_proj (576 x 1536, wide), gate/up_proj (1536 x 576) and k_proj (192 x 576).
Prints each wide SVD's time over its transpose's (ratio > 1: the tall orientation is faster). CPU times only
mean anything as ratios; the script runs on whatever device torch picks for fp64 (the CPU).
"""
from __future__ import annotations

import argparse

import torch

from zoo.core.linalg import thin_svd

from common import timed, write_json

SHAPES = {"down_proj": (576, 1536), "k_proj": (192, 576)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    results = {}
    for name, (rows, cols) in SHAPES.items():
        A = torch.randn(rows, cols, generator=g, dtype=torch.float64)
        wide = timed(lambda: torch.linalg.svd(A, full_matrices=False), args.steps, 1, device)
        tall = timed(lambda: torch.linalg.svd(A.T, full_matrices=False), args.steps, 1, device)
        helper = timed(lambda: thin_svd(A), args.steps, 1, device)
        cov = A.T @ A / rows
        eig = timed(lambda: torch.linalg.eigvalsh(cov), args.steps, 1, device)
        P, s, Qh = thin_svd(A)
        error = float(((P * s) @ Qh - A).abs().max())
        results[name] = {"shape": [rows, cols], "wide_over_tall": wide / tall, "thin_svd_over_tall": helper / tall,
                         "eigvalsh_over_svd": eig / helper, "reconstruction_max_error": error}
        print(f"{name} {rows}x{cols}: svd(A) / svd(A.T) = {wide / tall:.2f}x; thin_svd(A) / svd(A.T) = "
              f"{helper / tall:.2f}x; eigvalsh(A^T A) / thin_svd(A) = {eig / helper:.2f}x; "
              f"|P S Q^T - A|max = {error:.1e}")
    write_json(args.json, {"device": "cpu", "torch": torch.__version__, "results": results})


if __name__ == "__main__":
    main()
