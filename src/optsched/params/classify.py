"""Classify every parameter of a model once: what it is, not what happens to it.

One pass over ``model.named_modules(remove_duplicate=False)`` turns each ``(name, tensor)`` pair into a
:class:`ParamInfo` record. Policies (``optsched.params.policies``) decide weight decay from these
records and the group builder (``optsched.params.groups``) forms groups from the decisions, so the
facts about a parameter are computed in one place and every later stage only reads them.

Two rules decide whether a parameter is a norm parameter or a bias; :func:`hf_decay_policy`
(``optsched.params.policies``) exempts both from weight decay.

**transformers' rule, exactly** (``ParamInfo.transformers_exempt``), what ``Trainer.create_optimizer``
decides (``get_decay_parameter_names`` in transformers 5): a parameter is exempt when a module on its
path below the model is an ``nn.LayerNorm`` (or subclass), or its lower-cased full name contains
``bias`` (as a substring), ``layernorm`` or ``rmsnorm``, or has ``norm`` as a whole component or a
component ending in ``_norm``. The ``"hf"`` policy applies it to every parameter inside a transformers
model (a ``PreTrainedModel``: ``ParamInfo.in_transformers_model``), so that the groups, and the optimizer states built on
them, are transformers' own on every model it ships (``tests/params/hf_grouping_sweep.py`` compares
them over ~1,000 model classes).

**The robust rule** (``ParamInfo.is_norm`` / ``is_bias``), for every other module, where names follow
no convention:

* **norm by type**: the parameter belongs to a torch norm layer or to a module nested inside one
  (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``LocalResponseNorm``, ``CrossMapLRN2d``, and through
  their common base ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``InstanceNorm1d/2d/3d`` and the lazy
  variants), or is owned directly by a module of a class with a base class whose name ends in
  ``Norm`` or ``Norm1d/2d/3d`` (a model's own ``MyRMSNorm``). Only directly: such a class may be a
  whole block (a ``ConvDropoutLayerNorm``, an adaptive ``AdaLayerNorm`` with its projections), and
  the ``Linear`` and ``Conv`` weights inside it decay;
* **norm by name**: transformers' patterns above;
* **bias**: a parameter whose own name (the last component) has ``bias`` as one of its
  ``_``-separated words (``bias``, ``in_proj_bias``, ``q_bias``, ``bias_ih_l0``,
  ``relative_position_bias_table``), or that lives in a module whose name ends with the word
  ``bias`` (T5's ``relative_attention_bias`` embedding is a table of biases). ``bias`` as a plain
  substring does not count: ``attn_bias_proj.weight`` is the weight of a projection, and decays.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "NORM_LAYER_TYPES",
    "ParamInfo",
    "classify_parameters",
    "is_bias_name",
    "is_norm_module",
    "is_norm_name",
    "is_transformers_model",
    "unwrap_compiled",
]

logger = logging.getLogger(__name__)

#: torch's norm layers; ``_NormBase`` is the base of every BatchNorm*, SyncBatchNorm and InstanceNorm*.
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
        nn.GroupNorm,
        nn.LocalResponseNorm,
        nn.CrossMapLRN2d,
        nn.modules.batchnorm._NormBase,
    )
    if cls is not None
)

# A class counts as a norm when it, or any base class, is named like one: LlamaRMSNorm, T5LayerNorm,
# MyBatchNorm2d. Case-sensitive so that e.g. "Transform" or "Abnormal" cannot match.
_NORM_CLASS_NAME = re.compile(r"Norm(?:[123]d)?$")

# transformers' forbidden_name_patterns (Trainer.get_decay_parameter_names) without r"bias", which
# is replaced by the word rule of is_bias_name. Matched against the lower-cased full name.
_HF_NORM_NAME = re.compile(r"layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")

_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

# type -> (a torch norm layer, named like a norm, a transformers model, an nn.LayerNorm): the facts
# the walk needs per module. Models have few distinct classes, so this makes the type tests O(1).
_class_facts_cache: dict[type, tuple[bool, bool, bool, bool]] = {}


class ParamInfo(NamedTuple):
    """What one name of one parameter tensor is. Immutable; a cheap tuple (models have 10^5 of them).

    Attributes:
        name: the full dotted name (``"encoder.layer.0.output.dense.weight"``).
        param: the tensor itself.
        module_type: the class of the module that owns the tensor directly.
        ndim: ``param.ndim``.
        is_norm: the robust rule: it belongs to a torch norm layer (also when nested inside one), is
            owned by a module whose class is named like a norm, or its name matches transformers'
            norm patterns.
        is_bias: the robust rule: its name marks it as a bias (see :func:`is_bias_name`).
        is_embedding: it is owned by ``nn.Embedding`` / ``nn.EmbeddingBag`` (or a subclass).
        frozen: ``requires_grad`` is False.
        tied: the same tensor is registered under more than one name (e.g. GPT-2's ``lm_head.weight``
            and ``transformer.wte.weight``).
        alias_of: ``None`` for the first name of a tensor in ``named_parameters()`` order (the name
            optimizers see); for a later name of a tied tensor, that first name.
        index: position of the tensor in ``model.named_parameters()`` (aliases share their tensor's).
        in_transformers_model: it lies inside a transformers model (a module whose class derives from
            ``transformers.PreTrainedModel``; the model itself, or a part of a larger one).
        transformers_exempt: transformers' Trainer leaves this name out of weight decay (its rule,
            exactly: ``nn.LayerNorm`` below the model on the path, ``bias`` anywhere in the name,
            its norm name patterns).
    """

    name: str
    param: torch.Tensor
    module_type: type
    ndim: int
    is_norm: bool
    is_bias: bool
    is_embedding: bool
    frozen: bool
    tied: bool
    alias_of: str | None
    index: int
    in_transformers_model: bool = False
    transformers_exempt: bool = False


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), or ``model`` itself.

    A compiled model holds the same parameter tensors as the module it wraps, under names prefixed with
    ``_orig_mod.``. Param groups (their ``param_names``, ``param_rules`` globs, layer ids) and checkpoint
    weights are named after the wrapped module, so that a compiled and an uncompiled model get the same
    groups, the same optimizer state and the same ``model.safetensors`` keys (those of transformers'
    Trainer with ``torch_compile=True``, which compiles a copy and saves the model), and a checkpoint
    moves between them. torch is not asked to import
    its compiler here: a model can only be compiled once ``torch._dynamo`` is imported.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def is_norm_module(module: nn.Module | type) -> bool:
    """Whether ``module`` (an instance or a class) is a normalisation layer.

    True for every torch norm class and its subclasses, and for any class with a base class named
    ``...Norm`` or ``...Norm1d/2d/3d``. Cached per class, so calling it on every module is cheap.
    """
    torch_norm, named_norm, _, _ = _class_facts(module if isinstance(module, type) else type(module))
    return torch_norm or named_norm


def is_transformers_model(module: nn.Module | type) -> bool:
    """Whether ``module`` (an instance or a class) is a transformers model: a subclass of
    ``transformers.PreTrainedModel``, recognised by name (transformers is not imported). Cached per class."""
    return _class_facts(module if isinstance(module, type) else type(module))[2]


def _class_facts(cls: type) -> tuple[bool, bool, bool, bool]:
    """``(torch norm layer, named like a norm, a transformers model, nn.LayerNorm)`` for a module class.

    A transformers model is a subclass of ``transformers.PreTrainedModel``, recognised by name so that
    transformers is never imported here.
    """
    facts = _class_facts_cache.get(cls)
    if facts is None:
        facts = _class_facts_cache[cls] = (
            issubclass(cls, NORM_LAYER_TYPES),
            any(_NORM_CLASS_NAME.search(base.__name__) for base in cls.__mro__),
            any(base.__name__ == "PreTrainedModel" and base.__module__.startswith("transformers.")
                for base in cls.__mro__),
            issubclass(cls, nn.LayerNorm),
        )
    return facts


def is_norm_name(name: str) -> bool:
    """Whether a full parameter name matches transformers' norm patterns (case-insensitive).

    The patterns: ``layernorm`` or ``rmsnorm`` anywhere, ``norm`` as a whole dotted component, or a
    component ending in ``_norm``. GPT-2's ``ln_f.weight`` does not match: its norm is found by type.

    >>> [is_norm_name(n) for n in ("encoder.norm.weight", "input_layernorm.weight", "ln_f.weight")]
    [True, True, False]
    """
    return _HF_NORM_NAME.search(name.lower()) is not None


def is_bias_name(name: str) -> bool:
    """Whether a full parameter name denotes a bias (case-insensitive).

    A bias is a parameter whose own name (last dotted component) contains the word ``bias`` (words
    are separated by ``_``), or any parameter of a module whose name's last word is ``bias``.

    >>> [is_bias_name(n) for n in ("fc.bias", "attn.q_bias", "lstm.bias_hh_l0",
    ...                             "block.relative_attention_bias.weight")]
    [True, True, True, True]
    >>> [is_bias_name(n) for n in ("attn_bias_proj.weight", "unbiased.weight", "biases")]
    [False, False, False]
    """
    lower = name.lower()
    if "bias" not in lower:  # the common case, decided without splitting
        return False
    *modules, own = lower.split(".")
    if "bias" in own.split("_"):
        return True
    return any(component.rpartition("_")[2] == "bias" for component in modules)


def classify_parameters(model: nn.Module) -> list[ParamInfo]:
    """One :class:`ParamInfo` for every name of every parameter of ``model``.

    Every name is listed, aliases of tied tensors and frozen tensors included: filter on
    ``alias_of is None`` for the unique tensors in ``model.named_parameters()`` order, and on
    ``frozen`` for what an optimizer should see.

    Runs in time linear in the number of modules and parameter names: one pre-order walk, set and dict
    look-ups only. Modules registered under several names are walked under each (as transformers'
    ``get_parameter_names`` does), so each alias is classified by its own path.

    Args:
        model: any ``torch.nn.Module``.

    Returns:
        Records in ``model.named_parameters(remove_duplicate=False)`` order; the first record of each
        tensor comes in ``model.named_parameters()`` order.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}.")

    infos: list[ParamInfo] = []
    first: dict[int, tuple[str, int, int]] = {}  # id(tensor) -> (first name, index, position in infos)
    tied: set[int] = set()
    make = tuple.__new__  # ParamInfo(...) without the keyword-parsing __new__: 40k records add up
    embedding_types = _EMBEDDING_TYPES
    class_facts = _class_facts_cache
    # Decisions on a parameter's own (local) name: there are few distinct ones ("weight", "bias").
    local_facts: dict[str, tuple[bool, bool, bool]] = {}

    # An explicit pre-order walk, the order of model.named_modules(remove_duplicate=False). Each
    # stack entry carries what the module path alone decides, so no full name is ever searched:
    #   in_norm:   the module or an ancestor is a torch norm layer. The root counts too: a bare
    #              nn.LayerNorm passed as the model is still a norm (transformers only tests children);
    #   name_norm: the path matches the norm name patterns. A match never spans two components (the
    #              patterns' "^|." and "$|." anchors are the component's own ends), so testing each
    #              component alone is the same as testing the full name;
    #   path_bias: a module on the path has a name whose last word is "bias" (see is_bias_name);
    #   in_hf:     the module or an ancestor is a transformers model;
    #   hf_exempt: what transformers' rule decides from the path: an nn.LayerNorm below the root, or
    #              "bias" in a component (a substring cannot span the "." either).
    stack: list[tuple[str, nn.Module, bool, bool, bool, bool, bool]] = [
        ("", model, False, False, False, False, False)
    ]
    is_root = True
    while stack:
        prefix, module, in_norm, name_norm, path_bias, in_hf, hf_exempt = stack.pop()
        cls = type(module)
        facts = class_facts.get(cls)
        if facts is None:
            facts = _class_facts(cls)
        torch_norm, named_norm, hf_model, layer_norm = facts
        in_norm = in_norm or torch_norm
        in_hf = in_hf or hf_model
        hf_exempt = hf_exempt or (layer_norm and not is_root)
        is_root = False
        dot_prefix = prefix + "." if prefix else ""
        children = module._modules
        if children:
            entries = []
            for child_name, child in children.items():
                if child is None:
                    continue
                lower = child_name.lower()
                entries.append(
                    (
                        dot_prefix + child_name,
                        child,
                        in_norm,
                        # every pattern contains "norm": most names are decided without the regex
                        name_norm or ("norm" in lower and _HF_NORM_NAME.search(lower) is not None),
                        path_bias or lower.rpartition("_")[2] == "bias",
                        in_hf,
                        hf_exempt or "bias" in lower,
                    )
                )
            stack.extend(reversed(entries))
        own = module._parameters
        if not own:
            continue
        module_norm = in_norm or named_norm or name_norm
        path_hf_exempt = hf_exempt or name_norm
        is_embedding = issubclass(cls, embedding_types)
        for local, param in own.items():
            if param is None:  # e.g. Linear(bias=False) registers bias=None
                continue
            facts_of_name = local_facts.get(local)
            if facts_of_name is None:
                lower = local.lower()
                facts_of_name = local_facts[local] = (
                    _HF_NORM_NAME.search("." + lower) is not None,
                    "bias" in lower.split("_"),
                    "bias" in lower,
                )
            name = dot_prefix + local
            key = id(param)
            seen = first.get(key)
            if seen is None:
                index = len(first)
                first[key] = (name, index, len(infos))
                alias_of = None
            else:
                alias_of, index, _ = seen
                tied.add(key)
            infos.append(
                make(
                    ParamInfo,
                    (
                        name,
                        param,
                        cls,
                        param.ndim,
                        module_norm or facts_of_name[0],
                        path_bias or facts_of_name[1],
                        is_embedding,
                        not param.requires_grad,
                        alias_of is not None,
                        alias_of,
                        index,
                        in_hf,
                        path_hf_exempt or facts_of_name[0] or facts_of_name[2],
                    ),
                )
            )
    # The first record of a tied tensor was made before its alias was met: mark it now (rare).
    for key in tied:
        position = first[key][2]
        infos[position] = infos[position]._replace(tied=True)
    if tied:
        logger.debug("%d parameter tensors are registered under more than one name", len(tied))
    return infos
