"""GaLore / APOLLO: target selection (HF's rules), groups that keep weight decay, layer-wise mode."""

from __future__ import annotations

import pytest
import torch
from _optim_helpers import make_quadratic
from torch import nn

from optsched.arguments import TrainingArguments
from optsched.optim import LayerWiseOptimizer, create_optimizer, get_optimizer_cls_and_kwargs
from optsched.optim.lowrank import check_target_module_exists, select_target_param_names, split_groups

pytest.importorskip("galore_torch")

# (optim_target_modules, module name, found, is_regex) -- transformers' semantics.
TARGET_TABLE = [
    ("attn", "attn", True, False),
    ("attn", "layer.attn", False, True),
    (r".*attn.*", "layer.attn.q", True, True),
    (["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj", True, False),
    (["q_proj"], "q_proj", True, False),
    (["k_proj"], "model.q_proj", False, False),
    ([r".*layers\.\d+\.mlp"], "model.layers.3.mlp", True, True),
    ([r"layers\.\d+\.mlp"], "model.layers.3.mlp", False, False),  # a regex must match the whole name
    (["mlp"], "model.layers.3.mlp.up", True, False),  # substring wins before regex
    ("all-linear", "lm_head", False, True),  # 'all-linear' is handled by the caller
]


@pytest.mark.parametrize(("targets", "key", "found", "is_regex"), TARGET_TABLE)
def test_check_target_module_exists(targets, key, found, is_regex):
    assert check_target_module_exists(targets, key, return_is_regex=True) == (found, is_regex)
    assert check_target_module_exists(targets, key) == found


@pytest.mark.parametrize(("targets", "key", "found", "is_regex"), TARGET_TABLE)
def test_check_target_module_exists_matches_transformers(targets, key, found, is_regex):
    trainer_utils = pytest.importorskip("transformers.trainer_utils")
    assert trainer_utils.check_target_module_exists(targets, key, return_is_regex=True) == (found, is_regex)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("all-linear", ["inp.weight", "out.weight"]),
        ("all_linear", ["inp.weight", "out.weight"]),
        (["out"], ["out.weight"]),
        ("in.*", ["inp.weight"]),
        (("inp",), ["inp.weight"]),
    ],
)
def test_select_target_param_names(targets, expected):
    assert select_target_param_names(make_quadratic(), targets, "galore_adamw") == expected


@pytest.mark.parametrize(
    ("targets", "error", "fragment"),
    [
        (None, ValueError, "needs optim_target_modules"),
        (["nothing"], ValueError, "selects no nn.Linear"),
        (3, TypeError, "must be a list of strings"),
        ([1, 2], TypeError, "must be a list of strings"),
    ],
)
def test_select_target_errors(targets, error, fragment):
    with pytest.raises(error, match=fragment):
        select_target_param_names(make_quadratic(), targets, "galore_adamw")


def test_split_groups_keeps_decay_and_names():
    p = [nn.Parameter(torch.zeros(2, 2)) for _ in range(3)]
    groups = [{"params": p[:2], "param_names": ["a.weight", "b.weight"], "name": "decay", "weight_decay": 0.1},
              {"params": p[2:], "param_names": ["b.bias"], "name": "no_decay", "weight_decay": 0.0}]
    out = split_groups(groups, ["b.weight"], {"rank": 4})
    assert [(g["name"], g["param_names"], g["weight_decay"], g.get("rank")) for g in out] == [
        ("decay", ["a.weight"], 0.1, None),
        ("no_decay", ["b.bias"], 0.0, None),
        ("decay_lowrank", ["b.weight"], 0.1, 4),
    ]


def test_galore_groups_keep_weight_decay_and_skip_frozen():
    model = make_quadratic()
    model.inp.bias.requires_grad_(False)
    args = TrainingArguments(optim="galore_adamw", optim_target_modules=["out"], weight_decay=0.1,
                             optim_args="rank=2")
    _, kwargs = get_optimizer_cls_and_kwargs(args, model)
    summary = [(g["name"], g["param_names"], g["weight_decay"], g.get("rank")) for g in kwargs["params"]]
    assert summary == [
        ("decay", ["inp.weight"], 0.1, None),
        ("no_decay", ["out.bias"], 0.0, None),
        ("decay_lowrank", ["out.weight"], 0.1, 2),
    ]


# ---- layer-wise ------------------------------------------------------------------------------------
def _layerwise(model, **kw):
    args = TrainingArguments(optim="galore_adamw_layerwise", optim_target_modules="all-linear",
                             optim_args="rank=2", learning_rate=1e-2, **kw)
    return create_optimizer(model, args)


def test_layerwise_steps_from_hooks_and_follows_the_outer_lr():
    model = make_quadratic()
    optimizer = _layerwise(model)
    assert isinstance(optimizer, LayerWiseOptimizer) and len(optimizer.optimizers) == 4
    before = model.out.weight.detach().clone()
    model.loss().backward()  # the hooks step every parameter here
    assert not torch.equal(before, model.out.weight)
    assert all(p.grad is None for p in model.parameters())
    for group in optimizer.param_groups:  # a scheduler edits the outer groups ...
        group["lr"] = 0.0
    before = model.out.weight.detach().clone()
    model.loss().backward()
    inner_lrs = {g["lr"] for opt in optimizer.optimizers for g in opt.param_groups}
    assert inner_lrs == {0.0}  # ... and the inner optimizers follow
    torch.testing.assert_close(model.out.weight, before, rtol=0, atol=1e-6)
    optimizer.remove_hooks()


def test_layerwise_state_dict_carries_inner_states_and_checks_them():
    model = make_quadratic()
    optimizer = _layerwise(model)
    model.loss().backward()
    state = optimizer.state_dict()
    assert len(state["layerwise"]) == 4 and all(s["state"] for s in state["layerwise"])
    bad = dict(state, layerwise=state["layerwise"][:2])
    with pytest.raises(ValueError, match="holds 2 per-parameter states; this LayerWiseOptimizer has 4"):
        optimizer.load_state_dict(bad)
    with pytest.raises(ValueError, match="holds none"):
        optimizer.load_state_dict({k: v for k, v in state.items() if k != "layerwise"})
    optimizer.remove_hooks()


def test_layerwise_refuses_gradient_accumulation():
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 is not supported"):
        _layerwise(make_quadratic(), gradient_accumulation_steps=2)


def test_layerwise_step_evaluates_a_closure():
    model = make_quadratic()
    optimizer = _layerwise(model)
    loss = optimizer.step(lambda: model.loss())
    assert isinstance(loss, torch.Tensor)
    assert optimizer.step() is None
    optimizer.remove_hooks()


def test_galore_adafactor_layerwise_works():
    # transformers forgets relative_step=False for the layer-wise variant and raises; here it trains.
    model = make_quadratic()
    args = TrainingArguments(optim="galore_adafactor_layerwise", optim_target_modules="all-linear",
                             optim_args="rank=2", learning_rate=1e-2)
    optimizer = create_optimizer(model, args)
    first = model.loss().item()
    for _ in range(20):
        model.loss().backward()
    assert model.loss().item() < first
    optimizer.remove_hooks()
