"""optsched.optim.stable_adamw: upstream StableAdamW, its kernel chosen from the parameters it updates."""

import contextlib
import copy
import sys

import pytest
import torch

from optsched import TrainingArguments, create_optimizer
from optsched.memory import infer_optimizer_name
from optsched.optim.stable_adamw import with_triton_resolved

optimi = pytest.importorskip("optimi")
optimi_utils = pytest.importorskip("optimi.utils")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 1))


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, first: int = 0) -> None:
    for seed in range(first, first + steps):
        torch.manual_seed(seed)
        optimizer.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        optimizer.step()


@pytest.fixture
def triton_installed(monkeypatch):
    """What a CUDA build of torch brings (PyPI's default on Linux): Triton importable, no GPU here."""
    monkeypatch.setattr(optimi_utils, "HAS_TRITON", True)
    if not optimi_utils._default_to_triton([]):  # the upstream call on the list step has not filled yet
        pytest.skip("this torch-optimi no longer picks Triton for an empty parameter list")


def test_cpu_parameters_take_the_cpu_kernel_where_triton_is_installed(triton_installed):
    model, twin = _model(), _model()
    ours = create_optimizer(model, TrainingArguments(optim="stable_adamw", learning_rate=1e-2))
    assert isinstance(ours, optimi.StableAdamW) and type(ours).__name__ == "StableAdamW"
    _train(model, ours)  # upstream alone sends these CPU tensors to Triton and fails ("0 active drivers")
    assert [group["triton"] for group in ours.param_groups] == [False] * len(ours.param_groups)

    # The same groups for upstream's class with triton=False: what a CPU-only torch runs.
    name_of = {id(p): n for n, p in model.named_parameters()}
    twin_params = dict(twin.named_parameters())
    groups = [
        {**{k: v for k, v in g.items() if k not in ("params", "triton", "setup", "step")},
         "params": [twin_params[name_of[id(p)]] for p in g["params"]]}
        for g in ours.param_groups
    ]
    _train(twin, optimi.StableAdamW(groups, lr=1e-2, triton=False))
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_an_explicit_choice_and_a_group_that_already_stepped_are_left_alone(triton_installed):
    cls = with_triton_resolved(optimi.StableAdamW)
    model = _model()
    with pytest.warns(DeprecationWarning, match="foreach"):  # upstream deprecates it; it still decides
        explicit = cls(model.parameters(), lr=1e-2, foreach=True)
    _train(model, explicit, steps=1)
    assert explicit.param_groups[0]["triton"] is None  # upstream's foreach kernel, not our choice

    model = _model()
    restored = cls(model.parameters(), lr=1e-2)
    restored.param_groups[0].update(setup=True, step=torch.tensor(0, dtype=torch.int32))
    _train(model, restored, steps=1)
    assert restored.param_groups[0]["triton"] is None  # a group that already stepped keeps what it had


def test_one_subclass_per_class_and_memory_knows_its_name():
    assert with_triton_resolved(optimi.StableAdamW) is with_triton_resolved(optimi.StableAdamW)
    optimizer = create_optimizer(_model(), TrainingArguments(optim="stable_adamw"))
    assert type(optimizer) is with_triton_resolved(optimi.StableAdamW)
    assert infer_optimizer_name(optimizer) == "stable_adamw"


def _saved_states() -> tuple[dict, dict, dict]:
    """The weights and StableAdamW state after 2 steps on the CPU, and that state as a run on a GPU with
    Triton saves it: ``triton=True`` in every group, and the scratch tensors Triton's kernel keeps per
    parameter (upstream's ``_init_state`` with ``triton=True``: ``mean_square``, and a one-byte
    ``kahan_comp`` beside full-precision parameters)."""
    model = _model()
    optimizer = with_triton_resolved(optimi.StableAdamW)(model.parameters(), lr=1e-2)
    _train(model, optimizer, steps=2)
    state = copy.deepcopy(optimizer.state_dict())
    on_gpu = copy.deepcopy(state)
    for group in on_gpu["param_groups"]:
        group["triton"] = True
    for param_state in on_gpu["state"].values():
        param_state.update(kahan_comp=torch.zeros(1, dtype=torch.uint8), mean_square=torch.zeros(1))
    return copy.deepcopy(model.state_dict()), state, on_gpu


def _resumed(weights: dict, state: dict, **kwargs) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    model.load_state_dict(weights)
    optimizer = with_triton_resolved(optimi.StableAdamW)(model.parameters(), lr=1e-2, **kwargs)
    optimizer.load_state_dict(state)
    return model, optimizer


def test_a_state_saved_where_triton_ran_resumes_on_the_cpu_as_a_cpu_state_does(caplog):
    """Upstream runs the loaded triton=True on CPU parameters: 'name _triton_stableadamw is not defined'
    without Triton, '0 active drivers' with it."""
    weights, state, on_gpu = _saved_states()
    with caplog.at_level("INFO", logger="optsched.optim.stable_adamw"):
        reference, untouched = _resumed(weights, state)
        assert not caplog.records  # a state that chose the CPU kernel is loaded as it is
        model, optimizer = _resumed(weights, on_gpu)
    assert [(g["triton"], g["foreach"]) for g in optimizer.param_groups] == [(False, None)]
    message = caplog.records[-1].getMessage()
    assert "loaded with triton=True" in message and "parameters are on cpu: now triton=False" in message, message
    _train(reference, untouched, steps=2, first=2)
    _train(model, optimizer, steps=2, first=2)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kwargs, kernel", [({"triton": False}, (False, None)), ({"foreach": True}, (None, True)),
                                            ({"triton": True}, (True, None))])
def test_an_explicit_choice_of_this_optimizer_outlives_a_loaded_triton_state(monkeypatch, kwargs, kernel):
    weights, _, on_gpu = _saved_states()
    monkeypatch.setattr(sys.modules["optimi.optimizer"], "HAS_TRITON", True)  # triton=True is refused without it
    with pytest.warns(DeprecationWarning) if "foreach" in kwargs else contextlib.nullcontext():
        model, optimizer = _resumed(weights, on_gpu, **kwargs)
    assert (optimizer.param_groups[0]["triton"], optimizer.param_groups[0]["foreach"]) == kernel
    if kwargs != {"triton": True}:  # the user's own triton=True on CPU fails at the step as it would unloaded
        _train(model, optimizer, steps=1, first=2)
