"""optsched.optim.grokadamw: upstream GrokAdamW's math, with a state dict that survives a reload."""

import io

import pytest
import torch

from optsched import TrainingArguments, create_optimizer
from optsched.optim.grokadamw import with_standard_state

grokadamw = pytest.importorskip("grokadamw")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 1))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer.zero_grad()
    model(torch.randn(8, 6)).pow(2).mean().backward()
    optimizer.step()


def _saved(optimizer: torch.optim.Optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # what a checkpoint load does: no tensors as keys


def test_the_factory_builds_the_subclass_and_it_steps_as_upstream():
    model, twin = _model(), _model()
    ours = create_optimizer(model, TrainingArguments(optim="grokadamw", learning_rate=1e-2))
    assert isinstance(ours, grokadamw.GrokAdamW) and type(ours) is not grokadamw.GrokAdamW
    assert type(ours).__name__ == "GrokAdamW" and with_standard_state(grokadamw.GrokAdamW) is type(ours)
    upstream = grokadamw.GrokAdamW([{**{k: v for k, v in g.items() if k != "params"},
                                     "params": [dict(zip(model.parameters(), twin.parameters()))[p]
                                                for p in g["params"]]} for g in ours.param_groups])
    for seed in range(4):
        _step(model, ours, seed)
        _step(twin, upstream, seed)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_state_is_saved_by_index_and_reloaded_into_the_groups():
    model = _model()
    optimizer = create_optimizer(model, TrainingArguments(optim="grokadamw", learning_rate=1e-2))
    for seed in range(3):
        _step(model, optimizer, seed)
    saved = _saved(optimizer)
    assert all("state" not in group for group in saved["param_groups"])
    assert sorted(saved["state"]) == list(range(len(list(model.parameters()))))
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "grok_ema"} and saved["state"][0]["step"] == 3

    twin = _model(seed=1)
    twin.load_state_dict(model.state_dict())
    reloaded = create_optimizer(twin, TrainingArguments(optim="grokadamw", learning_rate=1e-2))
    reloaded.load_state_dict(saved)
    assert not reloaded.state  # moved into the groups, where the upstream update reads it
    for p, q in zip(model.parameters(), twin.parameters()):
        group_state = next(g["state"][q] for g in reloaded.param_groups if any(x is q for x in g["params"]))
        original = next(g["state"][p] for g in optimizer.param_groups if any(x is p for x in g["params"]))
        torch.testing.assert_close(group_state["exp_avg"], original["exp_avg"])
        assert group_state["step"] == original["step"]
    for seed in range(3, 6):
        _step(model, optimizer, seed)
        _step(twin, reloaded, seed)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_upstream_state_dict_still_loads():
    """A state dict written by the upstream class (state inside the groups, keyed by old tensors) loads
    without error; its state cannot be mapped to the new parameters, as upstream."""
    model, other = _model(), _model()
    optimizer = create_optimizer(other, TrainingArguments(optim="grokadamw", learning_rate=1e-2))
    by_position = dict(zip(other.parameters(), model.parameters()))
    groups = [{"params": [by_position[p] for p in g["params"]]} for g in optimizer.param_groups]
    upstream = grokadamw.GrokAdamW(groups, lr=1e-2)
    _step(model, upstream, 0)
    optimizer.load_state_dict(upstream.state_dict())
    assert all(group["state"] == {} for group in optimizer.param_groups)
    _step(other, optimizer, 1)  # steps: starts the moments afresh
    assert all(len(group["state"]) == len(group["params"]) for group in optimizer.param_groups)
