"""Package-level contracts: cheap import, no optional package imported, every public name resolves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import optsched

OPTIONAL_PACKAGES = [
    "transformers",
    "bitsandbytes",
    "torchao",
    "schedulefree",
    "galore_torch",
    "apollo_torch",
    "lomo_optim",
    "grokadamw",
    "optimi",
    "matplotlib",
    "accelerate",
]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_optsched_imports_no_optional_package():
    loaded = _modules_after("import optsched")
    assert not {m.split(".")[0] for m in loaded} & set(OPTIONAL_PACKAGES)


def test_using_the_core_api_imports_no_optional_package():
    code = (
        "import torch, optsched\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))\n"
        "args = optsched.TrainingArguments(output_dir='unused', optim='adamw_torch')\n"
        "opt = optsched.create_optimizer(m, args)\n"
        "sched = optsched.create_scheduler(opt, args, num_training_steps=10)\n"
        "optsched.Trainer\n"
    )
    loaded = _modules_after(code)
    assert not {m.split(".")[0] for m in loaded} & set(OPTIONAL_PACKAGES)


@pytest.mark.parametrize("name", sorted(set(optsched.__all__) - {"__version__"}))
def test_every_public_name_resolves(name):
    assert getattr(optsched, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        optsched.nope  # noqa: B018
