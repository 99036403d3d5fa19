"""GPU checks (``pytest -m gpu`` on a CUDA machine; skipped elsewhere): a bf16-mixed fit of a sigma repair and
of a coupled core with shims on the tiny teacher, the PHD layer's two compute paths in bf16 against fp32, and
the fast-hadamard-transform kernel against the matmul block-Hadamard (where that package is installed)."""
import json

import pytest
import torch
from safetensors import safe_open

from zoo_cli import repair_model, write_config, zoo_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("model", [
    repair_model("zoo.FisherSVD", **{"targets": "model.layers.{0..1}.mlp.down_proj", "rank": 8}),
    repair_model("zoo.CoupledCore", **{"targets": "model.layers.{0..1}.mlp.down_proj", "rank": 16, "block": 16, "shim_rank": 4}),
])
def test_bf16_mixed_fit_on_cuda_keeps_trainables_fp32(tmp_path, tiny_teacher_dir, capsys, model):
    config = write_config(tmp_path, tiny_teacher_dir, model, accelerator="gpu", devices=1, precision="bf16-mixed")
    code, _, err = zoo_cli(["fit", "--config", config], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    assert 0 <= summary["heldout_kl_after"] < float("inf")
    with safe_open(str(tmp_path / "run" / "repair_state.safetensors"), "pt") as f:
        assert f.keys() and all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())


@pytest.mark.parametrize("compute", ["rows", "transform"])
def test_phd_layer_in_bf16_on_cuda_matches_fp32(compute):
    from zoo.core.hadamard import PHDFrame
    from zoo.phd import BlockwisePHDLinear, Subframe

    g = torch.Generator().manual_seed(0)
    sides = []
    for n, seed in ((1536, 1), (576, 2)):
        frame = PHDFrame(n, 512, seed)
        index = torch.sort(torch.randperm(frame.n_pad, generator=g)[:64]).values
        sides.append(Subframe(frame.rows(index), frame, index, compute))
    layer = BlockwisePHDLinear(sides[0], torch.randn(64, 64, generator=g), sides[1])
    x = torch.randn(256, 1536, generator=g)
    expected = layer(x)
    got = layer.cuda().to(torch.bfloat16)(x.cuda().bfloat16()).float().cpu()
    assert layer.core.dtype == torch.float32
    assert (got - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("width,block", [(576, 64), (14336, 512)])
def test_hadamard_kernel_matches_the_matmul_path(width, block):
    pytest.importorskip("fast_hadamard_transform")
    from zoo.core.hadamard import block_hadamard

    x = torch.randn(64, width, device="cuda")
    expected = block_hadamard(x, block, "matmul")
    assert torch.allclose(block_hadamard(x, block, "kernel"), expected, atol=1e-4)
    got = block_hadamard(x.bfloat16(), block, "kernel").float()
    assert (got - expected).norm() / expected.norm() < 2e-2
