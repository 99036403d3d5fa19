"""The heldout KL of an exported student, measured where the zoo cannot be imported (issue 15, acceptance).

    python benchmarks/export_kl.py --recipe configs/recipes/fisher_svd_repair.yaml --export runs/fisher_svd_repair/export \\
        --metrics runs/fisher_svd_repair/metrics.json

This process (with the zoo) writes the recipe's heldout split - the batches ``zoo validate`` measures:
tokens, attention and loss masks - to a safetensors file and finds the teacher's weights on disk
(``zoo.core.models.model_location``: the embedded alias's converted directory). A fresh Python then runs
with no site processing (the zoo's editable install is a ``.pth`` file, so it stays invisible) and
site-packages as plain ``PYTHONPATH`` entries; it asserts the zoo is not importable, loads the export with
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` and the teacher as a plain checkpoint,
and computes the token-weighted KL(teacher || student) and the student's perplexity over the counted
predictions, as validation does. With ``--metrics`` (the run's ``metrics.json``) the numbers are compared
to the run's final ``heldout_kl`` / ``heldout_ppl``; exit 1 when the KL differs by more than ``--tolerance``.
"""
from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
from pathlib import Path


def child(export: str, teacher: str, data: str) -> None:
    """Runs without the zoo: torch, transformers and safetensors only."""
    import importlib.util

    assert importlib.util.find_spec("zoo") is None, "zoo is importable in the standalone process"
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    batches = load_file(data)
    kl_sum = nll_sum = count = 0.0
    for i in range(len({k.split(".")[0] for k in batches})):
        ids, attn, loss = (batches[f"b{i}.{k}"] for k in ("input_ids", "attention_mask", "loss_mask"))
        mask = (loss.bool() & attn.bool())[:, 1:].float()
        with torch.no_grad():
            t = F.log_softmax(dense(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
            s = F.log_softmax(student(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        kl_sum += float(((t.exp() * (t - s)).sum(-1) * mask).sum())
        nll_sum += float((-s.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask).sum())
        count += float(mask.sum())
    assert "zoo" not in sys.modules
    print(json.dumps({"heldout_kl": kl_sum / count, "heldout_ppl": float(torch.tensor(nll_sum / count).exp()),
                      "tokens": count}))


def dump_heldout(recipe: str, overrides: list[str], path: Path) -> str:
    """Write the recipe's heldout batches to ``path``; return the teacher's directory."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from recipes.recipe import load_recipe
    from zoo.core.models import model_location

    loaded = load_recipe(recipe, overrides, build=False)
    module, data = loaded.module, loaded.data
    data.setup("validate")
    tensors = {}
    for i, batch in enumerate(data.val_dataloader()):
        ids = batch["input_ids"]
        tensors[f"b{i}.input_ids"] = ids
        tensors[f"b{i}.attention_mask"] = batch.get("attention_mask", torch.ones_like(ids))
        tensors[f"b{i}.loss_mask"] = batch.get("loss_mask", torch.ones_like(ids))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return model_location(module.teacher)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="the recipe the export was made from (its heldout split is measured)")
    parser.add_argument("--export", required=True)
    parser.add_argument("--overrides", nargs="*", default=[], help="recipe overrides, as given to the run")
    parser.add_argument("--metrics", default=None, help="the run's metrics.json to compare with")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--child", nargs=3, metavar=("EXPORT", "TEACHER", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "heldout.safetensors"
        teacher = dump_heldout(args.recipe, args.overrides, data)
        import transformers

        paths = [*site.getsitepackages(), str(Path(transformers.__file__).parents[1])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, "-S", str(Path(__file__).resolve()), "--export",
                                 str(Path(args.export).resolve()), "--child", str(Path(args.export).resolve()),
                                 teacher, str(data)], capture_output=True, text=True, cwd=tmp, env=env)
    if result.returncode:
        print(result.stderr[-4000:], file=sys.stderr)
        return result.returncode
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"standalone (no zoo importable): heldout KL {measured['heldout_kl']:.6f}, heldout ppl "
          f"{measured['heldout_ppl']:.4f} over {measured['tokens']:.0f} predictions")
    if not args.metrics:
        return 0
    final = json.loads(Path(args.metrics).read_text())["final"]
    diff = abs(measured["heldout_kl"] - final["heldout_kl"])
    print(f"run's metrics.json: heldout KL {final['heldout_kl']:.6f}, heldout ppl {final.get('heldout_ppl', float('nan')):.4f}; "
          f"|KL difference| = {diff:.2e} ({'within' if diff <= args.tolerance else 'ABOVE'} {args.tolerance:g})")
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
