"""Sequential calibration one decoder layer at a time (``zoo.core.sequential.LayerInputs``, issue 16): the
same statistics as running the whole model per layer, one model forward per batch in all, and never more
than one depth's hidden states held."""
from __future__ import annotations

import pytest
import torch

from zoo import DistillationModule, FisherSVD
from zoo.core.calibration import collect
from zoo.core.errors import ZooError
from zoo.core.models import claim, load_causal_lm
from zoo.core.sequential import LayerInputs, decoder_layers
from zoo.core.surgery import replace
from zoo.fisher_svd import FisherSVDLinear, weighted_svd

from test_compression import ALL_LINEARS, batches, inputs_of


def compressed_below(tiny_teacher_dir):
    """The tiny teacher with layer 0's down_proj at rank 4: layer 1's inputs are no longer the teacher's."""
    model = load_causal_lm(tiny_teacher_dir)[0]
    claim(model)
    W0 = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    U, s, V, _ = weighted_svd(W0, 4, "none")
    replace(model, ["model.layers.0.mlp.down_proj"], lambda n, m: FisherSVDLinear(U.float(), s, V.float()))
    return model


def test_one_layer_on_cached_inputs_gives_the_whole_models_statistics(tiny_teacher_dir):
    model, data = compressed_below(tiny_teacher_dir), batches()
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    whole = collect(model, data, names, cross=True, collectors={"abs_mean": names}, progress=False)
    inputs = LayerInputs(model, data, decoder_layers(model, names), progress=False)
    inputs.advance_to(1)
    layered = collect(model, inputs.batches, names, cross=True, collectors={"abs_mean": names},
                      forward=inputs.forward, progress=False)
    for name in names:
        a, b = whole[name], layered[name]
        assert a.count == b.count == 3 * (32 + 25)  # the padded positions are not tokens
        torch.testing.assert_close(b.second_moment, a.second_moment, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.extra["cross.second_moment"], a.extra["cross.second_moment"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.extra["abs_mean.mean"], a.extra["abs_mean.mean"], rtol=1e-5, atol=1e-7)


def test_collectors_read_the_students_inputs_not_the_teacher_views(tiny_teacher_dir):
    """In a ``cross`` batch the teacher-view pass feeds the cross moments only: mean |x| is the student's."""
    model, data = compressed_below(tiny_teacher_dir), batches()
    name = "model.layers.1.mlp.down_proj"
    stats = collect(model, data, [name], cross=True, collectors={"abs_mean": [name]}, progress=False)[name]
    torch.testing.assert_close(stats.extra["abs_mean.mean"], inputs_of(model, name, data).abs().mean(0),
                               rtol=1e-9, atol=1e-12)


def test_a_sequential_build_runs_the_whole_model_once_per_batch(tiny_teacher_dir):
    """The capture pass is the only whole-model forward (it was two per layer); every layer then runs alone."""
    data = batches(4)
    module = DistillationModule(parts=[FisherSVD(ALL_LINEARS, rank=8, refit=True)], teacher=tiny_teacher_dir,
                                calibration="sequential")
    calls = []
    module.student.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    module.build_student(data, data_fingerprint="once-per-batch")
    assert len(calls) == len(data)
    assert module.student._layer_inputs is None  # the hidden states are freed after the build


def test_the_held_hidden_states_are_one_depths_worth(tiny_teacher_dir, monkeypatch):
    """At most three streams of one depth (teacher, student, the teacher's next) are held at any time."""
    data = batches(4)
    peak = [0]
    real = LayerInputs.advance_to

    def watched(self, position):
        real(self, position)
        peak[0] = max(peak[0], self.held_bytes() + sum(t.numel() * t.element_size() for t in self.next_teacher.values()))

    monkeypatch.setattr(LayerInputs, "advance_to", watched)
    real_forward = LayerInputs.forward

    def watched_forward(self, batch, teacher):
        real_forward(self, batch, teacher)
        peak[0] = max(peak[0], self.held_bytes())

    monkeypatch.setattr(LayerInputs, "forward", watched_forward)
    module = DistillationModule(parts=[FisherSVD(ALL_LINEARS, rank=8)], teacher=tiny_teacher_dir,
                                calibration="sequential")
    module.build_student(data, data_fingerprint="memory")
    hidden = module.model.config.hidden_size
    one_depth = sum(b["input_ids"].numel() for b in data) * hidden * 4  # fp32 [batch, seq, hidden] of every batch
    assert one_depth <= peak[0] <= 3 * one_depth  # whatever the depth: not a stream per layer


def test_layer_inputs_do_not_go_back(tiny_teacher_dir):
    model = load_causal_lm(tiny_teacher_dir)[0]
    inputs = LayerInputs(model, batches(1), decoder_layers(model, ["model.layers.0.mlp.down_proj"]), progress=False)
    inputs.advance_to(1)
    with pytest.raises(ZooError, match="at layer 1; they cannot go back to 0"):
        inputs.advance_to(0)
    with pytest.raises(ZooError, match="inside a decoder layer"):
        decoder_layers(model, ["lm_head"])


def test_targets_reading_one_tensor_share_its_products_and_match_the_dense_reference(tiny_teacher_dir):
    """q, k and v read one tensor: its gram is computed once, and each target's moment is still exact."""
    from zoo.core.calibration import conditioning

    model, data = compressed_below(tiny_teacher_dir), batches()
    names = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    stats = collect(model, data, names, cross=True, progress=False)
    X = inputs_of(model, names[0], data)
    for name in names:
        torch.testing.assert_close(stats[name].second_moment, X.T @ X / len(X), rtol=1e-5, atol=1e-6)  # fp32 products
    assert stats[names[0]].second_moment is not stats[names[1]].second_moment  # each target its own tensors
    ranks = conditioning(stats)
    assert len(set(ranks.values())) == 1 and set(ranks) == set(names)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6)])
def test_thin_svd_is_an_svd_in_either_orientation(shape):
    from zoo.core.linalg import singular_values, thin_svd

    A = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    P, s, Qh = thin_svd(A)
    k = min(shape)
    assert P.shape == (shape[0], k) and Qh.shape == (k, shape[1])
    torch.testing.assert_close((P * s) @ Qh, A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P.T @ P, torch.eye(k, dtype=A.dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, torch.linalg.svdvals(A), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(singular_values(A), torch.linalg.svdvals(A), rtol=1e-12, atol=1e-12)


def test_a_plan_only_statistic_is_not_collected_layer_by_layer(tiny_teacher_dir):
    """``allocation: sensitivity`` reads output gradients in ``plan`` only: its one backward pass on the teacher,
    then the layers run alone (a build that needed them per layer would run the whole model per layer)."""
    data = batches(3)
    spec = FisherSVD(ALL_LINEARS, rank=0.5, allocation="sensitivity")
    assert "grad_output_diag" in spec.needs() and "grad_output_diag" not in spec.build_needs()
    module = DistillationModule(parts=[spec], teacher=tiny_teacher_dir, calibration="sequential")
    calls = []
    module.student.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    module.build_student(data, data_fingerprint="plan-only")
    assert len(calls) == 2 * len(data)  # the plan's pass and the capture pass


def test_layers_receiving_state_fall_back_to_the_whole_model(tiny_teacher_dir):
    """A layer input that is state, not a value (a cache object), is not replayed: the build runs the whole
    model per layer instead, and says nothing is wrong with the student."""
    from zoo.core.sequential import Unreplayable

    model = load_causal_lm(tiny_teacher_dir)[0]
    layers = decoder_layers(model, ["model.layers.0.mlp.down_proj"])
    state = object()
    handle = layers[0].register_forward_pre_hook(lambda m, a, k: (a, {**k, "shared_state": state}), with_kwargs=True,
                                                 prepend=True)
    with pytest.raises(Unreplayable, match="receive a object"):
        LayerInputs(model, batches(1), layers, device="cpu", progress=False)
    handle.remove()

    data = batches(2)
    module = DistillationModule(parts=[FisherSVD("model.layers.*.mlp.down_proj", rank=8)], teacher=tiny_teacher_dir,
                                calibration="sequential")
    first = decoder_layers(module.model, ["model.layers.0.mlp.down_proj"])[0]
    first.register_forward_pre_hook(lambda m, a, k: (a, {**k, "shared_state": state}), with_kwargs=True, prepend=True)
    calls = []
    module.student.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    module.build_student(data, data_fingerprint="fallback")
    assert len(calls) == 1 + 2 * 2 * len(data)  # the capture stopped at its first batch, then two passes per layer


def test_a_refused_layer_forward_leaves_no_hooks(tiny_teacher_dir):
    model = load_causal_lm(tiny_teacher_dir)[0]
    name = "model.layers.1.mlp.down_proj"
    with pytest.raises(ZooError, match="need more than the targets' inputs"):
        collect(model, batches(1), [name], collectors={"fisher": [name]}, cross=True, forward=lambda b, t: None,
                progress=False)
    assert not model.get_submodule(name)._forward_pre_hooks and not model.get_submodule(name)._forward_hooks
