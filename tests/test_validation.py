"""The shared error helpers: message shape, types and edge values."""

from __future__ import annotations

import math

import pytest

from optsched._validation import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_step_count,
    did_you_mean,
    integral_to_int,
    missing_package,
    parse_json_mapping,
)


def test_did_you_mean_names_the_closest():
    assert did_you_mean("cosin", ["cosine", "linear"]) == " Did you mean 'cosine'?"
    assert did_you_mean("zzz", ["cosine", "linear"]) == ""


def test_check_choice_lists_accepted_and_suggests():
    with pytest.raises(ValueError, match=r"optim='adamw_torh' is not a known name\. Did you mean 'adamw_torch'"):
        check_choice("optim", "adamw_torh", ["adamw_torch", "sgd"])
    with pytest.raises(TypeError, match="optim must be a string, got int 3"):
        check_choice("optim", 3, ["sgd"])


@pytest.mark.parametrize(
    ("value", "kwargs", "error"),
    [
        (math.nan, {}, ValueError),
        (math.inf, {}, ValueError),
        (-1.0, {"low": 0.0}, ValueError),
        (0.0, {"low": 0.0, "low_open": True}, ValueError),
        (1.0, {"high": 1.0, "high_open": True}, ValueError),
        (True, {}, TypeError),
        ("1e-3", {}, TypeError),
    ],
)
def test_check_number_rejects(value, kwargs, error):
    with pytest.raises(error, match="lr"):
        check_number("lr", value, **kwargs)


def test_check_number_accepts_edges():
    assert check_number("x", 0.0, low=0.0) == 0.0
    assert check_number("x", None, allow_none=True) is None


def test_check_int_and_step_count():
    assert check_int("n", 3, low=1) == 3
    with pytest.raises(TypeError, match="n must be an integer, got float 3.0"):
        check_int("n", 3.0)
    with pytest.raises(ValueError, match=r"n=0 is out of range; accepted: an integer in \[1, inf\]"):
        check_int("n", 0, low=1)
    # HF's recipe for the total step count is a float: 24.0 is 24 steps, 24.5 is an error.
    assert check_step_count("num_training_steps", 24.0, low=1) == 24
    with pytest.raises(TypeError, match="num_training_steps must be an integer, got float 24.5"):
        check_step_count("num_training_steps", 24.5, low=1)
    assert integral_to_int(2.0) == 2 and integral_to_int(2.5) == 2.5 and integral_to_int(None) is None


def test_check_bool():
    assert check_bool("fp16", False) is False
    with pytest.raises(TypeError, match="fp16 must be True or False, got str 'yes'"):
        check_bool("fp16", "yes")


def test_parse_json_mapping():
    assert parse_json_mapping("kw", None) == {}
    assert parse_json_mapping("kw", '{"power": 2.0}') == {"power": 2.0}
    assert parse_json_mapping("kw", {"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="kw=.*is not valid JSON"):
        parse_json_mapping("kw", "{power: 2}")
    with pytest.raises(ValueError, match="is JSON but not an object"):
        parse_json_mapping("kw", "[1, 2]")
    with pytest.raises(TypeError, match="kw must be a dict or a JSON string, got int 3"):
        parse_json_mapping("kw", 3)


def test_missing_package_names_the_install_command():
    err = missing_package("bitsandbytes", "bnb", "optim='adamw_8bit'")
    assert isinstance(err, ImportError)
    assert "pip install 'optsched[bnb]'" in str(err) and "bitsandbytes" in str(err)
