"""parse_optim_args: typed values, HF's "k=v,k=v" form, dicts, JSON, and error-input tables."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optsched.optim import parse_optim_args
from optsched.optim.optim_args import convert_value, split_pairs

# (name, optim_args, expected) -- reference values.
GOOD = [
    ("sgd", None, {}),
    ("sgd", "", {}),
    ("sgd", "momentum=0.9", {"momentum": 0.9}),
    ("sgd", "momentum=0.9, nesterov=True", {"momentum": 0.9, "nesterov": True}),
    ("sgd", "nesterov=False", {"nesterov": False}),  # HF's bool("False") would be True
    ("sgd", "nesterov=0", {"nesterov": False}),
    ("sgd", "nesterov=1", {"nesterov": True}),
    ("sgd", "nesterov=yes", {"nesterov": True}),
    ("sgd", {"momentum": 0.5, "nesterov": "true"}, {"momentum": 0.5, "nesterov": True}),
    ("sgd", {"momentum": 1}, {"momentum": 1.0}),
    ("sgd", '{"momentum": 0.8, "dampening": 0}', {"momentum": 0.8, "dampening": 0.0}),
    ("sgd", "momentum=0.9,", {"momentum": 0.9}),
    ("adagrad", "lr_decay=1e-4,eps=1e-10", {"lr_decay": 1e-4, "eps": 1e-10}),
    ("rmsprop", "centered=false,alpha=0.9", {"centered": False, "alpha": 0.9}),
    ("galore_adamw", "rank=64,update_proj_gap=100,scale=0.5,proj_type=left",
     {"rank": 64, "update_proj_gap": 100, "scale": 0.5, "proj_type": "left"}),
    ("adamw_torch_4bit", "block_size=128,bf16_stochastic_round=True",
     {"block_size": 128, "bf16_stochastic_round": True}),
    ("stable_adamw", "decouple_lr=False,max_lr=0.01,kahan_sum=0",
     {"decouple_lr": False, "max_lr": 0.01, "kahan_sum": False}),
    ("adamw_anyprecision", "momentum_dtype=bfloat16", {"momentum_dtype": torch.bfloat16}),
    ("adamw_anyprecision", {"variance_dtype": torch.float16}, {"variance_dtype": torch.float16}),
    ("rprop", "etas=(0.4,1.3),step_sizes=[1e-6,10]", {"etas": (0.4, 1.3), "step_sizes": (1e-6, 10.0)}),
    ("rprop", "etas=0.4:1.3", {"etas": (0.4, 1.3)}),
    ("ademamix", "beta3=0.999,alpha=8,t_alpha=100", {"beta3": 0.999, "alpha": 8.0, "t_alpha": 100}),
    ("schedule_free_adamw", "weight_lr_power=1,r=0.5", {"weight_lr_power": 1.0, "r": 0.5}),
    ("grokadamw", "lamb=3", {"lamb": 3.0}),
]


@pytest.mark.parametrize(("name", "optim_args", "expected"), GOOD)
def test_parses_to_typed_values(name, optim_args, expected):
    parsed = parse_optim_args(name, optim_args)
    assert parsed == expected
    for key, value in expected.items():
        assert type(parsed[key]) is type(value), key


# (name, optim_args, exception, message fragments) -- error-input table.
BAD = [
    ("sgd", "momentom=0.9", ValueError, ["'momentom'", "Did you mean 'momentum'", "Accepted keys", "nesterov"]),
    ("sgd", "momentum", ValueError, ["malformed pair 'momentum'", "key=value"]),
    ("sgd", "momentum=0.9=1", ValueError, ["malformed"]),
    ("sgd", "=0.9", ValueError, ["malformed"]),
    ("sgd", "momentum=0.9,momentum=0.8", ValueError, ["twice"]),
    ("sgd", "momentum=fast", ValueError, ["momentum='fast'", "a number", "Accepted keys"]),
    ("sgd", "momentum=nan", ValueError, ["finite"]),
    ("sgd", "nesterov=maybe", ValueError, ["nesterov='maybe'", "true/false"]),
    ("sgd", {"nesterov": 2}, ValueError, ["nesterov=2"]),
    ("sgd", {"momentum": True}, ValueError, ["bool"]),
    ("galore_adamw", "rank=12.5", ValueError, ["rank='12.5'", "an integer"]),
    ("galore_adamw", "proj_type=", ValueError, ["non-empty string"]),
    ("adamw_anyprecision", "momentum_dtype=float99", ValueError, ["torch dtype"]),
    ("adamw_torch", "lr=1", ValueError, ["'lr' is not accepted", "amsgrad"]),
    ("adamw_bnb_8bit", "foo=1", ValueError, ["'foo'", "min_8bit_size"]),
    ("lomo", "anything=1", ValueError, ["Accepted keys: none"]),
    ("sgd", '{"momentum": 0.9', ValueError, ["not valid JSON"]),
    ("sgd", "[1, 2]", ValueError, ["malformed"]),
    ("sgd", 3, TypeError, ["optim_args must be"]),
    ("nope_optimizer", None, ValueError, ["not a known optimizer name"]),
]


@pytest.mark.parametrize(("name", "optim_args", "error", "fragments"), BAD)
def test_bad_optim_args_are_clear_errors(name, optim_args, error, fragments):
    with pytest.raises(error) as info:
        parse_optim_args(name, optim_args)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_split_pairs_keeps_bracketed_commas_together():
    assert split_pairs("a=1, b=(2,3), c=[4,5]") == {"a": "1", "b": "(2,3)", "c": "[4,5]"}


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30))
def test_float_values_round_trip_through_text(value):
    assert parse_optim_args("sgd", f"momentum={value!r}")["momentum"] == value


@settings(max_examples=30, deadline=None)
@given(st.booleans(), st.sampled_from([str, lambda b: str(b).lower(), lambda b: str(int(b)), lambda b: b]))
def test_bool_values_mean_what_they_say(value, spell):
    assert parse_optim_args("sgd", {"nesterov": spell(value)})["nesterov"] is value


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_int_values_round_trip(value):
    assert convert_value("int", str(value)) == value
    assert parse_optim_args("galore_adamw", {"rank": value})["rank"] == value
