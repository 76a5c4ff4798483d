"""optsched.memory: the estimate against the bytes optimizers really hold, formulas, errors."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from optsched.arguments import TrainingArguments
from optsched.memory import (
    MemoryEstimate,
    TensorView,
    estimate_from_optimizer,
    estimate_optimizer_memory,
    format_bytes,
    get_state_formula,
    infer_optimizer_name,
    list_state_formulas,
    measure_optimizer_state,
    register_state_formula,
)
from optsched.optim import create_optimizer, get_optimizer_spec, list_optimizers


class Net(nn.Module):
    """A few 256x256 matrices (realistic block scales), vectors, an embedding and a small head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 64)
        self.up = nn.Linear(64, 256)
        self.hidden = nn.Linear(256, 256)
        self.hidden2 = nn.Linear(256, 256)
        self.norm = nn.LayerNorm(256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(self.embed(x)))
        return self.head(self.norm(self.hidden2(torch.relu(self.hidden(h)))))


def _args(name: str, **kw) -> TrainingArguments:
    if "galore" in name or "apollo" in name:
        kw.setdefault("optim_target_modules", ["hidden", "hidden2"])
    return TrainingArguments(optim=name, weight_decay=0.01, **kw)


def _skip_reason(name: str) -> str | None:
    spec = get_optimizer_spec(name)
    if spec.requires_device not in (None, "cpu"):
        return f"needs {spec.requires_device}"
    try:
        spec.load_class()
    except ImportError as exc:
        return f"package not installed: {exc}"
    return None


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, name: str) -> None:
    if hasattr(optimizer, "train") and get_optimizer_spec(name).needs_train_eval:
        optimizer.train()
    loss = model(torch.randint(0, 300, (2, 3))).pow(2).mean()
    if name == "lomo":
        optimizer.fused_backward(loss, 1e-3)
    else:
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", list_optimizers())
def test_estimate_matches_state_after_one_step(name: str) -> None:
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = Net()
    args = _args(name)
    estimate = estimate_optimizer_memory(model, name, args=args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = create_optimizer(model, args, num_training_steps=10)
        before = measure_optimizer_state(optimizer).total_bytes  # 0, except Adagrad (allocates in __init__)
        _step(model, optimizer, name)
    actual = measure_optimizer_state(optimizer)
    assert before in (0, actual.total_bytes)
    assert estimate.total_bytes == pytest.approx(actual.total_bytes, rel=0.05), (estimate.by_kind, actual.by_kind)
    if name not in ("lomo", "sgd"):  # the two without state
        assert actual.total_bytes > 0
    # the same formula applied to the optimizer that exists (what explain shows)
    from_optimizer = estimate_from_optimizer(optimizer, model)
    assert from_optimizer is not None
    assert from_optimizer.total_bytes == pytest.approx(actual.total_bytes, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list_optimizers())
def test_estimate_is_exact_for_other_parameter_dtypes(name: str, dtype: torch.dtype) -> None:
    # Adafactor (and GaLore's) keep fp32 state for bf16 parameters; stable_adamw's eps_sq and APOLLO's
    # scaled_grad are 0-dim tensors of the parameter's dtype: every formula is exact, not only in fp32
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = Net().to(dtype)
    args = _args(name)
    estimate = estimate_optimizer_memory(model, name, args=args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = create_optimizer(model, args, num_training_steps=10)
        _step(model, optimizer, name)
    actual = measure_optimizer_state(optimizer)
    assert estimate.total_bytes == actual.total_bytes, (estimate.by_kind, actual.by_kind)
    assert estimate.by_kind == {k: v for k, v in actual.by_kind.items() if k in estimate.by_kind}
    from_optimizer = estimate_from_optimizer(optimizer, model)
    assert from_optimizer is not None and from_optimizer.total_bytes == actual.total_bytes


def test_every_registered_name_has_a_formula() -> None:
    missing = sorted(set(list_optimizers()) - set(list_state_formulas()))
    assert missing == []


# n = 1000 * 1000 + 1000 = 1,001,000 elements in 2 tensors, fp32 (s = 4)
N, T = 1_001_000, 2
REFERENCE = [
    ("adamw_torch", None, 8 * N + 4 * T),
    ("adamw_torch", {"amsgrad": True}, 12 * N + 4 * T),
    ("adam", None, 8 * N + 4 * T),
    ("sgd", None, 0),
    ("sgd", {"momentum": 0.9}, 4 * N),
    ("adagrad", None, 4 * N + 4 * T),
    ("rmsprop", None, 4 * N + 4 * T),
    ("rmsprop", {"momentum": 0.9, "centered": True}, 12 * N + 4 * T),
    ("nadam", None, 8 * N + 8 * T),
    ("asgd", None, 4 * N + 12 * T),
    ("adafactor", None, (1000 + 1000) * 4 + 1000 * 4),
    ("adafactor", {"beta1": 0.9}, (1000 + 1000) * 4 + 1000 * 4 + 4 * N),
    ("lion_32bit", None, 4 * N),
    ("ademamix", None, 12 * N),
    ("schedule_free_adamw", None, 8 * N),
    ("schedule_free_sgd", None, 4 * N),
    ("grokadamw", None, 12 * N),
    ("lomo", None, 0),
    # 8-bit: 1e6 elements quantized (1 byte + 4 bytes per 256 = 3907 blocks); the 1000-element bias
    # is under min_8bit_size and stays fp32; two shared 1 KiB maps
    ("adamw_8bit", None, 2 * (1_000_000 + 3907 * 4) + 2 * 4 * 1000 + 2 * 1024),
    ("lion_8bit", None, (1_000_000 + 3907 * 4) + 4 * 1000 + 1024),
    ("adamw_8bit", {"min_8bit_size": 10**7}, 8 * N),
    # torchao: 1e6 % 256 != 0 -> not quantized; block_size 250 divides it
    ("adamw_torch_8bit", None, 8 * N + 4 * T),
    ("adamw_torch_8bit", {"block_size": 250}, 2 * (1_000_000 + 4000 * 4 + 1024) + 8 * 1000 + 4 * T),
    ("adamw_torch_4bit", {"block_size": 250}, 2 * (500_000 + 4000 * 4 + 64) + 8 * 1000 + 4 * T),
]


@pytest.mark.parametrize(("name", "optim_args", "expected"), REFERENCE)
def test_reference_values(name: str, optim_args, expected: int) -> None:
    model = nn.Linear(1000, 1000)
    estimate = estimate_optimizer_memory(model, name, optim_args)
    assert estimate.total_bytes == expected
    assert sum(estimate.by_group.values()) == expected
    assert estimate.num_elements == N and estimate.num_tensors == T


def test_sgd_momentum_from_explicit_adam_beta1() -> None:
    # optsched's SGD takes an explicitly set adam_beta1 as momentum (the seed's example)
    model = nn.Linear(10, 10)
    assert estimate_optimizer_memory(model, "sgd", args=TrainingArguments(adam_beta1=0.9)).total_bytes == 4 * 110
    assert estimate_optimizer_memory(model, "sgd", args=TrainingArguments()).total_bytes == 0


def test_bnb_keeps_embeddings_in_fp32_only_with_the_model() -> None:
    model = nn.Sequential(nn.Embedding(1000, 64))  # 64,000 elements: 8-bit unless an embedding
    with_model = estimate_optimizer_memory(model, "adamw_8bit")
    assert with_model.total_bytes == 8 * 64_000
    groups = [{"params": list(model.parameters())}]
    bare = estimate_optimizer_memory(groups, "adamw_8bit")
    assert bare.total_bytes == 2 * (64_000 + 250 * 4) + 2048
    assert any("Embedding" in note for note in bare.notes)


def test_meta_device_and_dtype() -> None:
    with torch.device("meta"):
        big = nn.Linear(4096, 4096)
    estimate = estimate_optimizer_memory(big, "adamw_torch")
    assert estimate.total_bytes == 8 * (4096 * 4096 + 4096) + 8
    half = nn.Linear(100, 100).to(torch.bfloat16)
    assert estimate_optimizer_memory(half, "adamw_torch").total_bytes == 4 * 10_100 + 8
    # bitsandbytes keeps 32-bit states in fp32 whatever the parameter's dtype
    assert estimate_optimizer_memory(half, "lion_32bit").total_bytes == 4 * 10_100


def test_groups_and_tensors_accepted() -> None:
    a, b = nn.Parameter(torch.zeros(10, 10)), nn.Parameter(torch.zeros(5))
    by_tensors = estimate_optimizer_memory([a, b], "adamw_torch")
    by_groups = estimate_optimizer_memory([{"params": [a], "name": "w"}, {"params": b}], "adamw_torch")
    assert by_tensors.total_bytes == by_groups.total_bytes == 8 * 105 + 8
    assert by_groups.by_group == {"w": 804, "group 1": 44}
    assert by_tensors.by_kind == {"exp_avg": 420, "exp_avg_sq": 420, "step": 8}


def test_lowrank_split_needs_model_and_is_approximate() -> None:
    model = Net()
    est = estimate_optimizer_memory(model, "galore_adamw", {"rank": 16}, _args("galore_adamw"))
    assert est.approximate
    # targets: two 256x256 matrices -> moments 256*16 each, projection 16*256
    plain = 8 * (sum(p.numel() for p in model.parameters()) - 2 * 256 * 256)
    assert est.total_bytes == plain + 2 * (2 * 256 * 16 * 4 + 16 * 256 * 4)


def test_muon_matches_muon_state_bytes() -> None:
    from optsched.optim.muon import muon_state_bytes, split_muon_groups
    from optsched.params import build_param_groups

    model = Net()
    args = TrainingArguments(optim="muon", weight_decay=0.01)
    est = estimate_optimizer_memory(model, "muon", args=args)
    assert est.total_bytes == muon_state_bytes(split_muon_groups(model, build_param_groups(model, args)))
    assert est.by_kind["momentum_buffer"] == 4 * 2 * 256 * 256 + 4 * 256 * 64  # the hidden matrices


def test_errors() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Did you mean"):
        estimate_optimizer_memory(model, "adamw_tourch")
    with pytest.raises(ValueError, match="momentun"):
        estimate_optimizer_memory(model, "sgd", {"momentun": 0.9})
    with pytest.raises(ValueError, match="empty"):
        estimate_optimizer_memory([], "adamw_torch")
    with pytest.raises(TypeError):
        estimate_optimizer_memory(torch.zeros(3), "adamw_torch")
    with pytest.raises(TypeError):
        estimate_optimizer_memory([1, 2], "adamw_torch")
    with pytest.raises(ValueError, match="use_muon"):
        estimate_optimizer_memory([{"params": list(model.parameters())}], "muon")


def test_name_without_formula_is_an_error() -> None:
    from optsched.optim import register_optimizer, unregister_optimizer

    register_optimizer("my_sgd_for_memory_test", torch.optim.SGD)
    try:
        with pytest.raises(ValueError, match="register_state_formula"):
            estimate_optimizer_memory(nn.Linear(2, 2), "my_sgd_for_memory_test")
        register_state_formula("my_sgd_for_memory_test", lambda t, h: {"buf": 3 * t.numel})
        assert estimate_optimizer_memory(nn.Linear(2, 2), "my_sgd_for_memory_test").total_bytes == 18
        with pytest.raises(ValueError, match="overwrite"):
            register_state_formula("my_sgd_for_memory_test", lambda t, h: {})
    finally:
        unregister_optimizer("my_sgd_for_memory_test")
        from optsched import memory

        memory._FORMULAS.pop("my_sgd_for_memory_test", None)
    with pytest.raises(TypeError):
        register_state_formula("x", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Did you mean"):
        get_state_formula("adamw_trch")


def test_infer_name_respects_fixed_kwargs() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    assert infer_optimizer_name(torch.optim.AdamW(p, fused=True)) == "adamw_torch_fused"
    assert infer_optimizer_name(torch.optim.AdamW(p)) == "adamw_torch"  # transformers' name on a tie
    assert infer_optimizer_name(torch.optim.LBFGS(p)) is None


@pytest.mark.parametrize("name", ["adamw", "adamw_torch", "sgd", "adam"])
def test_an_optimizer_from_create_optimizer_keeps_the_name_it_was_built_from(name) -> None:
    from optsched import TrainingArguments, create_optimizer, explain

    model = nn.Linear(3, 2)
    optimizer = create_optimizer(model, TrainingArguments(optim=name))
    assert infer_optimizer_name(optimizer) == name
    assert f"optim={name!r}" in str(explain(optimizer, model=model))


def test_measure_dedupes_shared_tensors_and_reads_objects() -> None:
    p1, p2 = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p1, p2], lr=0.1)
    shared = torch.zeros(8)

    class Holder:
        def __init__(self) -> None:
            self.matrix = torch.zeros(2, 3)

    opt.state[p1] = {"shared": shared, "obj": Holder(), "n": 3}
    opt.state[p2] = {"shared": shared}
    measured = measure_optimizer_state(opt)
    assert measured.total_bytes == 32 + 24
    assert measured.measured and measured.by_kind == {"shared": 32, "obj": 24}
    with pytest.raises(TypeError):
        measure_optimizer_state("not an optimizer")  # type: ignore[arg-type]


def test_report_object() -> None:
    est = estimate_optimizer_memory(nn.Linear(10, 10), "adamw_torch")
    data = json.loads(json.dumps(est.to_dict()))
    assert data["total_bytes"] == est.total_bytes == 888
    assert "adamw_torch" in str(est) and "888 B" in str(est)
    assert isinstance(est, MemoryEstimate) and est.bytes_per_element == pytest.approx(888 / 110)


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"), (3 * 2**30, "3.00 GiB")]
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(shape=shapes)
def test_properties_per_tensor(shape: tuple[int, ...]) -> None:
    view = TensorView("w", shape, 4)
    n = math.prod(shape)
    adam = sum(get_state_formula("adamw_torch").per_tensor(view, {}).values())
    assert adam == 8 * n + 4
    factored = sum(get_state_formula("adafactor").per_tensor(view, {}).values())
    if len(shape) < 2:
        assert factored == 4 * n  # vectors keep the full second moment
    elif min(shape[-2:]) >= 2:
        assert factored <= 4 * n  # rows + columns never exceed the full matrix
    eight = sum(get_state_formula("adamw_8bit").per_tensor(view, {"optim_bits": 8, "min_8bit_size": 1}).values())
    assert eight < adam


@pytest.mark.parametrize("kwargs", [{}, {"beta1": 0.9}, {"lr": 1e-3, "relative_step": False}],
                         ids=["defaults", "beta1", "external-lr"])
def test_an_adafactor_built_with_its_own_defaults_is_explained_exactly(kwargs) -> None:
    # "adafactor" fixes scale_parameter=False / relative_step=False; an Adafactor built by hand with
    # transformers' defaults (scale_parameter=True) keeps a 0-dim RMS per tensor as well, and is still
    # the class of that name: explain estimated nothing ("no memory formula") before
    from optsched.optim import Adafactor

    torch.manual_seed(0)
    model = Net()
    optimizer = Adafactor(model.parameters(), **kwargs)
    _step(model, optimizer, "adafactor")
    actual = measure_optimizer_state(optimizer)
    estimate = estimate_from_optimizer(optimizer, model)
    assert estimate is not None and estimate.optim == "adafactor"
    assert estimate.total_bytes == actual.total_bytes, (estimate.by_kind, actual.by_kind)
    assert "RMS" in actual.by_kind
