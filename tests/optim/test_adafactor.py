"""Tests for optsched.optim.adafactor: parity with transformers, the reference update, edges, errors."""

from __future__ import annotations

import copy
import doctest
import io
import math
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _optim_helpers import run_steps as _run
from _optim_helpers import scaled_grads as _grads
from _optim_helpers import seeded_params as _params
from optsched.optim import adafactor as adafactor_module
from optsched.optim.adafactor import (
    Adafactor,
    AdafactorSchedule,
    adafactor_reference_update,
    get_adafactor_schedule,
    relative_step_size,
)

hf_optimization = pytest.importorskip("transformers.optimization")
HFAdafactor = hf_optimization.Adafactor
HFAdafactorSchedule = hf_optimization.AdafactorSchedule

# Hyperparameter sets the parity tests run over (transformers' options, one at a time and mixed).
CONFIGS = {
    "defaults": {},
    "no_scale": {"scale_parameter": False},
    "warmup_init": {"warmup_init": True},
    "external_lr": {"relative_step": False, "lr": 1e-2},
    "external_lr_no_scale": {"relative_step": False, "scale_parameter": False, "lr": 1e-2},
    "beta1": {"beta1": 0.9},
    "weight_decay": {"weight_decay": 0.1},
    "beta1_wd_external": {"beta1": 0.8, "weight_decay": 0.05, "relative_step": False, "lr": 3e-3},
    "clip_decay_eps": {"clip_threshold": 0.5, "decay_rate": -0.5, "eps": (1e-20, 1e-2)},
}

# Parameter shapes: factored (matrices, a 3-D tensor, a one-row matrix) and unfactored (vectors, a scalar).
SHAPE_SETS = {
    "matrices": [(12, 10), (1, 9), (10, 3)],
    "3d": [(3, 6, 5), (2, 1, 4)],
    "vectors": [(7,), (1,), ()],
}


def _max_diff(xs, ys):
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(xs, ys))


# --- parity with transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("shape_set", sorted(SHAPE_SETS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_transformers_over_100_steps(config, shape_set):
    kwargs, shapes = CONFIGS[config], SHAPE_SETS[shape_set]
    ours_params, hf_params = _params(shapes), _params(shapes)
    ours, hf = Adafactor(ours_params, **kwargs), HFAdafactor(hf_params, **kwargs)
    grads = _grads(shapes, 100)
    _run(ours, ours_params, grads)
    _run(hf, hf_params, grads)
    assert _max_diff(ours_params, hf_params) < 1e-6
    for p_ours, p_hf in zip(ours_params, hf_params):
        s_ours, s_hf = ours.state[p_ours], hf.state[p_hf]
        assert s_ours["step"] == s_hf["step"] == 100
        moment_keys = {k for k in s_hf if k not in ("step", "RMS")}
        assert set(s_ours) - {"step", "RMS"} == moment_keys
        for key in moment_keys:  # atol: exp_avg entries can cancel to near zero
            scale = s_hf[key].abs().max().item()
            torch.testing.assert_close(s_ours[key], s_hf[key], rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_reference_update_matches_transformers(config):
    kwargs = CONFIGS[config]
    shapes = [(6, 5), (2, 3, 4), (5,)]
    hf_params = _params(shapes)
    ref = [p.detach().clone() for p in hf_params]
    states = [{} for _ in shapes]
    hf = HFAdafactor(hf_params, **kwargs)
    grads = _grads(shapes, 30)
    _run(hf, hf_params, grads)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            ref[i], states[i] = adafactor_reference_update(ref[i], g, states[i], **kwargs)
    assert _max_diff(ref, hf_params) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_transformers(dtype):
    shapes = [(8, 6), (6,)]
    ours_params, hf_params = _params(shapes, dtype=dtype), _params(shapes, dtype=dtype)
    kwargs = {"relative_step": False, "lr": 1e-2, "beta1": 0.9}
    ours, hf = Adafactor(ours_params, **kwargs), HFAdafactor(hf_params, **kwargs)
    grads = _grads(shapes, 10)
    _run(ours, ours_params, grads)
    _run(hf, hf_params, grads)
    for p_ours, p_hf in zip(ours_params, hf_params):
        assert p_ours.dtype == dtype
        torch.testing.assert_close(p_ours, p_hf)  # dtype-aware tolerance: a rounding flip at most
        for key, value in ours.state[p_ours].items():
            if isinstance(value, torch.Tensor) and key != "RMS":
                assert value.dtype == torch.float32, key  # moments in fp32, as transformers


# --- the fast path against the reference function ------------------------------------------------------

shapes_strategy = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(shapes_strategy, min_size=1, max_size=4),
    relative_step=st.booleans(),
    scale_parameter=st.booleans(),
    warmup_init=st.booleans(),
    beta1=st.one_of(st.none(), st.floats(0.0, 0.99)),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    clip_threshold=st.floats(0.05, 10.0),
    decay_rate=st.floats(-1.0, 0.0),
    grad_scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]),
    steps=st.integers(1, 4),
)
def test_fast_path_matches_reference(
    shapes, relative_step, scale_parameter, warmup_init, beta1, weight_decay, clip_threshold, decay_rate,
    grad_scale, steps,
):
    kwargs = {
        "lr": None if relative_step else 3e-2,
        "relative_step": relative_step,
        "scale_parameter": scale_parameter,
        "warmup_init": warmup_init and relative_step,
        "beta1": beta1,
        "weight_decay": weight_decay,
        "clip_threshold": clip_threshold,
        "decay_rate": decay_rate,
    }
    params = _params(shapes)
    ref = [p.detach().clone() for p in params]
    states = [{} for _ in shapes]
    opt = Adafactor(params, **kwargs)
    gen = torch.Generator().manual_seed(len(shapes))
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) * grad_scale for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):
            ref[i], states[i] = adafactor_reference_update(ref[i], g, states[i], **kwargs)
    for p, r, state in zip(params, ref, states):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"):
            assert (key in opt.state[p]) == (key in state), key
            if key in state:
                # exp_avg averages updates, which are normalised (lr-sized, ~3e-2 here whatever
                # grad_scale is): where successive updates cancel, an element near 0 differs by float32
                # rounding of lr-sized terms (1.9e-9 seen), so it gets an absolute floor far below lr.
                # The second moments scale with grad**2 and keep a purely relative check.
                atol = 1e-7 if key == "exp_avg" else 1e-30
                torch.testing.assert_close(opt.state[p][key], state[key], rtol=1e-4, atol=atol)


def test_fast_path_in_float64_matches_reference():
    shapes = [(5, 4), (4,)]
    params = _params(shapes, dtype=torch.float64)
    ref = [p.detach().clone() for p in params]
    states = [{} for _ in shapes]
    opt = Adafactor(params, beta1=0.5)
    for step_grads in _grads(shapes, 5):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = g.double()
            ref[i], states[i] = adafactor_reference_update(ref[i], g.double(), states[i], beta1=0.5)
        opt.step()
    for p, r in zip(params, ref):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)


# Sizes where the fast path's GEMVs and reductions accumulate in blocks (unlike the tiny shapes above):
# rounding there must stay within the parity tolerance.
LARGE_SHAPES = [(384, 256), (256, 384), (2, 160, 96), (256,)]


@pytest.fixture
def torch_threads(request):
    """Run the test with ``torch.set_num_threads(request.param)``, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# 2 threads: the column sums and the update's norm go through the row-block split of
# `_weighted_column_sums` (384 and 256 rows split evenly); 1 thread: one matmul.
@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("config", ["defaults", "external_lr_no_scale", "beta1_wd_external"])
def test_large_matrices_match_transformers_and_the_reference(config, torch_threads):
    kwargs = CONFIGS[config]
    ours_params, hf_params = _params(LARGE_SHAPES), _params(LARGE_SHAPES)
    ref = [p.detach().clone() for p in ours_params]
    states = [{} for _ in LARGE_SHAPES]
    ours, hf = Adafactor(ours_params, **kwargs), HFAdafactor(hf_params, **kwargs)
    grads = _grads(LARGE_SHAPES, 12)
    _run(ours, ours_params, grads)
    _run(hf, hf_params, grads)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            ref[i], states[i] = adafactor_reference_update(ref[i], g, states[i], **kwargs)
    assert _max_diff(ours_params, hf_params) < 1e-6
    assert _max_diff(ours_params, ref) < 1e-6
    for p_ours, p_hf in zip(ours_params, hf_params):
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in ours.state[p_ours]:
                torch.testing.assert_close(ours.state[p_ours][key], hf.state[p_hf][key], rtol=1e-5, atol=0.0)


BMM = torch.bmm


@pytest.mark.parametrize("torch_threads", [1, 2, 3, 4], indirect=True)
@pytest.mark.parametrize("shape", [(384, 256), (385, 256), (128, 7), (2, 160, 96)])
def test_weighted_column_sums_is_the_matmul(shape, torch_threads):
    gen = torch.Generator().manual_seed(0)
    matrix = torch.rand(shape, generator=gen)
    weights = torch.rand(*shape[:-2], 2, shape[-2], generator=gen)
    bmm_calls = []
    with mock.patch.object(torch, "bmm", side_effect=lambda *a: bmm_calls.append(1) or BMM(*a)):
        result = adafactor_module._weighted_column_sums(weights, matrix)
    torch.testing.assert_close(result, torch.matmul(weights.double(), matrix.double()).float(), rtol=1e-5, atol=0)
    # The row-block split runs where the rows divide evenly, at least 64 per thread, on 2-D matrices.
    splits = len(shape) == 2 and torch_threads > 1 and shape[0] % torch_threads == 0 and shape[0] >= 64 * torch_threads
    assert bool(bmm_calls) == splits


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_step_leaves_the_gradient_unchanged(config):
    # The fast path reads g in its last pass (addcmul_) and must never write into it.
    params = _params([(6, 5), (2, 3, 4), (5,)])
    grads = _grads([p.shape for p in params], 1)[0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    Adafactor(params, **CONFIGS[config]).step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


def test_non_contiguous_gradient_gives_the_contiguous_result():
    base = torch.randn(7, 5)
    contiguous, strided = torch.nn.Parameter(base.t().contiguous()), torch.nn.Parameter(base.t().contiguous())
    grad = torch.randn(5, 7)
    contiguous.grad = grad.t().contiguous().t().contiguous()
    strided.grad = grad.t().contiguous().t()  # same values, column-major
    assert not strided.grad.is_contiguous()
    for p in (contiguous, strided):
        Adafactor([p], relative_step=False, scale_parameter=False, lr=1e-2).step()
    torch.testing.assert_close(strided.detach(), contiguous.detach(), rtol=1e-6, atol=1e-7)


def test_workspace_grows_to_the_largest_request_and_is_reused():
    workspace = adafactor_module._Workspace()
    like = torch.zeros(1)
    small = workspace.buffer(like, 6)
    assert small.numel() == 6 and workspace.buffer(like, 4).data_ptr() == small.data_ptr()
    assert workspace.buffer(like, 10).numel() == 10
    assert workspace.buffer(like.double(), 3).dtype == torch.float64  # one buffer per dtype
    assert torch.equal(workspace.ones(like, 5), torch.ones(5))
    assert workspace.ones(like, 3).numel() == 5  # a longer vector is kept; callers slice it


def test_reference_update_is_pure():
    param, grad = torch.randn(4, 3), torch.randn(4, 3)
    state = {"step": 2, "RMS": torch.tensor(1.0), "exp_avg_sq_row": torch.ones(4)}
    state["exp_avg_sq_col"] = torch.ones(3)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    param_before, grad_before = param.clone(), grad.clone()
    new_param, new_state = adafactor_reference_update(param, grad, state)
    assert torch.equal(param, param_before) and torch.equal(grad, grad_before)
    for key, value in before.items():
        assert torch.equal(torch.as_tensor(state[key]), torch.as_tensor(value))
    assert new_state["step"] == 3 and not torch.equal(new_param, param)


# --- reference values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "warmup_init", "expected"),
    [
        (1, False, 1e-2),
        (100, False, 1e-2),
        (10_000, False, 1e-2),
        (40_000, False, 5e-3),
        (1_000_000, False, 1e-3),
        (1, True, 1e-6),
        (100, True, 1e-4),
        (10_000, True, 1e-2),
        (40_000, True, 5e-3),
    ],
)
def test_relative_step_size_table(step, warmup_init, expected):
    got = relative_step_size(step, lr=None, relative_step=True, warmup_init=warmup_init)
    assert got == pytest.approx(expected)
    assert relative_step_size(step, lr=0.25, relative_step=False, warmup_init=False) == 0.25


def test_first_step_of_a_vector_by_hand():
    # t=1: beta2_t = 0, v = g^2 + eps1, u = g / |g| = sign(g) (RMS 1: not clipped),
    # lr_t = max(1e-3, RMS(p)) * 1e-2.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    p.grad = torch.tensor([0.5, 0.5, -1.0])
    Adafactor([p]).step()
    lr_t = math.sqrt(14 / 3) * 1e-2
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 - lr_t, -2.0 - lr_t, 3.0 + lr_t]))


def test_first_step_of_a_rank_one_matrix_by_hand():
    # For g = x y^T the factored estimate is exact at t=1: V_hat = g^2 (+eps), so u = sign(g).
    x, y = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5, -1.0])
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.outer(x, y)
    Adafactor([p], relative_step=False, scale_parameter=False, lr=0.1).step()
    torch.testing.assert_close(p.detach(), -0.1 * torch.sign(p.grad), rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    grad_scale=st.sampled_from([1e-8, 1.0, 1e6]),
    clip=st.floats(0.01, 2.0),
)
def test_update_rms_never_exceeds_lr_times_clip_threshold(rows, cols, grad_scale, clip):
    p = torch.nn.Parameter(torch.zeros(rows, cols))
    opt = Adafactor([p], relative_step=False, scale_parameter=False, lr=1e-2, clip_threshold=clip)
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(rows, cols) * grad_scale
        opt.step()
        rms = (p.detach() - before).pow(2).mean().sqrt().item()
        assert rms <= 1e-2 * clip * (1 + 1e-5)


# --- state, resume, interop ---------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["ours_to_hf", "hf_to_ours"])
@pytest.mark.parametrize("config", ["defaults", "beta1_wd_external"])
def test_state_dict_moves_between_ours_and_transformers(direction, config):
    kwargs, shapes = CONFIGS[config], [(5, 4), (2, 3, 4), (4,)]
    first_cls, second_cls = (Adafactor, HFAdafactor)
    if direction == "hf_to_ours":
        first_cls, second_cls = second_cls, first_cls
    grads = _grads(shapes, 20)
    params = _params(shapes)
    first = first_cls(params, **kwargs)
    _run(first, params, grads[:10])

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = second_cls(resumed_params, **kwargs)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))  # as from a checkpoint: no shared tensors
    _run(first, params, grads[10:])
    _run(resumed, resumed_params, grads[10:])
    assert _max_diff(params, resumed_params) < 1e-6
    assert resumed.state[resumed_params[0]]["step"] == 20


def test_state_dict_round_trips_through_torch_save():
    shapes = [(5, 4), (4,)]
    params = _params(shapes)
    opt = Adafactor(params, beta1=0.9)
    _run(opt, params, _grads(shapes, 3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = Adafactor(params, beta1=0.9)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    for p in params:
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(loaded.state[p][key]), torch.as_tensor(value)), key
    assert loaded.param_groups[0]["beta1"] == 0.9


def test_low_precision_moments_stay_fp32_across_load_state_dict():
    params = _params([(6, 4), (4,)], dtype=torch.bfloat16)
    opt = Adafactor(params, relative_step=False, lr=1e-2, beta1=0.9)
    _run(opt, params, _grads([(6, 4), (4,)], 3))
    saved = opt.state_dict()
    loaded = Adafactor(params, relative_step=False, lr=1e-2, beta1=0.9)
    loaded.load_state_dict(saved)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in opt.state[p]:
                assert loaded.state[p][key].dtype == torch.float32
                assert torch.equal(loaded.state[p][key], opt.state[p][key])  # torch alone would round to bf16


def test_transformers_get_lr_and_helpers_are_kept():
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    opt = Adafactor([p])
    opt.step()
    group, state = opt.param_groups[0], opt.state[p]
    assert float(opt._get_lr(group, state)) == pytest.approx(float(HFAdafactor._get_lr(group, state)))
    assert opt._get_options(group, p.shape) == (True, False)
    assert float(opt._rms(torch.ones(9) * 2)) == pytest.approx(2.0)
    assert float(state["RMS"]) > 0


def test_parameters_without_grad_are_skipped_and_closure_gets_gradients():
    used, unused = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))
    opt = Adafactor([used, unused])

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()  # would fail under no_grad
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(6.0)
    assert not torch.equal(used.detach(), torch.ones(3, 2))
    assert torch.equal(unused.detach(), torch.ones(2)) and len(opt.state[unused]) == 0


def test_empty_tensors_are_harmless():
    tensors = (torch.zeros(0, 3), torch.zeros(3, 0), torch.zeros(2, 0, 4), torch.zeros(0), torch.ones(2, 2))
    params = [torch.nn.Parameter(t) for t in tensors]
    for p in params:
        p.grad = torch.ones_like(p)
    Adafactor(params).step()
    assert torch.isfinite(params[-1]).all() and params[0].shape == (0, 3)
    assert not torch.equal(params[-1].detach(), torch.ones(2, 2))


@pytest.mark.parametrize("shape", [(3, 4), (5,)])
def test_zero_gradients_give_finite_updates_like_transformers(shape):
    # eps[0] keeps rsqrt of an all-zero second moment finite: 0 * rsqrt(eps) = 0, not 0 * inf = nan.
    ours_p, hf_p = _params([shape]), _params([shape])
    ours, hf = Adafactor(ours_p), HFAdafactor(hf_p)
    grad = torch.zeros(shape)
    grad.view(-1)[0] = 1.0
    for opt, params in ((ours, ours_p), (hf, hf_p)):
        for _ in range(3):
            params[0].grad = grad.clone()
            opt.step()
    assert torch.isfinite(ours_p[0]).all()
    assert _max_diff(ours_p, hf_p) < 1e-6


def test_sparse_gradient_is_refused():
    p = torch.nn.Parameter(torch.ones(4, 2))
    p.grad = torch.ones(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        Adafactor([p]).step()


def test_lowers_the_loss_of_a_small_regression():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    opt = Adafactor(model.parameters(), relative_step=False, scale_parameter=False, lr=1e-2)
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


# --- validation -----------------------------------------------------------------------------------------

HF_MESSAGES = {
    "lr_with_relative_step": "Cannot combine manual `lr` and `relative_step=True` options",
    "warmup_without_relative_step": "`warmup_init=True` requires `relative_step=True`",
}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": 1e-3}, ValueError, re.escape(HF_MESSAGES["lr_with_relative_step"]) + ".*lr=0.001"),
        ({"warmup_init": True, "relative_step": False, "lr": 1e-3}, ValueError,
         re.escape(HF_MESSAGES["warmup_without_relative_step"])),
        ({"relative_step": False}, ValueError, r"lr=None with relative_step=False"),
        ({"eps": 1e-3}, TypeError, r"eps must be a pair"),
        ({"eps": (1e-30,)}, ValueError, r"eps=\(1e-30,\) has 1 values"),
        ({"eps": (-1.0, 1e-3)}, ValueError, r"eps\[0\]=-1.0 is out of range"),
        ({"clip_threshold": 0.0}, ValueError, r"clip_threshold=0.0 is out of range"),
        ({"decay_rate": 0.5}, ValueError, r"decay_rate=0.5 is out of range"),
        ({"beta1": 1.0}, ValueError, r"beta1=1.0 is out of range"),
        ({"weight_decay": -0.1}, ValueError, r"weight_decay=-0.1 is out of range"),
        ({"scale_parameter": 1}, TypeError, r"scale_parameter must be True or False"),
        ({"relative_step": False, "lr": "1e-3"}, TypeError, r"lr must be a number"),
        ({"relative_step": False, "lr": float("nan")}, ValueError, r"lr=nan is not finite"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Adafactor([torch.nn.Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize("case", sorted(HF_MESSAGES))
def test_transformers_rejects_the_same_combinations(case):
    kwargs = {
        "lr_with_relative_step": {"lr": 1e-3},
        "warmup_without_relative_step": {"warmup_init": True, "relative_step": False, "lr": 1e-3},
    }[case]
    with pytest.raises(ValueError, match=re.escape(HF_MESSAGES[case])):
        HFAdafactor([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_param_group_names_the_group():
    groups = [
        {"params": [torch.nn.Parameter(torch.ones(2))]},
        {"params": [torch.nn.Parameter(torch.ones(2))], "beta1": 2.0},
    ]
    with pytest.raises(ValueError, match=r"param_groups\[1\]: beta1=2.0 is out of range"):
        Adafactor(groups)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr=0.1"):
        Adafactor([{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.1}])


def test_group_overrides_are_used():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Adafactor([{"params": [a]}, {"params": [b], "beta1": 0.5}])
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert "exp_avg" not in opt.state[a] and "exp_avg" in opt.state[b]


# --- AdafactorSchedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["defaults", "warmup_init", "no_scale"])
def test_schedule_reports_the_same_lrs_as_transformers(config):
    kwargs, shapes = CONFIGS[config], [(4, 3), (3,), (5, 2)]
    grads = _grads(shapes, 15)
    runs = []
    for opt_cls, sched_cls in ((Adafactor, AdafactorSchedule), (HFAdafactor, HFAdafactorSchedule)):
        params = _params(shapes)
        opt = opt_cls([{"params": params[:2]}, {"params": params[2:]}], **kwargs)
        sched = sched_cls(opt, initial_lr=1e-3)
        lrs = [[float(v) for v in sched.get_last_lr()]]
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
            sched.step()
            lrs.append([float(v) for v in sched.get_last_lr()])
        runs.append(lrs)
    ours, theirs = runs
    assert ours[0] == [1e-3, 1e-3]
    for got, expected in zip(ours, theirs):
        assert got == pytest.approx(expected, rel=1e-6)


def test_transformers_schedule_drives_our_optimizer():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Adafactor([p])
    ours, theirs = AdafactorSchedule(opt), None
    p.grad = torch.randn(4, 3)
    opt.step()
    ours.step()
    theirs = HFAdafactorSchedule(opt).get_lr()
    assert ours.get_last_lr() == pytest.approx([float(v) for v in theirs])


def test_schedule_reads_a_group_whose_first_parameter_has_no_gradient():
    unused, used = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.full((3, 2), 2.0))
    opt = Adafactor([unused, used])
    sched = get_adafactor_schedule(opt)
    assert isinstance(sched, AdafactorSchedule)
    used.grad = torch.ones(3, 2)
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([2.0 * 1e-2])  # RMS(used) * rel_step at t=1


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: torch.optim.SGD([p], lr=0.1), TypeError, r"needs an Adafactor optimizer"),
        (lambda p: Adafactor([p], relative_step=False, lr=1e-3), ValueError,
         r"relative_step=False.*lr=0.001"),
    ],
)
def test_schedule_refuses_what_it_would_break(make, error, match):
    with pytest.raises(error, match=match):
        AdafactorSchedule(make(torch.nn.Parameter(torch.ones(2))))


def test_schedule_rejects_a_negative_initial_lr():
    with pytest.raises(ValueError, match=r"initial_lr=-1.0 is out of range"):
        AdafactorSchedule(Adafactor([torch.nn.Parameter(torch.ones(2))]), initial_lr=-1.0)


# --- module hygiene -------------------------------------------------------------------------------------


def test_docstring_examples_run():
    result = doctest.testmod(adafactor_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_module_does_not_import_transformers():
    code = "import sys, optsched.optim.adafactor; sys.exit(1 if 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_signature_defaults_are_transformers():
    import inspect

    def defaults(cls):
        params = inspect.signature(cls.__init__).parameters
        return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}

    # transformers' positional arguments and defaults, plus optsched's keyword-only `fused` (off)
    assert defaults(HFAdafactor) == adafactor_module.DEFAULTS
    assert defaults(Adafactor) == {**adafactor_module.DEFAULTS, "fused": False}
    assert inspect.signature(Adafactor.__init__).parameters["fused"].kind is inspect.Parameter.KEYWORD_ONLY


def test_a_torch_without_foreach_rsqrt_steps_the_same(monkeypatch):
    """torch 2.4 has no ``torch._foreach_rsqrt``: the vectors take one ``rsqrt`` each, same values."""
    torch.manual_seed(0)
    shapes = [(6, 4), (4,), (5,), (3, 3)]
    grads = [torch.randn(s) for s in shapes]

    def run() -> list[torch.Tensor]:
        params = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer = Adafactor(params)
        for _ in range(3):
            optimizer.step()
        return [p.detach().clone() for p in params]

    fused = run()
    monkeypatch.delattr(torch, "_foreach_rsqrt")
    for a, b in zip(fused, run()):
        assert torch.equal(a, b)
