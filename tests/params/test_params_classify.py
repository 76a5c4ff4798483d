"""optsched.params.classify: norm types, bias names, per-parameter records, order and linear time."""

from __future__ import annotations

import doctest
import gc
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from optsched.params import classify, classify_parameters, is_bias_name, is_norm_module, is_norm_name

# --- norm layers by type ------------------------------------------------------------------------

TORCH_NORMS = [
    nn.LayerNorm(4),
    nn.RMSNorm(4),
    nn.GroupNorm(2, 4),
    nn.BatchNorm1d(4),
    nn.BatchNorm2d(4),
    nn.BatchNorm3d(4),
    nn.SyncBatchNorm(4),
    nn.InstanceNorm1d(4, affine=True),
    nn.InstanceNorm2d(4, affine=True),
    nn.InstanceNorm3d(4, affine=True),
    nn.LazyBatchNorm2d(),
    nn.LazyInstanceNorm1d(),
    nn.LocalResponseNorm(2),
    nn.CrossMapLRN2d(3),
]


@pytest.mark.parametrize("module", TORCH_NORMS, ids=lambda m: type(m).__name__)
def test_every_torch_norm_class_is_a_norm(module):
    assert is_norm_module(module)
    assert is_norm_module(type(module))


def test_every_norm_class_exported_by_torch_nn_is_covered():
    # A norm class added to torch.nn later must not slip through unrecognised.
    names = [n for n in dir(nn) if n.endswith(("Norm", "Norm1d", "Norm2d", "Norm3d")) or "LRN" in n]
    assert len(names) >= 15
    for name in names:
        assert is_norm_module(getattr(nn, name)), name


class FooRMSNorm(nn.Module):  # a model's own norm, not derived from any torch norm
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class MyBatchNorm2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))


class SubOfFoo(FooRMSNorm):  # the name is inherited through the base class
    pass


class Transform(nn.Module):
    pass


class Normalizer(nn.Module):
    pass


class LayerNormLinear(nn.Module):  # a fused "norm then linear" is not named like a norm
    pass


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (FooRMSNorm, True),
        (MyBatchNorm2d, True),
        (SubOfFoo, True),
        (Transform, False),
        (Normalizer, False),
        (LayerNormLinear, False),
        (nn.Linear, False),
        (nn.Embedding, False),
        (nn.Conv2d, False),
    ],
)
def test_norm_by_class_name(cls, expected):
    assert is_norm_module(cls) is expected


# --- names --------------------------------------------------------------------------------------

BIAS_NAMES = [
    ("bias", True),
    ("fc.bias", True),
    ("encoder.layer.0.attention.self.query.bias", True),
    ("attn.in_proj_bias", True),  # nn.MultiheadAttention
    ("attn.bias_k", True),
    ("lstm.bias_hh_l0", True),  # nn.LSTM
    ("lstm.bias_ih_l0_reverse", True),
    ("attention.q_bias", True),  # DeBERTa, BEiT
    ("layer.rel_attn.r_w_bias", True),  # XLNet
    ("block.relative_position_bias_table", True),  # Swin
    ("block.0.layer.0.SelfAttention.relative_attention_bias.weight", True),  # T5
    ("fc.Bias", True),
    ("attn_bias_proj.weight", False),  # HF's substring rule wrongly exempts this
    ("attn_bias_proj.bias", True),
    ("unbiased.weight", False),
    ("debias.weight", False),
    ("biases", False),
    ("fc.weight", False),
]


@pytest.mark.parametrize(("name", "expected"), BIAS_NAMES)
def test_bias_is_a_word_of_the_name_not_a_substring(name, expected):
    assert is_bias_name(name) is expected


NORM_NAMES = [
    ("encoder.layer.0.attention.output.LayerNorm.weight", True),
    ("model.layers.0.input_layernorm.weight", True),
    ("model.norm.weight", True),
    ("norm.weight", True),
    ("decoder.final_layer_norm.weight", True),
    ("block.0.layer.0.layer_norm.weight", True),
    ("q_norm.weight", True),
    ("encoder.rmsnorm.weight", True),
    ("transformer.ln_f.weight", False),  # found by type instead
    ("normalization.weight", False),
    ("norm1.weight", False),
    ("enormous.weight", False),
    ("fc.weight", False),
]


@pytest.mark.parametrize(("name", "expected"), NORM_NAMES)
def test_norm_name_patterns_are_transformers(name, expected):
    assert is_norm_name(name) is expected


def test_module_doctests():
    result = doctest.testmod(classify, raise_on_error=False)
    assert result.attempted >= 3
    assert result.failed == 0


# --- records ------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm_block = nn.Sequential(FooRMSNorm(4))
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.proj.bias.requires_grad_(False)  # frozen
        self.alpha = nn.Parameter(torch.zeros(()))


def test_records_of_a_small_model():
    infos = {i.name: i for i in classify_parameters(Tiny())}
    assert list(infos) == [
        "alpha",
        "emb.weight",
        "proj.weight",
        "proj.bias",
        "norm_block.0.weight",
        "gn.weight",
        "gn.bias",
        "head.weight",
    ]
    assert infos["emb.weight"].is_embedding and infos["emb.weight"].tied
    assert infos["emb.weight"].alias_of is None
    assert infos["head.weight"].alias_of == "emb.weight"
    assert infos["head.weight"].tied and not infos["head.weight"].is_embedding
    assert infos["head.weight"].index == infos["emb.weight"].index == 1
    assert infos["head.weight"].module_type is nn.Linear
    assert infos["proj.bias"].frozen and infos["proj.bias"].is_bias and not infos["proj.weight"].frozen
    assert infos["norm_block.0.weight"].is_norm and infos["gn.weight"].is_norm and infos["gn.bias"].is_norm
    assert not infos["proj.weight"].is_norm and not infos["proj.weight"].is_bias
    assert infos["alpha"].ndim == 0 and infos["proj.weight"].ndim == 2
    assert not infos["alpha"].tied and not infos["proj.weight"].tied


def test_inside_a_torch_norm_layer_everything_counts_inside_a_norm_named_block_only_its_own():
    class AdaLayerNorm(nn.Module):  # named like a norm, but a block: a scale and a projection
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.inner = nn.Linear(2, 2)

    norm = nn.LayerNorm(2)
    norm.extra = nn.Linear(2, 2)  # a child of a torch norm layer (as transformers' rule: exempt)
    model = nn.ModuleDict({"ada": AdaLayerNorm(), "ln": norm, "plain": nn.Linear(2, 2)})
    infos = {i.name: i.is_norm for i in classify_parameters(model)}
    assert infos == {
        "ada.scale": True,
        "ada.inner.weight": False,  # SqueezeBERT's ConvDropoutLayerNorm, VibeVoice's AdaLayerNorm FFN
        "ada.inner.bias": False,
        "ln.weight": True,
        "ln.bias": True,
        "ln.extra.weight": True,
        "ln.extra.bias": True,
        "plain.weight": False,
        "plain.bias": False,
    }


def test_root_norm_layer_is_a_norm():
    assert all(i.is_norm for i in classify_parameters(nn.LayerNorm(3)))


def test_shared_module_is_classified_under_each_name():
    shared = nn.Linear(2, 2)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    infos = classify_parameters(model)
    assert [(i.name, i.alias_of) for i in infos] == [
        ("a.weight", None),
        ("a.bias", None),
        ("b.0.weight", "a.weight"),
        ("b.0.bias", "a.bias"),
    ]
    assert all(i.tied for i in infos)


@pytest.mark.parametrize("bad", [None, "model", torch.zeros(2), [nn.Linear(2, 2)]])
def test_not_a_module_is_a_type_error(bad):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        classify_parameters(bad)


# --- property: order and names match torch ------------------------------------------------------

LEAVES = [
    lambda: nn.Linear(2, 2),
    lambda: nn.Linear(2, 2, bias=False),
    lambda: nn.LayerNorm(2),
    lambda: nn.Embedding(3, 2),
    lambda: nn.ReLU(),
    lambda: nn.BatchNorm1d(2),
]


@st.composite
def module_trees(draw, depth: int = 0):
    """Random nested modules with random parameter sharing and freezing."""
    if depth >= 3 or draw(st.booleans()):
        module = draw(st.sampled_from(LEAVES))()
    else:
        children = draw(st.lists(module_trees(depth + 1), min_size=1, max_size=3))
        module = nn.Sequential(*children)
        if draw(st.booleans()):
            module.scale = nn.Parameter(torch.ones(2))
    for param in module.parameters():
        if draw(st.integers(0, 4)) == 0:
            param.requires_grad_(False)
    return module


@settings(max_examples=60, deadline=None)
@given(tree=module_trees(), data=st.data())
def test_records_follow_named_parameters(tree, data):
    model = nn.Sequential(tree)
    params = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(params) >= 2 and data.draw(st.booleans()):  # tie two linears' weights
        params[-1].weight = params[0].weight
    infos = classify_parameters(model)
    assert [i.name for i in infos] == [n for n, _ in model.named_parameters(remove_duplicate=False)]
    unique = [i for i in infos if i.alias_of is None]
    assert [(i.name, i.param) for i in unique] == list(model.named_parameters())
    assert [i.index for i in unique] == list(range(len(unique)))
    for info in infos:
        assert info.frozen is (not info.param.requires_grad)
        assert info.ndim == info.param.ndim


# --- linear time --------------------------------------------------------------------------------


def _blocks(num_tensors: int) -> nn.Module:
    return nn.ModuleList(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)) for _ in range(num_tensors // 4))


class _Wide(nn.Module):
    """Eight tensors in one module: large models without paying for 10^4 nn.Module constructions."""

    def __init__(self) -> None:
        super().__init__()
        for i in range(4):
            self.register_parameter(f"w{i}", nn.Parameter(torch.empty(2, 2)))
            self.register_parameter(f"b{i}_bias", nn.Parameter(torch.empty(2)))


class _WideNorm(_Wide):
    pass


def _wide_blocks(num_tensors: int) -> nn.Module:
    return nn.ModuleList(nn.Sequential(_Wide(), _WideNorm()) for _ in range(num_tensors // 16))


def _best_time(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        gc.disable()  # a collection landing in one round only would distort the ratio
        try:
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        finally:
            gc.enable()
    return best


def _growth(fn, small: nn.Module, large: nn.Module, rounds: int = 5) -> float:
    """How much faster than ``named_parameters()`` itself ``fn``'s time grows from small to large.

    Dividing by the time of a plain ``named_parameters()`` walk over the same model cancels what
    every pass pays alike (CPU caches overflowing as the model grows, a busy machine): a linear
    algorithm stays near 1, a quadratic one grows with the size ratio.
    """
    fn(small)  # warm caches
    ratio = []
    for model in (small, large):
        t_fn = _best_time(lambda: fn(model), rounds)
        t_walk = _best_time(lambda: list(model.named_parameters()), rounds)
        ratio.append(t_fn / t_walk)
    return ratio[1] / ratio[0]


def _python_steps(fn) -> int:
    """Python lines executed by ``fn()``, torch's own module walking included: a deterministic cost."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def test_classification_work_is_linear():
    # Deterministic: 8x the tensors must cost 8x the Python steps (a nested loop would cost 64x).
    small, large = _blocks(1000), _blocks(8000)
    steps_small = _python_steps(lambda: classify_parameters(small))
    ratio = _python_steps(lambda: classify_parameters(large)) / steps_small
    assert 7.5 < ratio < 8.5


def test_classification_time_grows_linearly():
    # Timing catches what line counts cannot (a list look-up inside C). Sizes are above the point where
    # CPU caches overflow (per-tensor cost is flat from ~4k tensors on), and the time is divided by that
    # of torch's own named_parameters() walk, so the ratio is ~1 for a linear pass and ~8 for a
    # quadratic one (transformers' list look-ups measure ~12 here). The bound 3 is generous for a
    # shared machine.
    small, large = _wide_blocks(4000), _wide_blocks(32000)
    assert _growth(classify_parameters, small, large, rounds=3) < 3


# --- property: the fast walk agrees with the readable per-name rules ---------------------------

NAME_WORDS = ["norm", "Norm", "layer_norm", "LayerNorm", "rmsnorm", "norm1", "q_norm", "normalization",
              "bias", "attn_bias", "attn_bias_proj", "q_bias", "bias_k", "biased", "fc", "0", "block"]


class Leaf(nn.Module):
    def __init__(self, names: list[str]) -> None:
        super().__init__()
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.zeros(1)))


@st.composite
def named_trees(draw, depth: int = 0):
    names = draw(st.lists(st.sampled_from(NAME_WORDS + ["weight", "scale"]), max_size=3, unique=True))
    kind = draw(st.sampled_from([Leaf, FooRMSNorm, nn.LayerNorm])) if depth < 3 else Leaf
    module = Leaf(names) if kind is Leaf else kind(1)
    if depth < 3:
        for child in draw(st.lists(st.sampled_from(NAME_WORDS), max_size=3, unique=True)):
            if not hasattr(module, child):
                module.add_module(child, draw(named_trees(depth + 1)))
    return module


@settings(max_examples=80, deadline=None)
@given(tree=named_trees())
def test_fast_walk_matches_the_per_name_rules(tree):
    for info in classify_parameters(tree):
        path = info.name.split(".")[:-1]
        modules = [tree.get_submodule(".".join(path[:i])) for i in range(len(path) + 1)]
        by_type = any(isinstance(m, classify.NORM_LAYER_TYPES) for m in modules) or is_norm_module(modules[-1])
        assert info.is_norm is (by_type or is_norm_name(info.name)), info.name
        assert info.is_bias is is_bias_name(info.name), info.name
        assert not info.in_transformers_model


@settings(max_examples=80, deadline=None)
@given(tree=named_trees())
def test_transformers_exempt_is_transformers_own_decision(tree):
    # The oracle is transformers' own function, on trees of odd names, norm-named classes and
    # nn.LayerNorm leaves (exempt by type there, also with children).
    transformers = pytest.importorskip("transformers")
    decays = set(transformers.Trainer.get_decay_parameter_names(None, tree))
    for info in classify_parameters(tree):
        assert info.transformers_exempt is (info.name not in decays), info.name
