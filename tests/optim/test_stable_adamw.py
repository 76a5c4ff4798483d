"""optsched.optim.stable_adamw: upstream StableAdamW, its kernel chosen from the parameters it updates."""

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


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    for seed in range(steps):
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
