"""The registry: specs, register/overwrite, lookups with "did you mean", listing, lazy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from optsched.optim import (
    OMIT,
    OptimArg,
    OptimizerSpec,
    get_optimizer_spec,
    list_optimizers,
    register_optimizer,
    unregister_optimizer,
)
from optsched.optim.catalog import BUILTIN_NAMES


@pytest.fixture
def scratch_name():
    name = "test_scratch_optimizer"
    yield name
    if name in list_optimizers():
        unregister_optimizer(name)


def test_register_short_form_and_lookup(scratch_name):
    spec = register_optimizer(scratch_name, torch.optim.SGD, optim_args=(OptimArg("momentum"),))
    assert get_optimizer_spec(scratch_name) is spec
    assert scratch_name in list_optimizers("test_*")
    assert spec.load_class() is torch.optim.SGD


def test_reregistering_needs_overwrite(scratch_name):
    register_optimizer(scratch_name, torch.optim.SGD)
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        register_optimizer(scratch_name, torch.optim.Adam)
    register_optimizer(scratch_name, torch.optim.Adam, overwrite=True)
    assert get_optimizer_spec(scratch_name).cls is torch.optim.Adam


def test_builtin_names_are_protected():
    with pytest.raises(ValueError, match="'sgd' is already registered"):
        register_optimizer("sgd", torch.optim.Adam)


def test_variant_is_a_new_name_plus_defaults(scratch_name):
    base = get_optimizer_spec("adamw_torch")
    variant = register_optimizer(base.replace(name=scratch_name, fixed={"foreach": False}))
    assert variant.cls is base.cls and dict(variant.fixed) == {"foreach": False}
    assert dict(base.fixed) == {}  # the original is untouched


def test_spec_is_frozen():
    spec = get_optimizer_spec("adamw_torch_fused")
    with pytest.raises(AttributeError):
        spec.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.fixed["fused"] = False  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "error", "fragment"),
    [
        ("adamw_torh", ValueError, "Did you mean one of 'adamw_torch'"),
        ("paged_adamw_16bit", ValueError, "paged_adamw_32bit"),
        ("ADAMW", ValueError, "not a known optimizer name"),
        ("", ValueError, "not a known optimizer name"),
        (3, TypeError, "optim must be a string"),
        (None, TypeError, "optim must be a string"),
    ],
)
def test_unknown_names_are_clear_errors(name, error, fragment):
    with pytest.raises(error, match=fragment):
        get_optimizer_spec(name)


def test_enum_values_are_accepted():
    transformers = pytest.importorskip("transformers")
    assert get_optimizer_spec(transformers.training_args.OptimizerNames.SGD).name == "sgd"


@pytest.mark.parametrize(
    ("fields", "error", "fragment"),
    [
        ({"common": ("lr", "betaz")}, ValueError, "betaz"),
        ({"optim_args": (OptimArg("a"), OptimArg("a"))}, ValueError, "repeats a key"),
        ({"cls": None}, TypeError, "must be a class"),
        ({"needs_model": "yes"}, TypeError, "True or False"),
        ({"common": "lr"}, TypeError, r"common must be a tuple of str, e.g. \('lr', 'betas'\), got str 'lr'"),
        (
            {"optim_args": ("momentum",)},
            TypeError,
            r"optim_args must be a tuple of OptimArg.*got tuple \('momentum',\)",
        ),
        ({"optim_args": OptimArg("momentum")}, TypeError, "optim_args must be a tuple of OptimArg"),
    ],
)
def test_bad_specs_are_refused(fields, error, fragment):
    base = {"name": "x", "cls": torch.optim.SGD, **fields}
    with pytest.raises(error, match=fragment):
        OptimizerSpec(**base)


def test_a_user_spec_without_package_names_the_missing_module(scratch_name):
    spec = register_optimizer(scratch_name, "no_such_package_xyz.optim.Fancy")
    with pytest.raises(ImportError) as info:
        spec.load_class()
    message = str(info.value)
    assert "'no_such_package_xyz'" in message and "None" not in message


def test_bad_optim_arg_type_is_refused():
    with pytest.raises(ValueError, match="not a known optim_args type"):
        OptimArg("x", "complex")


def test_list_optimizers_pattern():
    assert list_optimizers("paged_*") == sorted(n for n in BUILTIN_NAMES if n.startswith("paged_"))
    assert list_optimizers("no_such_*") == []
    assert list_optimizers() == sorted(list_optimizers())
    with pytest.raises(TypeError):
        list_optimizers(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_every_spec_is_consistent(name):
    spec = get_optimizer_spec(name)
    assert spec.name == name
    if spec.package is None:  # torch's own or optsched's: nothing to install
        assert isinstance(spec.cls, type) or str(spec.cls).startswith("optsched.")
    else:  # an optional package: registered by dotted path, imported lazily
        assert isinstance(spec.cls, (str, tuple))
    if spec.extra is not None:
        assert spec.package is not None
    for arg in spec.optim_args:
        assert arg.default is OMIT or arg.name not in spec.fixed


def test_registry_import_loads_no_optional_package():
    code = (
        "import sys, optsched.optim as o; o.list_optimizers(); o.get_optimizer_spec('adamw_8bit');"
        "o.parse_optim_args('galore_adamw', 'rank=4');"
        "bad = [m for m in ('bitsandbytes', 'torchao', 'schedulefree', 'galore_torch', 'apollo_torch',"
        " 'lomo_optim', 'grokadamw', 'optimi', 'transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_package_that_breaks_on_import_is_named_with_the_torch_version(monkeypatch):
    """A package built for a newer torch (torchao 0.18 on torch 2.4: ``torch.int1`` is missing) raises
    at import; the error names the option, the package, torch's version and the cause."""
    import importlib

    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name.split(".")[0] == "torchao":
            raise AttributeError("module 'torch' has no attribute 'int1'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken)
    import re

    expected = rf"optim='adamw_torch_4bit' needs torchao.*torch {re.escape(torch.__version__)} .*int1"
    with pytest.raises(ImportError, match=expected):
        get_optimizer_spec("adamw_torch_4bit").load_class()
