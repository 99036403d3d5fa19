"""The GPU suite's frontier step (issue 16): ``zoo frontier`` of the zoo's whole-model pipeline on a random-init
1B-class Llama, for each stage's wall time and CUDA peak memory (see benchmarks/gpu_suite.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from gpu_suite_setup import ROOT, load

#: Llama-3.2-1B's decoder shapes, on the embedded teacher's tokenizer and vocabulary (1.07B parameters)
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True}


def frontier_config(teacher: str, work: Path, s: dict) -> Path:
    """A ``zoo frontier`` YAML: compress_zoo_code (as the embedded teacher's frontier runs it; on random weights
    the teacher's own samples, the mix recipe's other half, are noise) at ratios 0.8 and 0.6
    (0.8 alone in a dry run) on ``random:`` weights of the teacher's directory reshaped by
    ``s["frontier"]["dims"]`` (a 1B-class Llama on a GPU; the tiny teacher as it is in a dry run), bf16-mixed,
    a repair of a few steps."""
    import yaml

    f = s["frontier"]
    model_dir = work / "frontier-model"
    shutil.copytree(teacher.removeprefix("random:"), model_dir, dirs_exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **f["dims"]}, indent=2))
    recipe = yaml.safe_load((ROOT / "configs/recipes/compress_zoo_code.yaml").read_text())
    recipe["model"]["init_args"]["teacher"] = f"random:{model_dir}"
    for callback in recipe["trainer"]["callbacks"]:
        if callback["class_path"] == "callbacks.HeldoutKLGate":  # random weights: the stage must run, not pass
            callback.setdefault("init_args", {})["tolerance"] = 1.0
    data = recipe["data"]["init_args"]
    for name, value in f["data"].items():
        data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
    recipe["trainer"].update(accelerator=f["accelerator"], devices=1, strategy="auto", precision="bf16-mixed",
                             enable_progress_bar=False, enable_model_summary=False, **f["trainer"])
    recipe_path = work / "frontier-recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    frontier = {"output_dir": str(work / "frontier"), "logger": False, "ratios": f["ratios"],
                "repair_steps": f["repair_steps"], "methods": [{"name": "zoo", "config": str(recipe_path)}]}
    path = work / "frontier.yaml"
    path.write_text(yaml.safe_dump(frontier))
    return path


def extract_frontier(work: Path, result: dict) -> dict:
    data = load(work / "frontier" / "frontier.json")
    if not data:
        return {}
    rows = {r["item"]: r for r in data["rows"]}
    details = {name: {"seconds": r["seconds"], "cuda_peak_gib": r.get("cuda_peak_gib"), "status": r["status"],
                      "parameters": r["parameters"], "teacher_parameters": r["teacher_parameters"]}
               for name, r in rows.items()}
    # `zoo frontier` exits 0 with a failed item (a row with its reason): a figure only from an item that finished
    ok = {name: r for name, r in rows.items() if r["status"] == "ok"}
    first = ok.get("zoo@0.8")
    why = {"why": f"zoo@0.8 did not finish: {rows.get('zoo@0.8', {}).get('status', 'no row')}"}
    peaks = [v for r in ok.values() for v in (r.get("cuda_peak_gib") or {}).values() if v is not None]
    found = {"frontier_before_s": (first["seconds"].get("before"), details) if first else (None, why),
             "frontier_repair_s": (first["seconds"].get("repair"), details) if first else (None, why)}
    found["frontier_peak_gib"] = (max(peaks) if peaks else None,
                                  details if peaks else {"why": "peak memory is measured on CUDA only" if ok
                                                         else "no frontier item finished"})
    return found
