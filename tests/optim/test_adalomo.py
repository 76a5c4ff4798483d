"""AdaLomo's state survives a save and a load (``optsched.optim.adalomo``).

lomo-optim allocates AdaLomo's buffers with ``.cuda()``; here ``Tensor.cuda`` is made the identity so
the same code runs on the CPU (``tests/optim/test_optim_cuda.py`` runs it on a GPU).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _optim_helpers import make_quadratic

from optsched.arguments import TrainingArguments
from optsched.optim import get_optimizer_cls_and_kwargs
from optsched.optim.adalomo import MOMENT_BUFFERS

pytest.importorskip("lomo_optim")


@pytest.fixture(autouse=True)
def _cuda_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


def _adalomo(model):
    cls, kwargs = get_optimizer_cls_and_kwargs(TrainingArguments(optim="adalomo", learning_rate=1e-2), model)
    return cls(**{**kwargs, "model": model})


def _step(model, optimizer):
    optimizer.fused_backward(model.loss(), optimizer.param_groups[0]["lr"])


def _through_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # what a checkpoint's optimizer.pt takes


def test_state_dict_holds_every_moment_and_the_step_count():
    model = make_quadratic()
    optimizer = _adalomo(model)
    for _ in range(4):
        _step(model, optimizer)
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["step_num"] == 4
    names = [n for n, _ in model.named_parameters()]
    for index, (name, p) in enumerate(model.named_parameters()):
        keys = ("exp_avg_sq_row", "exp_avg_sq_col") if p.ndim > 1 else ("exp_avg_sq",)
        assert sorted(saved["state"][index]) == sorted(keys), name
        for key in keys:
            assert torch.equal(saved["state"][index][key], getattr(optimizer, key)[names[index]])
            assert getattr(optimizer, key)[name].abs().sum() > 0  # moments moved away from their zeros


def test_a_reload_continues_bitwise_as_if_never_saved():
    model = make_quadratic()
    optimizer = _adalomo(model)
    for _ in range(5):
        _step(model, optimizer)
    twin = make_quadratic(seed=1)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = _adalomo(twin)
    twin_optimizer.load_state_dict(_through_bytes(optimizer.state_dict()))
    assert twin_optimizer.step_num == 5
    for _ in range(3):
        _step(model, optimizer)
        _step(twin, twin_optimizer)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_moments_stay_float32_under_a_bf16_model():
    model = make_quadratic().to(torch.bfloat16)
    optimizer = _adalomo(model)
    for _ in range(2):
        _step(model, optimizer)
    twin = copy.deepcopy(model)
    twin_optimizer = _adalomo(twin)
    twin_optimizer.load_state_dict(_through_bytes(optimizer.state_dict()))
    for key in MOMENT_BUFFERS:
        for name, value in getattr(twin_optimizer, key).items():
            assert value.dtype == torch.float32 and torch.equal(value, getattr(optimizer, key)[name]), (key, name)


def test_an_upstream_state_dict_without_moments_still_loads():
    model = make_quadratic()
    optimizer = _adalomo(model)
    _step(model, optimizer)
    upstream = torch.optim.Optimizer.state_dict(optimizer)  # what lomo-optim's own class saves
    fresh = _adalomo(make_quadratic())
    fresh.load_state_dict(upstream)
    assert fresh.step_num == 0
    assert all(v.abs().sum() == 0 for key in MOMENT_BUFFERS for v in getattr(fresh, key).values())


def test_a_state_dict_of_another_model_is_refused_by_name():
    model = make_quadratic()
    optimizer = _adalomo(model)
    _step(model, optimizer)
    saved = optimizer.state_dict()
    saved["state"][0]["exp_avg_sq_row"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"optimizer state 0 exp_avg_sq_row: shape \(3,\).*'inp.weight'"):
        _adalomo(make_quadratic()).load_state_dict(saved)
