"""Heldout perplexity (``heldout_ppl``, ``heldout_ppl_teacher``) logged by ``DistillationModule.validation_step``:
the chunked NLL helper against cross-entropy, and the logged value against a token-weighted reference."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from recipes import CodeConfig, CodeDataModule
from recipes.cli import main
from zoo.core.losses import prediction_mask
from zoo.core.models import load_causal_lm
from zoo.core.module import next_token_nll
from zoo_cli import repair_model


def test_next_token_nll_is_masked_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g)
    ids = torch.randint(0, 11, (2, 7), generator=g)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1, 1]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    total, count = next_token_nll(logits, ids, loss_mask, attention, chunk=3)
    mask = prediction_mask(attention, loss_mask, ids.shape)
    reference = F.cross_entropy(logits[:, :-1][mask], ids[:, 1:][mask], reduction="sum")
    assert int(count) == int(mask.sum()) == 9
    assert float(total) == pytest.approx(float(reference), rel=1e-6)


DATA = {"seq_len": 32, "batch_size": 2, "n_calibration": 4, "n_train": 2, "n_heldout": 5, "code": {"max_files": 30}}


def test_validate_logs_token_weighted_student_and_teacher_perplexity(tmp_path, tiny_teacher_dir, capsys):
    config = {
        "seed_everything": 0,
        # full rank with plain SVD: the student computes the teacher's function (up to rounding)
        "model": repair_model("zoo.FisherSVD", **{"teacher": tiny_teacher_dir, "targets": "model.layers.{0..1}.mlp.down_proj",
                                "rank": 64, "weighting": "none"}),
        "data": {"class_path": "recipes.CodeDataModule", "init_args": DATA},
        "trainer": {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["validate", "--config", str(path)])
    full_rank = json.loads((tmp_path / "run" / "metrics_validate.json").read_text())["final"]
    main(["validate", "--config", str(path), "--model.init_args.parts.rank", "2"])
    low_rank = json.loads((tmp_path / "run" / "metrics_validate.json").read_text())["final"]

    # reference: exp(total NLL / total counted tokens) of the pristine teacher over the heldout split,
    # whose 5 blocks come in batches of 2, 2, 1 (a mean of per-batch perplexities would differ)
    teacher, _ = load_causal_lm(tiny_teacher_dir)
    data = CodeDataModule(teacher=tiny_teacher_dir, **{**DATA, "code": CodeConfig(**DATA["code"])})
    data.setup("validate")
    total, count, per_batch = 0.0, 0, []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask = prediction_mask(batch["attention_mask"], batch["loss_mask"], batch["input_ids"].shape)
            nll = F.cross_entropy(logits[:, :-1][mask], batch["input_ids"][:, 1:][mask], reduction="sum")
            total, count = total + float(nll), count + int(mask.sum())
            per_batch.append(math.exp(float(nll) / int(mask.sum())))
    reference = math.exp(total / count)
    assert len(per_batch) == 3 and abs(sum(per_batch) / 3 / reference - 1) > 1e-4  # the test can tell them apart
    assert full_rank["heldout_ppl_teacher"] == pytest.approx(reference, rel=1e-5)
    assert full_rank["heldout_ppl"] == pytest.approx(reference, rel=1e-4)
    assert low_rank["heldout_ppl_teacher"] == pytest.approx(reference, rel=1e-5)
    assert abs(low_rank["heldout_ppl"] / reference - 1) > 1e-3  # the student's own, not the teacher's
    assert full_rank["heldout_kl"] < 1e-4 < low_rank["heldout_kl"]
