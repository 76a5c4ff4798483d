"""Parity with transformers 5.23: for every name whose package is installed, the same optimizer class
and keyword arguments as ``Trainer.get_optimizer_cls_and_kwargs(hf_args, model)`` on a tiny BERT.

Compared after normalising what cannot be identical objects: GaLore/APOLLO ``params`` become the
set of projected parameter names plus their settings; transformers' layer-wise dummy (with a dict of
per-parameter optimizers) and ours (with ``optimizer_cls``) become ("layerwise", inner class);
LOMO's ``model`` must be the model passed in. For ``adafactor`` transformers' class is its own
Adafactor and ours optsched's native one: kwargs are compared.

Deliberate differences, each asserted: ``sgd`` with an explicit ``adam_beta1`` gains momentum (the
seed's example); ``galore_adafactor_layerwise`` raises in transformers (it forgets
``relative_step=False``) and builds here.
"""

from __future__ import annotations

import importlib.util

import pytest

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, Trainer  # noqa: E402
from transformers import TrainingArguments as HFTrainingArguments  # noqa: E402

from optsched.optim import get_optimizer_cls_and_kwargs, get_optimizer_spec  # noqa: E402
from optsched.optim.catalog import TRANSFORMERS_NAMES  # noqa: E402

HF_FAILS = {"galore_adafactor_layerwise"}


def _installed(name: str) -> bool:
    spec = get_optimizer_spec(name)
    if not isinstance(spec.cls, (str, tuple)):
        return True
    path = spec.cls if isinstance(spec.cls, str) else spec.cls[0]
    return importlib.util.find_spec(path.split(".")[0]) is not None


INSTALLED = [n for n in TRANSFORMERS_NAMES if _installed(n)]
ABSENT = [n for n in TRANSFORMERS_NAMES if not _installed(n)]

CONFIGS = {
    "defaults": {},
    "custom": {"learning_rate": 3e-4, "adam_beta1": 0.85, "adam_beta2": 0.99, "adam_epsilon": 1e-7,
               "weight_decay": 0.01, "warmup_steps": 10},
}


def _model():
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=99)
    return BertForSequenceClassification(config)


def _hf_args(tmp_path, name, config):
    return HFTrainingArguments(output_dir=str(tmp_path), optim=name, optim_target_modules=["query", "value"],
                               report_to="none", **CONFIGS[config])


def _normalise(cls, kwargs, model):
    kwargs = dict(kwargs)
    label = cls.__name__
    if "optimizer_dict" in kwargs:  # transformers' layer-wise dummy
        inner = {type(opt).__name__ for opt in kwargs.pop("optimizer_dict").values()}
        assert len(inner) == 1
        label = ("layerwise", inner.pop())
    if "optimizer_cls" in kwargs:  # ours
        label = ("layerwise", kwargs.pop("optimizer_cls").__name__)
    if "params" in kwargs:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = kwargs.pop("params")
        projected = sorted(names[id(p)] for g in groups if "rank" in g for p in g["params"])
        every = sorted(names[id(p)] for g in groups for p in g["params"])
        settings = {
            tuple(sorted((k, v) for k, v in g.items() if k not in ("params", "param_names", "name", "weight_decay")))
            for g in groups if "rank" in g
        }
        kwargs["params"] = (projected, every, settings)
    if "model" in kwargs:
        assert kwargs.pop("model") is model
        kwargs["model"] = "<the model>"
    return label, kwargs


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", INSTALLED)
def test_same_class_and_kwargs_as_transformers(name, config, tmp_path):
    hf_model, our_model = _model(), _model()
    hf_args = _hf_args(tmp_path, name, config)
    if name in HF_FAILS:
        with pytest.raises(ValueError, match="relative_step"):
            Trainer.get_optimizer_cls_and_kwargs(hf_args, hf_model)
        cls, _ = get_optimizer_cls_and_kwargs(hf_args, our_model)
        assert cls.__name__ == "LayerWiseOptimizer"
        return
    hf_label, hf_kwargs = _normalise(*Trainer.get_optimizer_cls_and_kwargs(hf_args, hf_model), hf_model)
    our_label, our_kwargs = _normalise(*get_optimizer_cls_and_kwargs(hf_args, our_model), our_model)

    if name == "sgd" and config == "custom":
        # adam_beta1 differs from the default, so it was set explicitly: it is SGD's momentum.
        assert our_kwargs.pop("momentum") == 0.85
    if name == "adafactor":
        assert (hf_label, our_label) == ("Adafactor", "Adafactor")
    if "params" in hf_kwargs:
        # transformers puts every parameter in its groups; ours are the trainable ones (all, here).
        assert hf_kwargs["params"][1] == our_kwargs["params"][1]
    assert our_label == hf_label
    assert our_kwargs == hf_kwargs


@pytest.mark.parametrize("name", ABSENT)
def test_names_without_their_package_are_refused_by_both(name, tmp_path):
    hf_args = _hf_args(tmp_path, name, "defaults")
    with pytest.raises((ValueError, ImportError)):
        Trainer.get_optimizer_cls_and_kwargs(hf_args, _model())
    with pytest.raises(ImportError, match=get_optimizer_spec(name).package):
        get_optimizer_cls_and_kwargs(hf_args, _model())


def test_optim_args_parity_where_transformers_types_them(tmp_path):
    # Values transformers converts correctly must come out equal.
    cases = {
        "sgd": "momentum=0.9,dampening=0.1,nesterov=true",
        "rmsprop": "momentum=0.5,alpha=0.9,centered=true",
        "adagrad": "lr_decay=0.01,eps=1e-9",
        "grokadamw": "alpha_init=0.9,lamb=3.0",
        "schedule_free_adamw": "weight_lr_power=1.5,r=0.1",
        "galore_adamw": "rank=16,update_proj_gap=50,scale=0.5,proj_type=right",
        "ademamix": "beta1=0.8,beta3=0.999,alpha=4.0,t_alpha=10",
    }
    for name, optim_args in cases.items():
        if not _installed(name):
            continue
        args = HFTrainingArguments(output_dir=str(tmp_path), optim=name, optim_args=optim_args,
                                   optim_target_modules=["query"], report_to="none")
        hf_model, our_model = _model(), _model()
        hf = _normalise(*Trainer.get_optimizer_cls_and_kwargs(args, hf_model), hf_model)
        ours = _normalise(*get_optimizer_cls_and_kwargs(args, our_model), our_model)
        assert ours == hf, name
