"""optsched.params.groups: the param-group contract, decay decisions, policies and errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from optsched.params import (
    assemble_groups,
    build_param_groups,
    classify_parameters,
    freeze_parameters,
    get_decay_parameter_names,
    list_decay_policies,
    resolve_weight_decay,
)


class FooRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_bias_proj = nn.Linear(4, 4)
        self.rms = FooRMSNorm(4)
        self.ln = nn.LayerNorm(4)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)


def _names(groups):
    return {g["name"]: g["param_names"] for g in groups}


# --- which parameters decay ---------------------------------------------------------------------


def test_custom_rms_norm_and_word_bias():
    assert get_decay_parameter_names(Block()) == ["attn_bias_proj.weight"]


def test_conv_net_norms_by_type():
    # None of these norm layers is named like one: found by type (transformers decays bn/gn weights).
    assert get_decay_parameter_names(ConvNet()) == ["conv.weight", "fc.weight"]


def test_frozen_and_tied_names_are_listed_like_transformers():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
    model[1].weight = model[0].weight
    model[0].weight.requires_grad_(False)
    assert get_decay_parameter_names(model) == ["0.weight", "1.weight"]


# --- the group contract -------------------------------------------------------------------------


def test_groups_follow_the_contract():
    model = ConvNet()
    groups = build_param_groups(model, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert _names(groups) == {
        "decay": ["conv.weight", "fc.weight"],
        "no_decay": ["conv.bias", "bn.weight", "bn.bias", "gn.weight", "gn.bias", "fc.bias"],
    }
    params = dict(model.named_parameters())
    for group in groups:
        assert set(group) == {"params", "param_names", "name", "weight_decay"}
        assert all(p is params[n] for p, n in zip(group["params"], group["param_names"], strict=True))


def test_frozen_parameters_are_in_no_group():
    model = ConvNet()
    model.conv.weight.requires_grad_(False)
    model.bn.bias.requires_grad_(False)
    names = [n for g in build_param_groups(model) for n in g["param_names"]]
    assert "conv.weight" not in names and "bn.bias" not in names
    assert len(names) == 6


def test_tied_parameter_once_under_its_first_name():
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 5, bias=False))
    model[2].weight = model[0].weight
    groups = build_param_groups(model, weight_decay=0.01)
    assert _names(groups) == {"decay": ["0.weight"], "no_decay": ["1.weight", "1.bias"]}
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == 3


def test_both_groups_exist_even_when_one_is_empty():
    groups = build_param_groups(nn.LayerNorm(4), weight_decay=0.1)
    assert _names(groups) == {"decay": [], "no_decay": ["weight", "bias"]}
    torch.optim.AdamW(groups, lr=1e-3)  # torch accepts the empty group


def test_groups_work_with_torch_optimizers_and_survive_state_dict():
    model = ConvNet()
    opt = torch.optim.AdamW(build_param_groups(model, weight_decay=0.05), lr=1e-2)
    x = torch.randn(2, 3, 5, 5)
    loss = model.fc(model.gn(model.bn(model.conv(x))).mean((2, 3))).pow(2).sum()
    loss.backward()
    opt.step()
    state = opt.state_dict()
    assert [g["name"] for g in state["param_groups"]] == ["decay", "no_decay"]
    assert state["param_groups"][0]["param_names"] == ["conv.weight", "fc.weight"]
    clone = torch.optim.AdamW(build_param_groups(model, weight_decay=0.05), lr=1e-2)
    clone.load_state_dict(state)
    assert clone.param_groups[0]["weight_decay"] == 0.05


# --- weight decay from args ---------------------------------------------------------------------


def test_weight_decay_sources():
    model = nn.Linear(2, 2)
    assert build_param_groups(model)[0]["weight_decay"] == 0.0
    assert build_param_groups(model, SimpleNamespace(weight_decay=0.3))[0]["weight_decay"] == 0.3
    overridden = build_param_groups(model, SimpleNamespace(weight_decay=0.3), weight_decay=0.2)
    assert overridden[0]["weight_decay"] == 0.2
    assert isinstance(resolve_weight_decay(None, 1), float)


def test_weight_decay_from_optsched_training_arguments():
    arguments = pytest.importorskip("optsched.arguments")
    args = arguments.TrainingArguments(output_dir="unused", weight_decay=0.25)
    assert build_param_groups(nn.Linear(2, 2), args)[0]["weight_decay"] == 0.25


@pytest.mark.parametrize(
    ("weight_decay", "error", "match"),
    [
        (-0.1, ValueError, r"weight_decay=-0\.1 is out of range"),
        (math.nan, ValueError, "weight_decay=nan is not finite"),
        (math.inf, ValueError, "not finite"),
        ("0.1", TypeError, "weight_decay must be a number"),
        (True, TypeError, "weight_decay must be a number"),
    ],
)
def test_bad_weight_decay(weight_decay, error, match):
    with pytest.raises(error, match=match):
        build_param_groups(nn.Linear(2, 2), weight_decay=weight_decay)
    with pytest.raises(error, match=match):
        build_param_groups(nn.Linear(2, 2), SimpleNamespace(weight_decay=weight_decay))


def test_args_without_weight_decay_is_a_type_error():
    with pytest.raises(TypeError, match="weight_decay attribute, got dict"):
        build_param_groups(nn.Linear(2, 2), {"weight_decay": 0.1})


# --- errors -------------------------------------------------------------------------------------


def test_no_trainable_parameters():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters .all 2 of its parameter tensors are"):
        build_param_groups(model)
    with pytest.raises(ValueError, match="it has no parameters"):
        build_param_groups(nn.ReLU())


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        build_param_groups([nn.Parameter(torch.ones(2))])


def test_unknown_policy_name_suggests_the_closest():
    with pytest.raises(ValueError, match="decay_policy='hff' is not a known decay policy. Did you mean 'hf'"):
        build_param_groups(nn.Linear(2, 2), decay_policy="hff")
    with pytest.raises(TypeError, match="decay_policy must be a name"):
        get_decay_parameter_names(nn.Linear(2, 2), decay_policy=3)


def test_policy_must_return_a_bool():
    with pytest.raises(TypeError, match="must return True or False, got int 1 for parameter 'weight'"):
        build_param_groups(nn.Linear(2, 2), decay_policy=lambda info: 1)


# --- policies -----------------------------------------------------------------------------------


def test_registered_policies():
    assert "hf" in list_decay_policies()


def test_callable_policy():
    def ndim_policy(info):
        return info.ndim >= 2

    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model.scale = nn.Parameter(torch.ones(2))
    assert get_decay_parameter_names(model) == ["scale", "0.weight"]  # hf: a 1-D non-norm decays
    assert get_decay_parameter_names(model, decay_policy=ndim_policy) == ["0.weight"]
    groups = build_param_groups(model, weight_decay=0.1, decay_policy=ndim_policy)
    assert _names(groups) == {"decay": ["0.weight"], "no_decay": ["scale", "0.bias", "1.weight", "1.bias"]}


# --- assemble_groups ----------------------------------------------------------------------------


def test_assemble_merges_equal_settings_and_keeps_first_seen_order():
    infos = classify_parameters(nn.Sequential(*[nn.Linear(1, 1, bias=False) for _ in range(4)]))
    entries = [
        (infos[0], "a", {"lr": 1.0, "weight_decay": 0.0}),
        (infos[1], "b", {"lr": 2.0}),
        (infos[2], "a", {"weight_decay": 0.0, "lr": 1.0}),  # equal settings, new dict, other key order
        (infos[3], "a", {"lr": 3.0, "weight_decay": 0.0}),  # same name, other settings: own group
    ]
    groups = assemble_groups(entries, seed=[("z", {"lr": 0.5})])
    assert [(g["name"], g["param_names"], g.get("lr")) for g in groups] == [
        ("z", [], 0.5),
        ("a", ["0.weight", "2.weight"], 1.0),
        ("b", ["1.weight"], 2.0),
        ("a", ["3.weight"], 3.0),
    ]


@settings(max_examples=40, deadline=None)
@given(
    layout=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=12),
    wd=st.floats(0, 1),
)
def test_groups_partition_the_trainable_parameters(layout, wd):
    # layout: per block (is a LayerNorm, has bias, frozen)
    blocks = [nn.LayerNorm(2) if is_norm else nn.Linear(2, 2, bias=bias) for is_norm, bias, _ in layout]
    model = nn.Sequential(*blocks)
    for block, (_, _, frozen) in zip(blocks, layout, strict=True):
        block.requires_grad_(not frozen)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        with pytest.raises(ValueError):
            build_param_groups(model, weight_decay=wd)
        return
    decay, no_decay = build_param_groups(model, weight_decay=wd)
    decay_names = set(get_decay_parameter_names(model))
    assert decay["param_names"] == [n for n, _ in trainable if n in decay_names]
    assert no_decay["param_names"] == [n for n, _ in trainable if n not in decay_names]
    assert all(n.endswith("weight") and model.get_submodule(n[:-7]).__class__ is nn.Linear
               for n in decay["param_names"])
    assert decay["weight_decay"] == wd and no_decay["weight_decay"] == 0.0


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=2))


def _plain_groups(groups):
    return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in groups]


def test_a_compiled_model_is_grouped_by_its_own_names():
    # torch.compile's OptimizedModule names every parameter "_orig_mod.<name>": param_rules written for
    # the model matched nothing (a ValueError), and param_names, the plan and the optimizer state
    # differed from the uncompiled model's, so a checkpoint could not move between the two
    pytest.importorskip("transformers")
    model = _tiny_bert()
    compiled = torch.compile(model, backend="eager")
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    settings = dict(weight_decay=0.1, learning_rate=1e-3, layerwise_lr_decay=0.8,
                    param_rules=[{"params": "classifier.*", "lr_mult": 2.0}, {"params": "bert.pooler.*", "freeze": True}])
    for kwargs in ({"weight_decay": 0.1}, settings):
        expected = _plain_groups(build_param_groups(model, **kwargs))
        assert _plain_groups(build_param_groups(compiled, **kwargs)) == expected
    assert freeze_parameters(compiled, param_rules=settings["param_rules"]) == ["bert.pooler.dense.weight",
                                                                                "bert.pooler.dense.bias"]
    # get_decay_parameter_names keeps the names of the model it is given, as transformers' does
    assert get_decay_parameter_names(compiled) == [f"_orig_mod.{n}" for n in get_decay_parameter_names(model)]
