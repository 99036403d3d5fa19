"""The basis duel on a tiny in-process Llama (zoo.basis_duel, recipes/duel.py): frames and bases are
orthonormal, sigma-only tuning never raises the training MSE, covariance is optimal on the data it was
computed from, and the same seed gives the same numbers, in process and through ``zoo duel``."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from recipes.cli import main
from zoo.basis_duel import (BASES, DEFAULT_BASES, FRAMES, SigmaObjective, build_basis, collect_activations,
                            format_table, frame, run_duel, tune_sigma)
from zoo.core.errors import ZooError
from zoo.core.hadamard import block_hadamard_matrix, largest_block


def block_hadamard(n: int) -> torch.Tensor:
    return block_hadamard_matrix(n, largest_block(n))

TARGET = "model.layers.1.mlp.down_proj"  # in 128, out 64
RANK = 8


@pytest.fixture(scope="module")
def one_thread():
    # tiny matrices: one thread avoids contention with whatever else shares the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def activations(tiny_model, one_thread):
    g = torch.Generator().manual_seed(0)

    def batches(n):
        return [{"input_ids": torch.randint(3, 380, (4, 32), generator=g),
                 "attention_mask": torch.ones(4, 32, dtype=torch.long)} for _ in range(n)]

    stats, x_train, x_heldout = collect_activations(tiny_model, TARGET, batches(4), batches(2), fisher=True)
    return tiny_model.get_submodule(TARGET), stats, x_train, x_heldout


def test_activations_are_the_layer_inputs_and_match_the_statistics(activations):
    module, stats, x_train, x_heldout = activations
    assert x_train.shape == (4 * 4 * 32, 128) and x_heldout.shape == (2 * 4 * 32, 128)
    assert stats.count == len(x_train)
    assert torch.allclose(stats.second_moment, x_train.T @ x_train / len(x_train), atol=1e-6)
    assert stats.fisher_rows is not None


def test_hadamard_blocks_frames_are_orthogonal_and_seeded():
    assert (largest_block(1536), largest_block(576), largest_block(128), largest_block(7)) == (512, 64, 128, 1)
    H = block_hadamard(576)
    assert torch.allclose(H @ H.T, torch.eye(576, dtype=H.dtype), atol=1e-12) and torch.equal(H, H.T)
    assert torch.equal(H[64:, :64], torch.zeros(512, 64, dtype=H.dtype))  # 9 blocks of 64
    assert torch.allclose(H[:64, :64].abs(), torch.full((64, 64), 1 / 8, dtype=H.dtype))
    for kind in FRAMES:
        F = frame(kind, 96, seed=3)
        assert torch.allclose(F.T @ F, torch.eye(96, dtype=F.dtype), atol=1e-12), kind
        assert torch.equal(F, frame(kind, 96, seed=3)), kind
    assert not torch.equal(frame("permuted_hadamard", 96, 3), block_hadamard(96))
    assert not torch.equal(frame("random_orthogonal", 96, 3), frame("random_orthogonal", 96, 4))
    with pytest.raises(ZooError, match="permuted_hadamard"):
        frame("walsh", 8)


@pytest.mark.parametrize("name", BASES)
def test_every_basis_is_orthonormal_with_sigma_from_its_projection(activations, name):
    module, stats, _, _ = activations
    W = module.weight.double()
    basis = build_basis(name, W, RANK, stats, seed=0)
    assert basis.U.shape == (64, RANK) and basis.V.shape == (128, RANK) and basis.sigma.shape == (RANK,)
    assert basis.orthonormality_error() < 1e-8
    eye = torch.eye(RANK, dtype=torch.float64)
    M_out = torch.eye(64, dtype=torch.float64) if basis.metric_out is None else basis.metric_out
    M_in = torch.eye(128, dtype=torch.float64) if basis.metric_in is None else basis.metric_in
    assert torch.allclose(basis.U.T @ M_out @ basis.U, eye, atol=1e-8)
    assert torch.allclose(basis.V.T @ M_in @ basis.V, eye, atol=1e-8)
    # sigma starts at the projection of W onto the basis: diag(U^T W V) in the basis's own metric
    assert torch.allclose(basis.sigma, torch.diagonal(basis.U.T @ M_out @ W @ M_in @ basis.V), rtol=1e-6, atol=1e-10)
    if name == "covariance":
        assert torch.equal(basis.metric_in, stats.second_moment.double())
    if name in ("svd", *FRAMES):
        assert basis.metric_out is None and basis.metric_in is None  # Euclidean-orthonormal


def test_svd_basis_is_the_truncated_svd_and_unknown_basis_is_refused(activations):
    module, stats, _, _ = activations
    basis = build_basis("svd", module.weight, RANK, stats)
    assert torch.allclose(basis.sigma, torch.linalg.svdvals(module.weight.double())[:RANK], rtol=1e-10)
    with pytest.raises(ZooError, match="unknown basis 'hadamrd'; valid choices: covariance, svd"):
        build_basis("hadamrd", module.weight, RANK, stats)
    with pytest.raises(ZooError, match="rank 65"):
        build_basis("svd", module.weight, 65, stats)


def test_sigma_objective_is_the_dense_output_mse(activations):
    module, stats, x_train, _ = activations
    W = module.weight.detach().double()
    basis = build_basis("random_orthogonal", W, RANK, stats)
    objective = SigmaObjective(x_train, W, basis)
    sigma = torch.randn(RANK, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Y = x_train @ W.T
    dense = ((Y - ((x_train @ basis.V) * sigma) @ basis.U.T) ** 2).sum() / (Y**2).sum()
    assert float(objective(sigma)) == pytest.approx(float(dense), rel=1e-9)
    rows = torch.arange(0, len(x_train), 3)
    dense_rows = ((Y[rows] - ((x_train[rows] @ basis.V) * sigma) @ basis.U.T) ** 2).sum() / (Y[rows] ** 2).sum()
    assert float(objective(sigma, rows)) == pytest.approx(float(dense_rows), rel=1e-9)
    optimum = objective.optimum()
    assert float(objective(optimum)) < float(objective(basis.sigma))
    assert float(objective(optimum)) <= float(objective(optimum * 1.01))  # a minimum, not any point


@pytest.fixture(scope="module")
def duel(activations):
    module, stats, x_train, x_heldout = activations
    return run_duel(module.weight, module.bias, stats, x_train, x_heldout, RANK, bases=BASES, steps=[0, 5, 60],
                    lr=0.05, batch_tokens=64, seed=0, target=TARGET)


def test_tuning_never_increases_the_training_mse(duel):
    for name, row in duel.rows.items():
        train = [row["steps"][str(s)]["train_rel_mse"] for s in duel.steps]
        assert all(b <= a for a, b in zip(train, train[1:])), (name, train)
        curve = row["train_curve"]
        assert all(b <= a for a, b in zip(curve, curve[1:])), name
        assert row["sigma_optimum"]["train_rel_mse"] <= train[-1] + 1e-12, name
    # and it does move a basis whose initial sigma is not output-optimal
    poor = duel.rows["random_orthogonal"]["steps"]
    assert poor["60"]["train_rel_mse"] < poor["0"]["train_rel_mse"]


def test_covariance_is_optimal_on_its_calibration_data(duel):
    best = duel.rows["covariance"]["steps"]["0"]["train_rel_mse"]
    for name, row in duel.rows.items():
        for values in (*row["steps"].values(), row["sigma_optimum"]):
            assert best <= values["train_rel_mse"] + 1e-9, name
    assert duel.rows["covariance"]["steps"]["0"]["train_rel_mse"] < duel.rows["svd"]["steps"]["0"]["train_rel_mse"]


def test_same_seed_same_numbers_and_another_seed_moves_the_random_bases(activations, duel):
    module, stats, x_train, x_heldout = activations
    again = run_duel(module.weight, module.bias, stats, x_train, x_heldout, RANK, bases=BASES, steps=[0, 5, 60],
                     lr=0.05, batch_tokens=64, seed=0, target=TARGET)
    assert json.dumps(again.to_dict()) == json.dumps(duel.to_dict())
    other = run_duel(module.weight, module.bias, stats, x_train, x_heldout, RANK,
                     bases=["covariance", "random_orthogonal"], steps=[0, 5, 60], lr=0.05, batch_tokens=64, seed=1,
                     target=TARGET)
    assert other.rows["covariance"]["steps"] == duel.rows["covariance"]["steps"]  # nothing random in it
    assert other.mse("random_orthogonal", 0) != duel.mse("random_orthogonal", 0)


def test_table_states_the_findings(duel):
    table = format_table(duel)
    assert "| covariance |" in table and "rel MSE @60" in table and "rel MSE @sigma*" in table
    assert "Hadamard ~ random:" in table and "60 sigma-only steps moved the poorest basis" in table
    findings = duel.findings()
    assert set(findings) == {"covariance_best", "hadamard_vs_random", "sigma_only_on_poorest"}
    assert findings["sigma_only_on_poorest"]["basis"] == max(BASES, key=lambda b: duel.mse(b, 0))


def test_bad_duel_settings_are_user_errors(activations):
    module, stats, x_train, x_heldout = activations
    with pytest.raises(ZooError, match="valid choices"):
        run_duel(module.weight, None, stats, x_train, x_heldout, RANK, bases=["covariance", "dct"])
    with pytest.raises(ZooError, match="twice"):
        run_duel(module.weight, None, stats, x_train, x_heldout, RANK, bases=["svd", "svd"])
    with pytest.raises(ZooError, match="non-negative"):
        tune_sigma(SigmaObjective(x_train, module.weight, build_basis("svd", module.weight, RANK)),
                   torch.ones(RANK, dtype=torch.float64), [-1])


def write_duel_config(tmp_path, teacher, **overrides):
    config = {
        "teacher": teacher, "target": TARGET, "rank": RANK, "steps": [0, 20], "batch_tokens": 64,
        "output_dir": str(tmp_path / "out"),
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(tmp_path / "out"), "name": "duel"}},
        "data": {"class_path": "recipes.CodeDataModule",
                 "init_args": {"seq_len": 32, "batch_size": 4, "n_calibration": 8, "n_train": 1, "n_heldout": 4,
                               "code": {"max_files": 30}}},
        **overrides,
    }
    path = tmp_path / "duel.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_zoo_duel_end_to_end_is_deterministic(tmp_path, tiny_teacher_dir, capsys, one_thread):
    config = write_duel_config(tmp_path, tiny_teacher_dir)
    main(["duel", "--config", config])
    out = capsys.readouterr().out
    assert "| covariance |" in out and "| random_orthogonal |" in out
    first = json.loads((tmp_path / "out" / "duel.json").read_text())
    assert list(first["bases"]) == list(DEFAULT_BASES)
    assert (tmp_path / "out" / "duel.png").stat().st_size > 1000
    with open(next((tmp_path / "out" / "duel").glob("version_*/metrics.csv"))) as f:
        logged = next(csv.DictReader(f))
    assert float(logged["duel/covariance/heldout_rel_mse@0"]) == first["bases"]["covariance"]["steps"]["0"][
        "heldout_rel_mse"]
    main(["duel", "--config", config, "--logger", "false"])  # from the activation cache this time
    assert json.loads((tmp_path / "out" / "duel.json").read_text()) == first


def test_zoo_duel_bad_input_is_one_line(tmp_path, tiny_teacher_dir, capsys):
    config = write_duel_config(tmp_path, tiny_teacher_dir)
    for args, needle in ((["--bases", "[covariance, haar]"], "valid choices: covariance, svd, diagonal"),
                         (["--target", "model.layers.*.mlp.down_proj"], "matches 2"),
                         (["--rnk", "3"], "rnk")):
        with pytest.raises(SystemExit) as exc:
            main(["duel", "--config", config, *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err and needle in err, err
