import pytest
import torch
from torch import nn

from zoo.core.errors import ZooError
from zoo.core.surgery import Replaced, export_student, replace, replaced_modules, teacher_view
from zoo.core.targets import expand_braces, find_targets


def test_brace_ranges_and_alternatives_expand():
    assert expand_braces("a.{1..3}.b") == ["a.1.b", "a.2.b", "a.3.b"]
    assert expand_braces("{q,k}_proj.{0..1}") == ["q_proj.0", "q_proj.1", "k_proj.0", "k_proj.1"]


def test_find_targets_exact_glob_range_and_regex(tiny_model):
    assert find_targets(tiny_model, "model.layers.1.mlp.down_proj") == ["model.layers.1.mlp.down_proj"]
    assert find_targets(tiny_model, "model.layers.{0..1}.mlp.down_proj") == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert find_targets(tiny_model, "model.layers.*.self_attn.o_proj") == [
        "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert len(find_targets(tiny_model, "**.mlp.*")) == 6
    assert find_targets(tiny_model, r"re:model\.layers\.0\.self_attn\.[qk]_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    # non-linear modules are never targets
    with pytest.raises(ZooError):
        find_targets(tiny_model, "model.layers.0.input_layernorm")


def test_pattern_matching_nothing_lists_close_names(tiny_model):
    with pytest.raises(ZooError) as err:
        find_targets(tiny_model, "model.layers.1.mlp.down_prj")
    assert "matches no linear module" in str(err.value)
    assert "model.layers.1.mlp.down_proj" in str(err.value)
    with pytest.raises(ZooError, match=r"model\.layers\.6\.mlp\.down_proj. matches no"):
        find_targets(tiny_model, "model.layers.{6..7}.mlp.down_proj")


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def test_teacher_view_gives_exactly_the_original_logits(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        names = replace(model, "model.layers.*.mlp.down_proj", lambda name, m: nn.Linear(m.in_features, m.out_features))
        assert names and all(isinstance(m, Replaced) for m in replaced_modules(model).values())
        student = model(input_ids=ids).logits
        with teacher_view(model):
            teacher = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(teacher, before)  # bit-exact: the original modules run
    assert not torch.allclose(student, before)
    assert torch.equal(after, student)  # the view is restored on exit


def test_replacing_twice_is_an_error_and_export_drops_originals(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    replace(model, "model.layers.0.mlp.down_proj", lambda n, m: Doubler())
    with pytest.raises(ZooError, match="already replaced"):
        replace(model, "model.layers.0.mlp.down_proj", lambda n, m: Doubler())
    export_student(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, Doubler)
    assert not replaced_modules(model)
