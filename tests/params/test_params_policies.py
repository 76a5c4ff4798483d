"""optsched.params.policies: the registry of decay policies and exemptions (issue 5, item 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optsched.params import (
    build_param_groups,
    classify_parameters,
    get_decay_parameter_names,
    is_embedding_like,
    list_decay_policies,
    resolve_decay_policy,
)


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 4, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.register_tokens = nn.Parameter(torch.zeros(1, 2, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.norm1 = nn.LayerNorm(4)
        self.qkv = nn.Linear(4, 12)
        self.gamma = nn.Parameter(torch.ones(4))  # layer scale: 1-D, not a norm
        self.head = nn.Linear(4, 3)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.wpe = nn.Embedding(8, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight


# policy -> expected decay names (reference table)
VIT_TABLE = {
    "hf": ["cls_token", "register_tokens", "pos_embed", "gamma", "patch_embed.weight", "qkv.weight",
           "head.weight"],
    "ndim": ["cls_token", "register_tokens", "pos_embed", "patch_embed.weight", "qkv.weight", "head.weight"],
    "hf+no_embeddings": ["gamma", "patch_embed.weight", "qkv.weight", "head.weight"],
    "ndim+no_embeddings": ["patch_embed.weight", "qkv.weight", "head.weight"],
}


@pytest.mark.parametrize("policy", list(VIT_TABLE))
def test_vit_like_reference_table(policy):
    assert get_decay_parameter_names(TinyViT(), decay_policy=policy) == VIT_TABLE[policy]


def test_table_covers_every_registered_policy():
    assert sorted(VIT_TABLE) == list_decay_policies()


@pytest.mark.parametrize("policy", list_decay_policies())
def test_groups_follow_the_policy(policy):
    model = TinyViT()
    decay, no_decay = build_param_groups(model, weight_decay=0.1, decay_policy=policy)
    assert decay["param_names"] == VIT_TABLE[policy]
    assert set(no_decay["param_names"]) == {n for n, _ in model.named_parameters()} - set(VIT_TABLE[policy])


def test_no_embeddings_exempts_tables_and_the_tied_head_in_groups():
    decay, no_decay = build_param_groups(TinyLM(), weight_decay=0.1, decay_policy="hf+no_embeddings")
    assert decay["param_names"] == ["fc.weight"]
    assert no_decay["param_names"] == ["wte.weight", "wpe.weight", "ln.weight", "ln.bias", "fc.bias"]
    hf_decay, _ = build_param_groups(TinyLM(), weight_decay=0.1)
    assert hf_decay["param_names"] == ["wte.weight", "wpe.weight", "fc.weight"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pos_embed", True),
        ("embeddings.position_embeddings", True),
        ("embeddings.cls_token", True),
        ("dist_token", True),
        ("mask_token", True),
        ("register_tokens", True),
        ("patch_embed.weight", False),  # a projection that lives in a module named *embed
        ("tokenizer_proj", False),
        ("embedded_scale", False),
    ],
)
def test_embedding_like_by_own_name(name, expected):
    model = nn.Module()
    owner = model
    *path, own = name.split(".")
    for part in path:
        owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.register_parameter(own, nn.Parameter(torch.zeros(2)))
    (info,) = classify_parameters(model)
    assert is_embedding_like(info) is expected


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ("hff", "decay_policy='hff' is not a known decay policy. Did you mean 'hf'"),
        ("timm", "is not a known decay policy.*Accepted: hf, ndim"),
        ("ndim+no_embedding", "is not a known exemption .after '\\+'.. Did you mean 'no_embeddings'"),
        ("ndm+no_embeddings", "is not a known decay policy .before '\\+'.. Did you mean 'ndim'"),
        ("hf+", "decay_policy='' is not a known exemption"),
    ],
)
def test_bad_policy_names(policy, match):
    with pytest.raises(ValueError, match=match):
        resolve_decay_policy(policy)


def test_combined_policy_is_named_for_explain():
    assert resolve_decay_policy("ndim + no_embeddings").__name__ == "ndim + no_embeddings"


def no_decay_on_head(info) -> bool:
    """A user's policy, importable as tests.params.test_params_policies:no_decay_on_head."""
    return not info.name.startswith("head.")


def test_a_callable_policy_round_trips_through_to_dict_as_its_import_path():
    import json

    from optsched import TrainingArguments

    args = TrainingArguments(decay_policy=no_decay_on_head, weight_decay=0.1)
    path = args.to_dict()["decay_policy"]
    assert path == f"{__name__}:no_decay_on_head"
    again = TrainingArguments.from_dict(json.loads(json.dumps(args.to_dict())))
    assert resolve_decay_policy(again.decay_policy) is no_decay_on_head
    names = [g["param_names"] for g in build_param_groups(TinyViT(), again)]
    assert names == [g["param_names"] for g in build_param_groups(TinyViT(), args)]
    assert "head.weight" in names[1] and "qkv.weight" in names[0]


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("no_such_module_xyz:policy", ValueError, "decay_policy='no_such_module_xyz:policy': cannot import"),
        (f"{__name__}:no_decay_on_hed", ValueError, "Did you mean 'no_decay_on_head'"),
        (f"{__name__}:VIT_TABLE", TypeError, "is a dict, not a callable ParamInfo -> bool"),
    ],
)
def test_bad_policy_import_paths(path, error, match):
    with pytest.raises(error, match=match):
        resolve_decay_policy(path)
