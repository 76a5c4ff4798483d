"""optsched.params.layers: layer ids of common layouts, lr scales, layer_id_fn, errors, rules on top."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from optsched.arguments import TrainingArguments
from optsched.optim import create_optimizer
from optsched.params import build_param_groups, get_layer_ids, infer_block_index, layer_lr_scale

transformers = pytest.importorskip("transformers")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=37, vocab_size=99))


class TinyViT(nn.Module):
    """timm's layout: cls_token, pos_embed, patch_embed, blocks.N, norm, head."""

    def __init__(self, depth: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = nn.Conv2d(3, dim, 2)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)


class EncoderDecoder(nn.Module):
    """T5's layout: two stacks, encoder.block.N then decoder.block.N."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(2))
        self.decoder = nn.Module()
        self.decoder.block = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(3))
        self.lm_head = nn.Linear(4, 10, bias=False)


# name -> expected layer id, for a sample of names of each model (L = 2 for the HF models)
LAYER_TABLE = {
    "bert": (tiny_bert, {
        "bert.embeddings.word_embeddings.weight": 0, "bert.embeddings.LayerNorm.bias": 0,
        "bert.encoder.layer.0.attention.self.query.weight": 1, "bert.encoder.layer.1.output.dense.bias": 2,
        "bert.pooler.dense.weight": 3, "classifier.weight": 3}),
    "gpt2": (tiny_gpt2, {
        "transformer.wte.weight": 0, "transformer.wpe.weight": 0, "transformer.h.0.ln_1.weight": 1,
        "transformer.h.1.mlp.c_proj.bias": 2, "transformer.ln_f.weight": 3}),
    "llama": (tiny_llama, {
        "model.embed_tokens.weight": 0, "model.layers.0.self_attn.q_proj.weight": 1,
        "model.layers.1.post_attention_layernorm.weight": 2, "model.norm.weight": 3, "lm_head.weight": 3}),
    "vit": (TinyViT, {
        "cls_token": 0, "pos_embed": 0, "patch_embed.weight": 0, "blocks.0.0.weight": 1, "blocks.2.1.bias": 3,
        "norm.weight": 4, "head.weight": 4}),
}


@pytest.mark.parametrize("model_name", list(LAYER_TABLE))
def test_layer_ids_of_common_layouts(model_name):
    make, expected = LAYER_TABLE[model_name]
    ids = get_layer_ids(make())
    assert {name: ids[name] for name in expected} == expected
    assert "lm_head.weight" not in ids or model_name != "gpt2"  # tied to wte: decided by its first name


@pytest.mark.parametrize("model_name", list(LAYER_TABLE))
def test_group_lrs_follow_the_formula(model_name):
    make, expected = LAYER_TABLE[model_name]
    model = make()
    num_layers = max(get_layer_ids(model).values()) - 1
    groups = build_param_groups(model, learning_rate=1.0, weight_decay=0.1, layerwise_lr_decay=0.75)
    lr_of = {name: g["lr"] for g in groups for name in g["param_names"]}
    for name, layer in expected.items():
        assert math.isclose(lr_of[name], 0.75 ** (num_layers + 1 - layer))
    for g in groups:
        assert g["name"].endswith(f"/layer_{g['layer_id']}") and g["rule"] == "policy:hf"
    # one group per (decision, layer) at most
    assert len(groups) <= 2 * (num_layers + 2)


SCALES = [  # (layer, L, d, expected): HF/BEiT reference values
    (0, 12, 0.75, 0.75**13), (12, 12, 0.75, 0.75), (13, 12, 0.75, 1.0), (1, 2, 0.5, 0.25), (3, 2, 0.5, 1.0),
]


@pytest.mark.parametrize("layer, num_layers, decay, expected", SCALES)
def test_scale_table(layer, num_layers, decay, expected):
    assert math.isclose(layer_lr_scale(layer, num_layers, decay), expected)


@given(num_layers=st.integers(1, 48), decay=st.floats(0.05, 1.0))
def test_scales_rise_to_one_at_the_head(num_layers, decay):
    scales = [layer_lr_scale(i, num_layers, decay) for i in range(num_layers + 2)]
    assert scales[-1] == 1.0 and all(a <= b for a, b in zip(scales, scales[1:]))
    assert all(0 < s <= 1 for s in scales)


def test_several_stacks_are_numbered_one_after_the_other():
    ids = get_layer_ids(EncoderDecoder())
    assert ids == {"shared.weight": 0, "encoder.block.0.weight": 1, "encoder.block.1.weight": 2,
                   "decoder.block.0.weight": 3, "decoder.block.1.weight": 4, "decoder.block.2.weight": 5,
                   "lm_head.weight": 6}


@pytest.mark.parametrize("name, expected", [
    ("encoder.layer.3.x.weight", ("encoder.layer.", 3)), ("h.0.attn.weight", ("h.", 0)),
    ("transformer.resblocks.7.mlp.weight", ("transformer.resblocks.", 7)),
    ("decoder.layers.2.fc.weight", ("decoder.layers.", 2)), ("layer1.0.conv.weight", None),
    ("blocks.weight", None), ("head.weight", None),
])
def test_infer_block_index(name, expected):
    assert infer_block_index(name) == expected


def block_of(name: str) -> int | None:
    """A layer_id_fn for Sequential models: '<N>.<...>' -> N for N in 1..3."""
    first = name.split(".")[0]
    return int(first) - 1 if first in {"1", "2", "3"} else None


def _sequential():
    return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))


@pytest.mark.parametrize("fn", [block_of, f"{__name__}:block_of"], ids=["callable", "import-path"])
def test_layer_id_fn_overrides_the_patterns(fn):
    ids = get_layer_ids(_sequential(), layer_id_fn=fn)
    assert ids == {"0.weight": 0, "1.weight": 1, "1.bias": 1, "2.weight": 2, "2.bias": 2, "3.weight": 3,
                   "3.bias": 3, "4.weight": 4, "4.bias": 4}


def test_no_layers_found_is_an_error():
    with pytest.raises(ValueError, match="layerwise_lr_decay needs the model's layers.*'3.weight'.*layer_id_fn"):
        build_param_groups(_sequential(), layerwise_lr_decay=0.8)
    with pytest.raises(ValueError, match="layer_id_fn returned None for every parameter"):
        build_param_groups(TinyViT(), layerwise_lr_decay=0.8, layer_id_fn=lambda name: None)


@pytest.mark.parametrize("fn, exc, message", [
    (lambda name: 1.5, TypeError, "must return an int or None, got float 1.5 for parameter"),
    (lambda name: True, TypeError, "got bool"),
    (lambda name: -1, ValueError, "returned -1 for parameter"),
    ("no_such_module_xyz:fn", ValueError, "cannot import module 'no_such_module_xyz'"),
    (f"{__name__}:block_off", ValueError, "Did you mean 'block_of'"),
    ("nodots", ValueError, "is not an import path"),
    (3, TypeError, "layer_id_fn must be a callable"),
])
def test_bad_layer_id_fn(fn, exc, message):
    with pytest.raises(exc, match=message):
        build_param_groups(TinyViT(), layerwise_lr_decay=0.8, layer_id_fn=fn)


@pytest.mark.parametrize("value, exc", [(0.0, ValueError), (1.5, ValueError), (-0.1, ValueError),
                                        ("0.5", TypeError), (float("inf"), ValueError)])
def test_bad_decay_values(value, exc):
    with pytest.raises(exc, match="layerwise_lr_decay"):
        TrainingArguments(layerwise_lr_decay=value)


def test_frozen_blocks_count_so_freezing_changes_no_other_lr():
    def lrs(model):
        return {n: g["lr"] for g in build_param_groups(model, learning_rate=1.0, layerwise_lr_decay=0.5)
                for n in g["param_names"]}

    full = lrs(TinyViT(depth=3))
    top_frozen = TinyViT(depth=3)
    top_frozen.blocks[2].requires_grad_(False)
    assert lrs(top_frozen) == {n: lr for n, lr in full.items() if not n.startswith("blocks.2.")}
    assert full["head.weight"] == 1.0 and full["cls_token"] == 0.5**4
    assert get_layer_ids(top_frozen)["head.weight"] == 4  # L = 3 blocks, frozen or not

    all_frozen = TinyViT(depth=3)
    all_frozen.blocks.requires_grad_(False)  # no trainable tensor in a block: the layers are still known
    assert lrs(all_frozen) == {n: lr for n, lr in full.items() if not n.startswith("blocks.")}


def test_a_freeze_rule_gives_the_same_groups_before_and_after_create_optimizer():
    args = TrainingArguments(learning_rate=1.0, layerwise_lr_decay=0.5, optim="adamw_torch",
                             param_rules=[{"params": "blocks.2.*", "freeze": True}])
    model = TinyViT(depth=3)
    before = [(g["name"], g["lr"], g["param_names"]) for g in build_param_groups(model, args)]
    optimizer = create_optimizer(model, args)  # sets requires_grad=False on blocks.2
    assert [(g["name"], g["lr"], g["param_names"]) for g in optimizer.param_groups] == before
    assert [(g["name"], g["lr"], g["param_names"]) for g in build_param_groups(model, args)] == before


def test_rule_lr_mult_multiplies_the_layer_decayed_lr_and_lr_replaces_it():
    groups = build_param_groups(TinyViT(depth=2), learning_rate=1.0, layerwise_lr_decay=0.5, param_rules=[
        {"params": "blocks.0.*", "lr_mult": 10.0, "name": "b0"},
        {"params": "head.*", "lr": 0.01, "name": "head"}])
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    layer_of = {n: g["layer_id"] for g in groups for n in g["param_names"]}
    assert math.isclose(lr_of["blocks.0.1.weight"], 10.0 * 0.5**2) and layer_of["blocks.0.1.weight"] == 1
    assert lr_of["head.weight"] == 0.01 and lr_of["head.bias"] == 0.01
    assert math.isclose(lr_of["blocks.1.1.weight"], 0.5) and math.isclose(lr_of["cls_token"], 0.5**3)


def test_from_training_arguments_and_create_optimizer():
    args = TrainingArguments(learning_rate=1e-3, layerwise_lr_decay=0.5, layer_id_fn=f"{__name__}:block_of",
                             optim="adamw_torch")
    assert TrainingArguments.from_dict(args.to_dict()).layer_id_fn == f"{__name__}:block_of"
    optimizer = create_optimizer(_sequential(), args)
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert [round(x, 12) for x in lrs] == [1e-3 * 0.5**4, 1e-3 * 0.5**3, 1e-3 * 0.25, 1e-3 * 0.5, 1e-3]


def test_callable_layer_id_fn_serialises_as_its_import_path():
    args = TrainingArguments(layerwise_lr_decay=0.5, layer_id_fn=block_of)
    assert args.to_dict()["layer_id_fn"] == f"{__name__}:block_of"


def test_llama_layer_decay_with_torch_scheduler_keeps_ratios():
    model = tiny_llama()
    optimizer = create_optimizer(model, TrainingArguments(learning_rate=0.1, layerwise_lr_decay=0.8,
                                                          optim="adamw_torch"))
    before = [g["lr"] for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    ratios = [g["lr"] / b for g, b in zip(optimizer.param_groups, before)]
    assert all(math.isclose(r, ratios[0]) for r in ratios)
