"""create_optimizer / get_optimizer_cls_and_kwargs: defaults, HF's special cases, our fixes."""

from __future__ import annotations

import pytest
import torch
from _optim_helpers import make_quadratic
from torch import nn

import optsched.optim.factory as factory
from optsched.arguments import TrainingArguments
from optsched.optim import create_optimizer, get_optimizer_cls_and_kwargs, is_optimizer_factory


# ---- the default optimizer: fused where the device has the kernel --------------------------------
def test_default_is_fused_adamw_on_cpu():
    """From torch 2.8 on (transformers' default there); before, transformers' default is plain AdamW."""
    from optsched.arguments import DEFAULT_OPTIM

    cls, kwargs = get_optimizer_cls_and_kwargs(TrainingArguments(), make_quadratic())
    assert cls is torch.optim.AdamW
    assert kwargs.get("fused") is (True if DEFAULT_OPTIM == "adamw_torch_fused" else None)


def test_default_falls_back_when_the_device_has_no_fused_kernel(monkeypatch):
    monkeypatch.setattr(factory, "_fused_devices", lambda: {"cuda"})
    cls, kwargs = get_optimizer_cls_and_kwargs(TrainingArguments(), make_quadratic())
    assert cls is torch.optim.AdamW and "fused" not in kwargs
    optimizer = create_optimizer(make_quadratic(), TrainingArguments())
    assert optimizer.defaults["fused"] in (None, False)


def test_explicit_fused_on_an_unsupported_device_is_an_error(monkeypatch):
    monkeypatch.setattr(factory, "_fused_devices", lambda: {"cuda"})
    with pytest.raises(ValueError, match="optim='adamw_torch_fused' needs torch's fused kernel.*'adamw_torch'"):
        get_optimizer_cls_and_kwargs(TrainingArguments(optim="adamw_torch_fused"), make_quadratic())


def test_fused_needs_floating_point_parameters():
    model = nn.Linear(2, 2).to(torch.float64)
    assert factory.fused_supported(model)
    model.weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))
    assert not factory.fused_supported(model)


# ---- SGD: momentum from an explicit adam_beta1 (the seed's example) ------------------------------
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, {"lr": 1e-3}),  # HF: no momentum
        ({"adam_beta1": 0.9}, {"lr": 1e-3, "momentum": 0.9}),  # the seed: "Used as momentum for SGD"
        ({"adam_beta1": 0.8, "optim_args": "momentum=0.5"}, {"lr": 1e-3, "momentum": 0.5}),
        ({"optim_args": "momentum=0.9,nesterov=true"}, {"lr": 1e-3, "momentum": 0.9, "nesterov": True}),
    ],
)
def test_sgd_momentum(arguments, expected):
    args = TrainingArguments(optim="sgd", learning_rate=1e-3, **arguments)
    cls, kwargs = get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.SGD and kwargs == expected


# ---- optimizer_cls_and_kwargs and factories ------------------------------------------------------
def test_cls_and_kwargs_replace_the_lookup_and_are_not_mutated():
    kwargs = {"lr": 0.5, "momentum": 0.1}
    optimizer = create_optimizer(make_quadratic(), TrainingArguments(optim="adamw_torch"),
                                 optimizer_cls_and_kwargs=(torch.optim.SGD, kwargs))
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.1
    assert kwargs == {"lr": 0.5, "momentum": 0.1}
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]


@pytest.mark.parametrize("pair, message", [
    (("sgd", {}), r"optimizer_cls_and_kwargs\[0\] must be an optimizer class or factory, got str 'sgd'; "
                  r"for a registered name use optim='sgd'"),
    ((torch.optim.SGD, [("lr", 0.1)]), r"optimizer_cls_and_kwargs\[1\] must be a dict of keyword arguments"),
])
def test_cls_and_kwargs_of_the_wrong_kind_name_the_field(pair, message):
    with pytest.raises(TypeError, match=message):
        create_optimizer(make_quadratic(), TrainingArguments(), optimizer_cls_and_kwargs=pair)


def test_a_value_the_optimizer_class_refuses_is_traced_to_the_arguments():
    args = TrainingArguments(optim="sgd", optim_args="nesterov=true")  # torch: nesterov needs momentum
    with pytest.raises(ValueError, match=r"optim='sgd' \(SGD\) refused the arguments .*'nesterov': True.*"
                                         r"optim_args='nesterov=true'.*Nesterov momentum requires a momentum"):
        create_optimizer(make_quadratic(), args)


def test_a_non_optimizer_class_is_a_factory_called_with_the_model():
    calls = []

    class Factory:
        def __call__(self, model, **kwargs):
            calls.append((model, kwargs))
            return torch.optim.SGD(model.parameters(), **kwargs)

    model = make_quadratic()
    optimizer = create_optimizer(model, None, optimizer_cls_and_kwargs=(Factory, {"lr": 0.1}))
    assert calls == [(model, {"lr": 0.1})] and isinstance(optimizer, torch.optim.SGD)
    assert is_optimizer_factory(Factory) and not is_optimizer_factory(torch.optim.SGD)


@pytest.mark.parametrize("bad", [torch.optim.SGD, (torch.optim.SGD,), "sgd"])
def test_bad_cls_and_kwargs_is_a_type_error(bad):
    with pytest.raises(TypeError, match="optimizer_cls_and_kwargs"):
        create_optimizer(make_quadratic(), None, optimizer_cls_and_kwargs=bad)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        create_optimizer([nn.Parameter(torch.zeros(1))], None)  # type: ignore[arg-type]


# ---- groups ----------------------------------------------------------------------------------------
def test_groups_follow_the_contract_and_skip_frozen_parameters():
    model = make_quadratic()
    model.inp.bias.requires_grad_(False)
    optimizer = create_optimizer(model, TrainingArguments(optim="adamw_torch", weight_decay=0.1))
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["decay"]["param_names"] == ["inp.weight", "out.weight"] and groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["param_names"] == ["out.bias"] and groups["no_decay"]["weight_decay"] == 0.0
    saved = optimizer.state_dict()["param_groups"]
    assert [g["name"] for g in saved] == ["decay", "no_decay"]


def test_needs_model():
    with pytest.raises(ValueError, match="needs the model"):
        get_optimizer_cls_and_kwargs(TrainingArguments(optim="galore_adamw", optim_target_modules="all-linear"))


def test_lomo_receives_the_model():
    pytest.importorskip("lomo_optim")
    model = make_quadratic()
    optimizer = create_optimizer(model, TrainingArguments(optim="lomo", learning_rate=0.1))
    assert optimizer.model is model


def test_ademamix_betas_come_from_args_and_optim_args():
    pytest.importorskip("bitsandbytes")
    args = TrainingArguments(optim="ademamix", adam_beta1=0.8, optim_args="beta2=0.95,t_alpha=10,eps=1e-6")
    cls, kwargs = get_optimizer_cls_and_kwargs(args)
    assert cls.__name__ == "AdEMAMix"
    assert kwargs == {"lr": 5e-5, "betas": (0.8, 0.95, 0.9999), "alpha": 5.0, "eps": 1e-6, "t_alpha": 10,
                      "optim_bits": 32, "is_paged": False}


def test_stable_adamw_false_means_false():
    pytest.importorskip("optimi")
    _, kwargs = get_optimizer_cls_and_kwargs(TrainingArguments(optim="stable_adamw", optim_args="decouple_lr=False"))
    assert kwargs["decouple_lr"] is False  # transformers: bool("False") is True


# ---- bitsandbytes 8-bit keeps embeddings in 32-bit ---------------------------------------------------
class _WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.proj = nn.Linear(64, 64, bias=False)

    def forward(self, ids):
        return self.proj(self.emb(ids)).pow(2).mean()


@pytest.fixture
def fresh_bnb_manager(monkeypatch):
    # bitsandbytes' GlobalOptimManager is process-global and keys overrides by (group, index) too, so
    # an override registered by one test leaks into the next optimizer: give each test a clean one.
    bnb = pytest.importorskip("bitsandbytes")
    manager = bnb.optim.GlobalOptimManager.get_instance()
    for attr in ("pid2config", "index2config"):
        monkeypatch.setattr(manager, attr, {})
    monkeypatch.setattr(manager, "module_weight_config_triple", [])
    return manager


@pytest.mark.parametrize(("name", "override"), [("adamw_8bit", True), ("paged_adamw_32bit", False)])
def test_bnb_8bit_keeps_embedding_state_in_32bit(name, override, fresh_bnb_manager):
    model = _WithEmbedding()
    optimizer = create_optimizer(model, TrainingArguments(optim=name))
    model(torch.arange(10)).backward()
    optimizer.step()
    emb_state = optimizer.state[model.emb.weight]["state1"]
    proj_state = optimizer.state[model.proj.weight]["state1"]
    assert emb_state.dtype == torch.float32  # 32-bit either way: overridden, or a 32-bit optimizer
    assert proj_state.dtype == (torch.uint8 if override else torch.float32)
    assert fresh_bnb_manager.module_weight_config_triple == []  # applied, and no module kept by bitsandbytes
    overridden = [k for k, v in fresh_bnb_manager.index2config.items() if v == {"optim_bits": 32}]
    assert overridden == ([(0, 0)] if override else [])  # the embedding is the first parameter


def test_bnb_8bit_override_leaves_nothing_behind(fresh_bnb_manager):
    """bitsandbytes' manager is process-wide: it would keep every model's embedding alive, and a later
    8-bit optimizer's parameter at the same (group, index) would inherit the override."""
    import gc
    import weakref

    model = _WithEmbedding()
    optimizer = create_optimizer(model, TrainingArguments(optim="adamw_8bit"))
    assert fresh_bnb_manager.index2config and fresh_bnb_manager.pid2config
    embedding = weakref.ref(model.emb)
    del model, optimizer
    gc.collect()
    assert embedding() is None
    assert fresh_bnb_manager.index2config == {} and fresh_bnb_manager.pid2config == {}
    later = nn.Sequential(nn.Linear(64, 64, bias=False))  # its weight is at (0, 0) too: 8-bit, as it should be
    optimizer = create_optimizer(later, TrainingArguments(optim="adamw_8bit"))
    later(torch.ones(4, 64)).pow(2).mean().backward()
    optimizer.step()
    assert optimizer.state[later[0].weight]["state1"].dtype == torch.uint8


def test_bnb_8bit_without_override_would_quantize_the_embedding(fresh_bnb_manager):
    import bitsandbytes as bnb

    model = _WithEmbedding()  # same shapes, built directly: no override registered for this module
    optimizer = bnb.optim.AdamW(model.parameters(), optim_bits=8)
    model(torch.arange(10)).backward()
    optimizer.step()
    assert optimizer.state[model.emb.weight]["state1"].dtype == torch.uint8


# ---- schedule-free warmup in steps -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "num_training_steps", "expected"),
    [
        ({}, None, 0),
        ({"warmup_steps": 10}, None, 10),
        ({"warmup_steps": 0.1}, 200, 20),
        ({"warmup_steps": 0.15}, 101, 16),  # ceil, as transformers' get_warmup_steps
        ({"warmup_ratio": 0.05}, 100, 5),
    ],
)
@pytest.mark.parametrize("name", ["schedule_free_adamw", "schedule_free_sgd"])
def test_schedule_free_warmup_is_in_steps(name, arguments, num_training_steps, expected):
    pytest.importorskip("schedulefree")
    args = TrainingArguments(optim=name, **arguments)
    _, kwargs = get_optimizer_cls_and_kwargs(args, num_training_steps=num_training_steps)
    assert kwargs["warmup_steps"] == expected and isinstance(kwargs["warmup_steps"], int)


def test_schedule_free_warmup_ratio_needs_the_step_count():
    pytest.importorskip("schedulefree")
    with pytest.raises(ValueError, match="pass num_training_steps= to create_optimizer"):
        create_optimizer(make_quadratic(), TrainingArguments(optim="schedule_free_adamw", warmup_steps=0.1))
    optimizer = create_optimizer(make_quadratic(), TrainingArguments(optim="schedule_free_adamw", warmup_steps=0.1),
                                 num_training_steps=50)
    assert optimizer.defaults["warmup_steps"] == 5


def test_schedule_free_radam_takes_no_warmup():
    pytest.importorskip("schedulefree")
    _, kwargs = get_optimizer_cls_and_kwargs(TrainingArguments(optim="schedule_free_radam", warmup_steps=0.1))
    assert "warmup_steps" not in kwargs


def test_num_training_steps_is_checked():
    with pytest.raises(ValueError, match="num_training_steps=0"):
        get_optimizer_cls_and_kwargs(TrainingArguments(), num_training_steps=0)


def test_a_compiled_model_gets_the_optimizer_of_the_uncompiled_one():
    # param_rules matched the "_orig_mod."-prefixed names of a torch.compile'd model (a ValueError for
    # a rule written for the model), and the groups' param_names carried the prefix
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    compiled = torch.compile(model, backend="eager")
    args = TrainingArguments(weight_decay=0.1, optim="adamw_torch", param_rules=[{"params": "2.*", "lr_mult": 0.5}])
    plain_groups, compiled_groups = (create_optimizer(m, args).state_dict()["param_groups"] for m in (model, compiled))
    assert compiled_groups == plain_groups
    assert [g["param_names"] for g in compiled_groups] == [["0.weight"], ["0.bias", "1.weight", "1.bias"],
                                                            ["2.weight"], ["2.bias"]]

