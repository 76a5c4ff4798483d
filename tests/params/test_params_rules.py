"""optsched.params.rules: parsing, first-match semantics, groups, freezing, schedulers, args, Trainer."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from optsched.arguments import TrainingArguments
from optsched.optim import create_optimizer
from optsched.params import (
    ParamRule,
    build_param_groups,
    freeze_parameters,
    match_rules,
    normalize_param_rules,
    parse_param_rules,
)


class Block(nn.Module):
    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.attn = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)


class Net(nn.Module):
    """embed -> layers.N (Linear + LayerNorm) -> head; forward returns {"loss"} like a HF model."""

    def __init__(self, depth: int = 3, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, x, labels=None):
        h = self.embed(x).mean(1)
        for block in self.layers:
            h = block.norm(torch.relu(block.attn(h)))
        pred = self.head(h).squeeze(-1)
        out = {"logits": pred}
        if labels is not None:
            out["loss"] = ((pred - labels) ** 2).mean()
        return out


def _by_name(groups):
    return {g["name"]: g for g in groups}


def _all_names(groups):
    return [n for g in groups for n in g["param_names"]]


# --- parsing --------------------------------------------------------------------------------------


def test_parse_fields_and_default_name():
    (a, b, c) = parse_param_rules([
        {"params": "layers.0.*", "lr_mult": 0.1},
        {"params": ["re:\\.bias$", "head.*"], "weight_decay": 0.0, "name": "nd", "betas": [0.9, 0.95]},
        {"params": "embed.*", "freeze": True},
    ])
    assert (a.name, a.patterns, a.lr_mult, a.lr, a.weight_decay, a.hyperparameters) == (
        "layers.0.*", ("layers.0.*",), 0.1, None, None, ())
    assert (b.name, b.weight_decay, b.hyperparameters) == ("nd", 0.0, (("betas", (0.9, 0.95)),))
    assert c.freeze and c.index == 2 and c.label == "param_rules[2] ('embed.*')"


RULES = [{"params": "layers.*.attn.*", "lr_mult": 0.5, "name": "attn"},
         {"params": "re:.*\\.bias$", "weight_decay": 0.0, "momentum": 0.9}]
RULES_YAML = """
- params: layers.*.attn.*
  lr_mult: 0.5
  name: attn
- params: 're:.*\\.bias$'
  weight_decay: 0.0
  momentum: 0.9
"""


@pytest.mark.parametrize("spelling", [RULES, json.dumps(RULES), yaml.safe_load(RULES_YAML)], ids=["py", "json", "yaml"])
def test_python_json_and_yaml_spellings_parse_alike(spelling):
    assert parse_param_rules(spelling) == parse_param_rules(RULES)
    assert normalize_param_rules(spelling) == RULES


@pytest.mark.parametrize("empty", [None, "", " ", [], ()])
def test_no_rules(empty):
    assert parse_param_rules(empty) == ()


ERRORS = [
    ({"params": "a.*", "lr": 1.0, "lr_mult": 0.5}, ValueError, "sets both lr=1.0 and lr_mult=0.5"),
    ({"params": "a.*", "weight_decay": 0.1, "wd_mult": 2}, ValueError, "weight_decay=0.1 and wd_mult=2"),
    ({"params": "a.*", "lr_mul": 0.5}, ValueError, "unknown key 'lr_mul'. Did you mean one of 'lr_mult'"),
    ({"params": "a.*", "freez": True}, ValueError, "Did you mean 'freeze'?"),
    ({"params": "re:([", "lr": 1.0}, ValueError, "not a valid regular expression"),
    ({"param": "a.*"}, ValueError, "has no 'params' key Did you mean 'params'"),
    ({"params": "a.*", "freeze": True, "lr_mult": 2}, ValueError, "freeze=True together with ['lr_mult']"),
    ({"params": "a.*", "param_names": ["x"]}, ValueError, "which the group builder writes itself"),
    ({"params": "a.*", "bad key": 1}, ValueError, "unknown key 'bad key'"),
    ({"params": "a.*", "lr_mult": -1}, ValueError, "param_rules[0] ('a.*') lr_mult=-1 is out of range"),
    ({"params": "a.*", "lr": float("nan")}, ValueError, "is not finite"),
    ({"params": "a.*", "lr": "1e-3"}, TypeError, "lr must be a number"),
    ({"params": "a.*", "freeze": "yes"}, TypeError, "freeze must be True or False"),
    ({"params": 3}, TypeError, "params must be a pattern string"),
    ({"params": ""}, ValueError, "empty pattern"),
    ({"params": "a.*", "name": 3}, TypeError, "name must be a non-empty string"),
    ({"params": "a.*", "betas": {1, 2}}, TypeError, "betas"),
    ("not a dict", TypeError, "param_rules[0] must be a dict"),
]


@pytest.mark.parametrize("rule, exc, message", ERRORS)
def test_bad_rules_name_the_rule_and_what_is_accepted(rule, exc, message):
    with pytest.raises(exc) as info:
        parse_param_rules([rule])
    assert message in str(info.value)
    assert "param_rules[0]" in str(info.value)


def test_bad_rule_list_shapes():
    with pytest.raises(TypeError, match="list of rule dicts"):
        parse_param_rules({"params": "a.*"})
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_param_rules("[{")
    with pytest.raises(ValueError, match="has the name 'x' of param_rules\\[0\\]"):
        parse_param_rules([{"params": "a", "name": "x"}, {"params": "b", "name": "x"}])


# --- matching -------------------------------------------------------------------------------------

MATCHES = [
    ("layers.*", "layers.0.attn.weight", True),  # a glob's * crosses dots
    ("layers.?.attn.weight", "layers.0.attn.weight", True),
    ("layers.[12].*", "layers.0.attn.weight", False),
    ("attn.*", "layers.0.attn.weight", False),  # a glob matches the whole name
    ("*attn*", "layers.0.attn.weight", True),
    ("re:attn", "layers.0.attn.weight", True),  # a regex is searched
    ("re:^attn", "layers.0.attn.weight", False),
    ("re:\\.bias$", "layers.0.attn.bias", True),
    ("re:\\.bias$", "layers.0.attn.bias_x", False),
]


@pytest.mark.parametrize("pattern, name, expected", MATCHES)
def test_glob_and_regex_matching(pattern, name, expected):
    (rule,) = parse_param_rules([{"params": pattern, "lr": 1.0}])
    assert rule.matches(name) is expected


def test_first_matching_rule_decides():
    rules = parse_param_rules([
        {"params": "layers.0.*", "lr_mult": 0.1, "name": "first"},
        {"params": "layers.*", "lr_mult": 0.5, "name": "second"},
    ])
    names = ["layers.0.attn.weight", "layers.1.attn.weight", "head.weight"]
    assert [r and r.name for r in match_rules(rules, names)] == ["first", "second", None]


def test_rule_that_matches_nothing_names_the_closest_parameters():
    with pytest.raises(ValueError) as info:
        build_param_groups(Net(), param_rules=[{"params": "layer.0.atn.*", "lr_mult": 0.1}])
    message = str(info.value)
    assert "param_rules[0] ('layer.0.atn.*')" in message and "matches no parameter" in message
    assert "layers.0.attn" in message  # the closest real names


def test_shadowed_rule_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="optsched.params.rules"):
        build_param_groups(Net(), param_rules=[{"params": "layers.*", "lr_mult": 0.5},
                                               {"params": "layers.0.*", "lr_mult": 0.1}])
    assert "param_rules[1] ('layers.0.*') matches only parameters an earlier rule" in caplog.text


def test_rule_matching_only_a_tied_alias_warns(caplog):
    model = Net()
    model.head = nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight  # tied: decided by its first name embed.weight
    with caplog.at_level(logging.WARNING, logger="optsched.params.rules"):
        build_param_groups(model, param_rules=[{"params": "head.*", "lr_mult": 0.5}])
    assert "tied tensors" in caplog.text


# --- groups ---------------------------------------------------------------------------------------


def test_settings_policy_and_rule_key():
    groups = build_param_groups(
        Net(depth=2), weight_decay=0.1, learning_rate=1e-3,
        param_rules=[
            {"params": "layers.0.*", "lr_mult": 0.1, "name": "low"},
            {"params": "re:\\.bias$", "weight_decay": 0.0, "name": "bias"},
            {"params": "head.weight", "lr": 0.5, "wd_mult": 2.0, "betas": [0.8, 0.9], "name": "head"},
        ],
    )
    summary = [(g["name"], g.get("lr"), g["weight_decay"], g["rule"], g["param_names"]) for g in groups]
    assert summary == [
        ("decay", None, 0.1, "policy:hf", ["embed.weight", "layers.1.attn.weight"]),
        ("low/decay", 1e-3 * 0.1, 0.1, "low", ["layers.0.attn.weight"]),
        ("low/no_decay", 1e-3 * 0.1, 0.0, "low", ["layers.0.attn.bias", "layers.0.norm.weight", "layers.0.norm.bias"]),
        ("bias", None, 0.0, "bias", ["layers.1.attn.bias", "layers.1.norm.bias", "head.bias"]),
        ("no_decay", None, 0.0, "policy:hf", ["layers.1.norm.weight"]),
        ("head/decay", 0.5, 0.2, "head", ["head.weight"]),
    ]
    assert _by_name(groups)["head/decay"]["betas"] == (0.8, 0.9)  # YAML lists become tuples


def test_wd_mult_multiplies_the_policy_value():
    groups = _by_name(build_param_groups(Net(depth=1), weight_decay=0.1, param_rules=[
        {"params": "layers.*", "wd_mult": 3.0, "name": "x"}]))
    assert math.isclose(groups["x/decay"]["weight_decay"], 0.3)
    assert groups["x/no_decay"]["weight_decay"] == 0.0  # 3 x 0: the policy still exempts norms/biases


def test_decay_policy_still_decides_where_rules_do_not():
    groups = _by_name(build_param_groups(Net(depth=1), weight_decay=0.1, decay_policy="hf+no_embeddings",
                                         param_rules=[{"params": "head.*", "lr_mult": 2.0}]))
    assert "embed.weight" in groups["no_decay"]["param_names"]
    assert groups["no_decay"]["rule"] == "policy:hf+no_embeddings"


def test_a_thousand_layers_give_a_handful_of_groups():
    model = Net(depth=1000)
    rules = [{"params": "layers.*.attn.*", "lr_mult": 0.5, "name": "attn"},
             {"params": "re:\\.bias$", "weight_decay": 0.0, "name": "bias"}]
    start = time.perf_counter()
    groups = build_param_groups(model, weight_decay=0.1, param_rules=rules)
    elapsed = time.perf_counter() - start
    # attn biases: the attn rule comes first and sets no weight_decay, so the policy exempts them
    assert [g["name"] for g in groups] == ["decay", "attn/decay", "attn/no_decay", "no_decay", "bias"]
    assert [len(g["params"]) for g in groups] == [2, 1000, 1000, 1000, 1001]
    assert sorted(_all_names(groups)) == sorted(n for n, _ in model.named_parameters())
    assert elapsed < 2.0, elapsed  # linear time: ~0.05 s here


def test_groups_merge_in_first_seen_order_and_keep_tensor_order():
    groups = build_param_groups(Net(depth=3), param_rules=[{"params": "layers.[02].*", "lr_mult": 0.5, "name": "x"}])
    assert [g["name"] for g in groups] == ["decay", "x/decay", "x/no_decay", "no_decay"]
    assert _by_name(groups)["x/decay"]["param_names"] == ["layers.0.attn.weight", "layers.2.attn.weight"]


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 6), mults=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=4),
       selected=st.lists(st.integers(0, 5), min_size=1, max_size=4))
def test_every_tensor_once_with_the_first_rule_lr(depth, mults, selected):
    model = Net(depth=depth)
    layers = sorted({i % depth for i in selected})
    rules = [{"params": f"layers.{i}.*", "lr_mult": mults[k % len(mults)], "name": f"r{i}"}
             for k, i in enumerate(layers)]
    groups = build_param_groups(model, learning_rate=0.1, param_rules=rules)
    names = _all_names(groups)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(set(names)) == len(names)
    mult = {f"layers.{r['params'].split('.')[1]}": r["lr_mult"] for r in rules}
    for g in groups:
        for name in g["param_names"]:
            prefix = ".".join(name.split(".")[:2])
            assert g.get("lr") == (0.1 * mult[prefix] if prefix in mult else None)
    assert len(groups) <= 2 * (len(rules) + 1)


# --- freeze ---------------------------------------------------------------------------------------


def test_freeze_leaves_tensors_out_and_create_optimizer_sets_requires_grad():
    model = Net(depth=2)
    rules = [{"params": ["embed.*", "layers.0.*"], "freeze": True, "name": "frozen"}]
    groups = build_param_groups(model, param_rules=rules)
    assert not any(n.startswith(("embed.", "layers.0.")) for n in _all_names(groups))
    assert all(p.requires_grad for p in model.parameters())  # build_param_groups never changes the model

    optimizer = create_optimizer(model, TrainingArguments(param_rules=rules, optim="adamw_torch"))
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["embed.weight", "layers.0.attn.bias", "layers.0.attn.weight",
                      "layers.0.norm.bias", "layers.0.norm.weight"]
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    # calling again is idempotent and no error: the freeze rule now matches frozen tensors only
    assert freeze_parameters(model, param_rules=rules) == []
    assert _all_names(build_param_groups(model, param_rules=rules)) == _all_names(groups)


def test_a_freeze_rule_behind_an_earlier_rule_says_what_it_left_trainable(caplog):
    model = Net(depth=1)
    rules = [{"params": r"re:\.bias$", "weight_decay": 0.0, "name": "bias"}, {"params": "layers.0.*", "freeze": True}]
    with caplog.at_level(logging.WARNING, logger="optsched.params.rules"):
        create_optimizer(model, TrainingArguments(param_rules=rules, optim="adamw_torch"))
    assert sorted(n for n, p in model.named_parameters() if not p.requires_grad) == [
        "layers.0.attn.weight", "layers.0.norm.weight"]
    assert "no effect" not in caplog.text  # it froze two tensors
    assert "param_rules[1] ('layers.0.*') leaves 2 of its parameters trainable" in caplog.text
    assert "'layers.0.attn.bias'" in caplog.text


def test_freeze_false_changes_nothing_but_claims_the_names():
    groups = build_param_groups(Net(depth=1), param_rules=[{"params": "layers.*", "freeze": False, "name": "keep"},
                                                           {"params": "layers.0.attn.*", "lr": 1.0}],
                                learning_rate=0.1)
    assert {g["name"] for g in groups} == {"decay", "no_decay", "keep/decay", "keep/no_decay"}


def test_freezing_everything_is_an_error():
    with pytest.raises(ValueError, match="no trainable parameters.*freeze all"):
        build_param_groups(Net(depth=1), param_rules=[{"params": "*", "freeze": True}])


# --- schedulers keep the multipliers ----------------------------------------------------------------


def _opt(rules, **kwargs):
    args = TrainingArguments(learning_rate=0.1, param_rules=rules, optim="adamw_torch", **kwargs)
    return create_optimizer(Net(depth=2), args), args


def test_optsched_scheduler_keeps_rule_multipliers():
    from optsched.schedules import create_scheduler

    optimizer, args = _opt([{"params": "layers.*", "lr_mult": 0.25, "name": "low"}],
                           lr_scheduler_type="cosine", warmup_steps=2)
    scheduler = create_scheduler(optimizer, args, num_training_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = _by_name(optimizer.param_groups)
    assert math.isclose(lrs["low/decay"]["lr"] / lrs["decay"]["lr"], 0.25)
    assert scheduler.lr_at(5)[:2] == [lrs["decay"]["lr"], lrs["low/decay"]["lr"]]


def test_torch_lambda_lr_keeps_rule_multipliers():
    optimizer, _ = _opt([{"params": "layers.*", "lr_mult": 0.25, "name": "low"},
                         {"params": "head.*", "lr": 0.3, "name": "head"}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert math.isclose(lrs["decay"], 0.1 / 4) and math.isclose(lrs["low/decay"], 0.025 / 4)
    assert math.isclose(lrs["head/decay"], 0.3 / 4)


# --- TrainingArguments, create_optimizer, Trainer -----------------------------------------------------


def test_arguments_validate_store_and_round_trip():
    args = TrainingArguments(param_rules=json.dumps(RULES), decay_policy="ndim")
    assert args.param_rules == RULES and "param_rules" in args.explicit_fields
    again = TrainingArguments.from_dict(json.loads(args.to_json_string()))
    assert again.param_rules == RULES and again.decay_policy == "ndim"
    with pytest.raises(ValueError, match="param_rules\\[0\\] .* unknown key 'lr_mul'"):
        TrainingArguments(param_rules=[{"params": "a", "lr_mul": 2}])
    with pytest.raises(ValueError, match="decay_policy='hff'.*Did you mean 'hf'"):
        TrainingArguments(decay_policy="hff")
    args.param_rules = [{"params": "x", "lr": 1.0}]  # assignment is checked too
    with pytest.raises(ValueError, match="both lr"):
        args.param_rules = [{"params": "x", "lr": 1.0, "lr_mult": 1.0}]


def test_yaml_config_to_optimizer():
    config = yaml.safe_load("""
learning_rate: 0.01
weight_decay: 0.05
optim: sgd
param_rules:
  - {params: "layers.0.*", lr_mult: 0.1, momentum: 0.5, name: slow}
  - {params: "re:\\\\.bias$", weight_decay: 0.0, name: bias}
""")
    optimizer = create_optimizer(Net(depth=2), TrainingArguments(**config))
    groups = _by_name(optimizer.param_groups)
    assert isinstance(optimizer, torch.optim.SGD)
    assert math.isclose(groups["slow/decay"]["lr"], 0.001) and groups["slow/decay"]["momentum"] == 0.5
    assert groups["decay"]["momentum"] == 0 and groups["bias"]["weight_decay"] == 0.0


def test_hyperparameter_the_optimizer_does_not_take_is_an_error():
    args = TrainingArguments(optim="adamw_torch", param_rules=[{"params": "head.*", "momentun": 0.9}])
    with pytest.raises(ValueError) as info:
        create_optimizer(Net(), args)
    message = str(info.value)
    assert "param_rules[0] ('head.*') sets 'momentun'" in message and "AdamW" in message
    assert "betas" in message and "amsgrad" in message


def test_factory_optimizers_refuse_rules():
    def factory():
        return lambda model, **kw: torch.optim.SGD(model.parameters(), lr=0.1)

    args = TrainingArguments(param_rules=[{"params": "head.*", "lr_mult": 2.0}])
    with pytest.raises(ValueError, match="built from the model, not from param groups"):
        create_optimizer(Net(), args, optimizer_cls_and_kwargs=(factory, {}))


def test_muon_use_muon_rule():
    pytest.importorskip("torch.optim._muon")
    args = TrainingArguments(optim="muon", learning_rate=0.01, param_rules=[
        {"params": "layers.0.attn.weight", "use_muon": False, "name": "adam_here"},
        {"params": "layers.1.*", "momentum": 0.8, "lr_mult": 0.5, "name": "slow"}])
    optimizer = create_optimizer(Net(depth=2), args)
    groups = _by_name(optimizer.param_groups)
    assert groups["adam_here/decay"]["use_muon"] is False
    assert groups["slow/decay/muon"]["momentum"] == 0.8 and math.isclose(groups["slow/decay/muon"]["lr"], 0.005)
    assert "momentum" not in groups["slow/no_decay/adamw"]  # Muon-only keys stay on the Muon half


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, 10, (3,), generator=g)
        return {"x": x, "labels": x.float().mean() / 10}


def test_trainer_builds_rule_and_layer_groups_and_trains(tmp_path):
    from optsched.trainer import Trainer

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=0.05,
        optim="adamw_torch", save_strategy="no", logging_steps=1, disable_tqdm=True, weight_decay=0.01,
        layerwise_lr_decay=0.5, param_rules=[{"params": "layers.0.*", "freeze": True},
                                             {"params": "head.*", "lr_mult": 2.0, "name": "head"}])
    model = Net(depth=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, args, train_dataset=_Data())
    out = trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {g["initial_lr"] for g in groups.values()} == {0.05 * 0.5**4, 0.05 * 0.25, 0.05 * 0.5, 0.05 * 2.0}
    assert math.isclose(groups["head/decay/layer_4"]["initial_lr"], 0.1)
    assert not model.layers[0].attn.weight.requires_grad
    assert torch.equal(before["layers.0.attn.weight"], model.layers[0].attn.weight)
    assert not torch.equal(before["head.weight"], model.head.weight)
    assert math.isfinite(out.training_loss)


def test_param_rule_is_a_frozen_value():
    (rule,) = parse_param_rules([{"params": "a", "lr": 1.0}])
    assert isinstance(rule, ParamRule) and parse_param_rules([rule]) == (rule,)
    with pytest.raises(AttributeError):
        rule.lr = 2.0  # type: ignore[misc]
