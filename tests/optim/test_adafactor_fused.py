"""``Adafactor(fused=True)``: the C++ kernel gives the eager path's (and transformers') numbers, keeps the
same state, falls back to the eager path for what it does not take, and fails clearly where it cannot be
built. Skipped only on a machine without a C++ compiler or ninja; a failed build fails here."""

from __future__ import annotations

import copy

import pytest
import torch

from _optim_helpers import run_steps, scaled_grads, seeded_params
from optsched.optim import adafactor_fused
from optsched.optim.adafactor import Adafactor

if adafactor_fused.missing_build_tool() is not None:
    pytest.skip(f"Adafactor(fused=True) cannot be built here: {adafactor_fused.missing_build_tool()}",
                allow_module_level=True)

from torch.utils import cpp_extension  # noqa: E402

hf_optimization = pytest.importorskip("transformers.optimization")
HFAdafactor = hf_optimization.Adafactor

CONFIGS = {
    "defaults": {},
    "no_scale": {"scale_parameter": False},
    "warmup_init": {"warmup_init": True},
    "trainer": {"relative_step": False, "scale_parameter": False, "lr": 1e-3},
    "beta1": {"beta1": 0.9},
    "beta1_high_weight": {"beta1": 0.3},  # 1 - beta1 >= 0.5: torch's other lerp formula
    "weight_decay": {"weight_decay": 0.1},
    "beta1_wd_external": {"beta1": 0.8, "weight_decay": 0.05, "relative_step": False, "lr": 3e-3},
    "clip_decay_eps": {"clip_threshold": 0.5, "decay_rate": -0.5, "eps": (1e-20, 1e-2)},
}
# Matrices the kernel takes (one row, one column, odd sizes, a larger one split over threads) and what it
# leaves to the eager path (a 3-D tensor, vectors, a scalar).
SHAPES = [(12, 10), (1, 9), (10, 1), (37, 129), (256, 96), (3, 6, 5), (7,), ()]


def _grads(shapes, steps):
    return scaled_grads(shapes, steps, decades=5)


def _assert_close(xs, ys, rtol=2e-5):
    for x, y in zip(xs, ys):
        x, y = x.detach().float(), y.detach().float()
        assert (x - y).abs().max().item() <= rtol * max(y.abs().max().item(), 1e-30), (x, y)


@pytest.fixture(scope="module", autouse=True)
def _built():
    adafactor_fused.load_kernels()  # the one build (~20 s on a fresh machine), before any timing


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fused_matches_eager_and_transformers_over_30_steps(config):
    kwargs, grads = CONFIGS[config], _grads(SHAPES, 30)
    fused_p, eager_p, hf_p = seeded_params(SHAPES), seeded_params(SHAPES), seeded_params(SHAPES)
    fused, eager, hf = Adafactor(fused_p, fused=True, **kwargs), Adafactor(eager_p, **kwargs), HFAdafactor(hf_p, **kwargs)
    for opt, params in ((fused, fused_p), (eager, eager_p), (hf, hf_p)):
        run_steps(opt, params, grads)
    _assert_close(fused_p, hf_p)
    _assert_close(fused_p, eager_p)
    assert not torch.equal(fused_p[3], eager_p[3])  # the kernel ran (it sums in another order)
    assert all(torch.equal(a, b) for a, b in zip(fused_p[5:], eager_p[5:]))  # the rest is the eager path
    for p_fused, p_hf in zip(fused_p, hf_p):
        s_fused, s_hf = fused.state[p_fused], hf.state[p_hf]
        assert sorted(s_fused) == sorted(s_hf) and s_fused["step"] == s_hf["step"] == 30
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg"):
            if key in s_hf:
                torch.testing.assert_close(s_fused[key], s_hf[key], rtol=2e-5, atol=1e-6 * s_hf[key].abs().max())
        if CONFIGS[config].get("scale_parameter", True):
            assert s_fused["RMS"].dtype == torch.float32
            torch.testing.assert_close(s_fused["RMS"], s_hf["RMS"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_changes_only_the_summation_order(threads):
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            params = seeded_params([(301, 67)])
            run_steps(Adafactor(params, fused=True, beta1=0.9), params, _grads([(301, 67)], 5))
            results.append(params[0].detach().clone())
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_go_through_fp32_copies(dtype):
    shapes, grads = [(20, 16), (16,)], _grads([(20, 16), (16,)], 8)
    fused_p, hf_p = seeded_params(shapes, dtype=dtype), seeded_params(shapes, dtype=dtype)
    run_steps(Adafactor(fused_p, fused=True), fused_p, grads)
    run_steps(HFAdafactor(hf_p), hf_p, grads)
    for a, b in zip(fused_p, hf_p):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b)  # dtype tolerance: a rounding flip at most


def test_non_contiguous_gradient_takes_the_eager_path():
    weight = torch.nn.Parameter(torch.randn(6, 4))
    grad = torch.randn(4, 6).t()  # a transposed view
    assert not adafactor_fused.eligible(weight.detach(), grad)
    twin = torch.nn.Parameter(weight.detach().clone())
    fused, eager = Adafactor([weight], fused=True), Adafactor([twin])
    weight.grad, twin.grad = grad, grad.contiguous()
    fused.step()
    eager.step()
    torch.testing.assert_close(weight, twin, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("direction", ["fused_to_hf", "hf_to_fused"])
def test_state_moves_between_fused_and_transformers(direction):
    kwargs, shapes, grads = CONFIGS["beta1_wd_external"], [(9, 5), (5,)], _grads([(9, 5), (5,)], 20)

    def make(cls, params):
        return cls(params, fused=True, **kwargs) if cls is Adafactor else cls(params, **kwargs)

    first_cls, second_cls = (Adafactor, HFAdafactor) if direction == "fused_to_hf" else (HFAdafactor, Adafactor)
    params = seeded_params(shapes)
    first = make(first_cls, params)
    run_steps(first, params, grads[:10])
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(second_cls, resumed_params)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    if second_cls is Adafactor:  # transformers' groups have no "fused": the constructor's choice stays
        assert all(group["fused"] is True for group in resumed.param_groups)
    run_steps(first, params, grads[10:])
    run_steps(resumed, resumed_params, grads[10:])
    _assert_close(params, resumed_params)


def test_bad_fused_value_names_the_field():
    with pytest.raises(TypeError, match="fused"):
        Adafactor([torch.nn.Parameter(torch.ones(2, 2))], fused="yes")
    with pytest.raises(TypeError, match=r"param_groups\[1\]: fused"):
        Adafactor([{"params": [torch.nn.Parameter(torch.ones(2))]},
                   {"params": [torch.nn.Parameter(torch.ones(2))], "fused": 1}])


def test_a_parameter_off_the_cpu_is_refused_at_construction():
    meta = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
    with pytest.raises(ValueError, match=r"fused=True runs a CPU kernel, got a parameter on meta.*fused=False"):
        Adafactor([meta], fused=True)
    Adafactor([meta])  # the eager path takes any device


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        (lambda mp: mp.setattr(adafactor_fused.shutil, "which", lambda name: None), "no C\\+\\+ compiler"),
        (lambda mp: mp.setattr(cpp_extension, "is_ninja_available", lambda: False), "pip install ninja"),
        (lambda mp: mp.setattr(cpp_extension, "load_inline", _failing_build), "building its C\\+\\+ kernel failed"),
    ],
)
def test_a_kernel_that_cannot_be_built_is_a_clear_error_at_construction(monkeypatch, patch, match):
    adafactor_fused.load_kernels.cache_clear()
    try:
        patch(monkeypatch)
        with pytest.raises(ImportError, match=rf"{match}.*accepted: fused=False"):
            Adafactor([torch.nn.Parameter(torch.ones(2, 2))], fused=True)
    finally:
        monkeypatch.undo()
        adafactor_fused.load_kernels.cache_clear()
    adafactor_fused.load_kernels()  # loads the cached build again


def _failing_build(*args, **kwargs):
    raise RuntimeError("Error building extension 'x'")


def test_optim_args_turn_it_on_through_training_arguments():
    import optsched

    model = torch.nn.Linear(4, 3)
    args = optsched.TrainingArguments(output_dir="unused", optim="adafactor", optim_args="fused=True")
    optimizer = optsched.create_optimizer(model, args)
    assert isinstance(optimizer, Adafactor) and all(g["fused"] for g in optimizer.param_groups)


@pytest.mark.parametrize("config", ["defaults", "beta1"])
def test_zero_gradients_stay_finite_like_transformers(config):
    # the second moments fall to eps1 = 1e-30: the factors reach 1e15 and must not make inf * 0
    fused_p, hf_p = seeded_params([(8, 6)]), seeded_params([(8, 6)])
    fused, hf = Adafactor(fused_p, fused=True, **CONFIGS[config]), HFAdafactor(hf_p, **CONFIGS[config])
    zeros = [[torch.zeros(8, 6)] for _ in range(3)]
    run_steps(fused, fused_p, zeros)
    run_steps(hf, hf_p, zeros)
    assert torch.isfinite(fused_p[0]).all()
    torch.testing.assert_close(fused_p[0], hf_p[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("platform", "capability", "cflags", "ldflags"),
    [
        ("linux", "AVX512", ["-O3", "-fopenmp", "-mavx512f"], ["-fopenmp"]),
        ("linux", "AVX2", ["-O3", "-fopenmp", "-mavx2", "-mfma"], ["-fopenmp"]),
        ("linux", "DEFAULT", ["-O3", "-fopenmp"], ["-fopenmp"]),
        ("darwin", "DEFAULT", ["-O3"], []),
        ("win32", "AVX2", ["/O2"], []),
    ],
)
def test_build_flags_by_platform_and_vector_width(monkeypatch, platform, capability, cflags, ldflags):
    monkeypatch.setattr(adafactor_fused.sys, "platform", platform)
    got_c, got_ld = adafactor_fused._build_flags(capability)
    assert all(flag in got_c for flag in cflags) and got_ld == ldflags
    if platform != "linux":
        assert "-fopenmp" not in got_c
    if platform == "win32":
        assert got_c == ["/O2"]  # MSVC takes no GCC flags
