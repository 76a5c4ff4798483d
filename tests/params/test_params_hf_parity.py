"""Parity with transformers: the decay set and the param groups of ``Trainer.create_optimizer``.

Models are built from tiny config classes (nothing is downloaded).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import Trainer  # noqa: E402

from optsched.params import build_param_groups, get_decay_parameter_names  # noqa: E402

_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
_DEC = dict(_ENC, num_key_value_heads=2)

# name -> (auto class, config factory). Covers: tied embeddings (GPT-2 LM, BERT MLM, T5), a model's
# own RMSNorm (Llama, Mistral, T5LayerNorm), biases that are not named "bias" (T5's
# relative_attention_bias, DeBERTa's q_bias, XLNet's r_w_bias, Swin's relative_position_bias_table).
ARCHITECTURES = {
    "bert-mlm": ("AutoModelForMaskedLM", lambda t: t.BertConfig(**_ENC)),
    "roberta": ("AutoModel", lambda t: t.RobertaConfig(**_ENC)),
    "gpt2-lm": ("AutoModelForCausalLM", lambda t: t.GPT2Config(n_embd=32, n_layer=2, n_head=2,
                                                               vocab_size=99)),
    "llama-lm": ("AutoModelForCausalLM", lambda t: t.LlamaConfig(**_DEC)),
    "mistral": ("AutoModel", lambda t: t.MistralConfig(**_DEC)),
    "t5": (
        "AutoModelForSeq2SeqLM",
        lambda t: t.T5Config(d_model=32, d_ff=37, num_layers=2, num_heads=2, d_kv=16, vocab_size=99),
    ),
    "deberta": ("AutoModel", lambda t: t.DebertaConfig(**_ENC)),
    "xlnet": ("AutoModel", lambda t: t.XLNetConfig(d_model=32, n_layer=2, n_head=2, d_inner=37,
                                                    vocab_size=99)),
    "bart": (
        "AutoModel",
        lambda t: t.BartConfig(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=99,
        ),
    ),
    "swin": (
        "AutoModel",
        lambda t: t.SwinConfig(embed_dim=8, depths=[1, 1], num_heads=[1, 1], image_size=16, patch_size=4,
                               window_size=2),
    ),
}


def _model(arch: str) -> nn.Module:
    auto, config = ARCHITECTURES[arch]
    return getattr(transformers, auto).from_config(config(transformers))


def _hf_decay_names(model: nn.Module) -> list[str]:
    # The method does not use self; calling it unbound avoids building a Trainer per model.
    return Trainer.get_decay_parameter_names(None, model)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_decay_names_equal_transformers(arch):
    model = _model(arch)
    ours = get_decay_parameter_names(model)
    hf = _hf_decay_names(model)
    assert set(ours) == set(hf)
    assert len(ours) == len(set(ours))
    # non-trivial: both groups are populated on every architecture
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert 0 < len(ours) < len(names)


def test_the_parity_table_exercises_the_cases_that_differ_from_a_naive_rule():
    # "bias" as a substring and "bias" as the last name component disagree on these models, and our
    # word rule must follow transformers there: the parity above would not test it otherwise.
    t5 = get_decay_parameter_names(_model("t5"))
    assert not any("relative_attention_bias" in n for n in t5)
    deberta = _model("deberta")
    assert any(n.endswith("q_bias") for n, _ in deberta.named_parameters())
    gpt2 = _model("gpt2-lm")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(get_decay_parameter_names(gpt2))


def test_attn_bias_proj_weight_decays_unlike_transformers():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_bias_proj = nn.Linear(4, 4)
            self.query = nn.Linear(4, 4)

    model = Attention()
    assert "attn_bias_proj.weight" not in _hf_decay_names(model)  # transformers' substring rule
    assert get_decay_parameter_names(model) == ["attn_bias_proj.weight", "query.weight"]


def _resnet() -> nn.Module:
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    return transformers.AutoModel.from_config(config)


def test_inside_a_transformers_model_its_rule_decides_even_where_norms_hide_from_it():
    # transformers' ResNet names its BatchNorm2d "normalization": transformers decays those weights
    # (only nn.LayerNorm is recognised by type). optsched follows it there, exactly.
    model = _resnet()
    bn_weights = {f"{prefix}.weight" for prefix, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn_weights and bn_weights <= set(_hf_decay_names(model))
    assert set(get_decay_parameter_names(model)) == set(_hf_decay_names(model))


def test_outside_a_transformers_model_norms_are_found_by_type():
    class Classifier(nn.Module):  # a user's model: a transformers backbone, a head of its own
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _resnet()
            self.normalization = nn.BatchNorm1d(16)  # named as ResNet names its norms
            self.proj = nn.Linear(16, 3)

    model = Classifier()
    ours, hf = set(get_decay_parameter_names(model)), set(_hf_decay_names(model))
    assert hf - ours == {"normalization.weight"}  # the head's norm: by type here, decayed by transformers
    assert ours - hf == set()
    assert {n for n in hf if n.startswith("backbone.")} == {n for n in ours if n.startswith("backbone.")}


@pytest.fixture(scope="module")
def hf_args(tmp_path_factory):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("hf")),
        report_to="none",
        optim="adamw_torch",
        weight_decay=0.01,
    )


def _hf_groups(model: nn.Module, args) -> list[dict]:
    return Trainer(model=model, args=args).create_optimizer().param_groups


@pytest.mark.parametrize("arch", ["bert-mlm", "gpt2-lm", "llama-lm", "t5", "swin"])
@pytest.mark.parametrize("freeze", [False, True], ids=["all-trainable", "some-frozen"])
def test_param_groups_equal_trainer_create_optimizer(arch, freeze, hf_args):
    model = _model(arch)
    if freeze:  # every third tensor, the embeddings (and so GPT-2's tied head) among them
        for i, (_, p) in enumerate(model.named_parameters()):
            if i % 3 == 0:
                p.requires_grad_(False)
    hf = _hf_groups(model, hf_args)
    ours = build_param_groups(model, hf_args)
    assert len(hf) == len(ours) == 2
    for hf_group, group in zip(hf, ours, strict=True):
        assert len(group["params"]) == len(hf_group["params"])
        assert all(a is b for a, b in zip(group["params"], hf_group["params"], strict=True))
        assert group["weight_decay"] == hf_group["weight_decay"]
    assert ours[0]["weight_decay"] == 0.01
    names = dict(model.named_parameters())
    for group in ours:
        assert [names[n] for n in group["param_names"]] == group["params"]
    if freeze:
        assert sum(len(g["params"]) for g in ours) < len(names)


def test_optimizer_state_saved_by_transformers_loads_into_ours(hf_args):
    model = _model("gpt2-lm")
    hf_opt = Trainer(model=model, args=hf_args).create_optimizer()
    model(torch.randint(0, 99, (2, 5)), labels=torch.randint(0, 99, (2, 5))).loss.backward()
    hf_opt.step()
    ours = torch.optim.AdamW(build_param_groups(model, hf_args), lr=hf_args.learning_rate)
    ours.load_state_dict(hf_opt.state_dict())
    first = ours.param_groups[0]["params"][0]
    assert torch.equal(ours.state[first]["exp_avg"], hf_opt.state[first]["exp_avg"])
    # torch's load_state_dict takes the saved groups' keys: transformers' groups carry no "name", but
    # torch keeps the loading optimizer's "param_names".
    assert ours.param_groups[0]["param_names"][0] == "transformer.wte.weight"
    assert ours.param_groups[0]["weight_decay"] == hf_args.weight_decay
