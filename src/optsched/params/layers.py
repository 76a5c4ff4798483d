"""Layer-wise learning-rate decay: which layer each parameter is in, and its lr scale.

With ``L`` transformer blocks and a decay ``d`` in (0, 1] (``TrainingArguments.layerwise_lr_decay``)::

    layer id i:  0 = embeddings,  1..L = the blocks (block N is layer N + 1),  L + 1 = the head
    lr(i)     =  base_lr * d ** (L + 1 - i)

so the head trains at the base lr, the last block at ``base_lr * d``, the embeddings at
``base_lr * d ** (L + 1)`` (BEiT / ELECTRA / timm's layer decay).

**Blocks** are found by name: the first dotted component named one of :data:`BLOCK_CONTAINERS`
(``layer``, ``layers``, ``h``, ``block``, ``blocks``, ``resblocks``) followed by an integer ``N``:
``encoder.layer.N`` (BERT), ``model.layers.N`` (Llama), ``transformer.h.N`` / ``h.N`` (GPT-2),
``blocks.N`` (ViT), ``layers.N``, ``decoder.layers.N``, ``encoder.block.N`` (T5),
``transformer.resblocks.N`` (CLIP). A model with several stacks (``encoder.block.N`` then
``decoder.block.N``) has them numbered one after the other, in the order the model registers them:
the decoder's block 0 comes after the encoder's last block. ``layer_id_fn(name) -> int | None``
replaces the name patterns: it returns the block index ``N`` of a parameter (what the ``N`` of
``layers.N`` would be), or ``None`` for a parameter in no block.

**Parameters in no block** are the embeddings (layer 0) when they are embedding-like (owned by an
``nn.Embedding``, or a name component with the word ``embed``/``embeddings``/``token``:
``embeddings.LayerNorm.weight``, ``patch_embed.proj.weight``, ``cls_token``, ``pos_embed``) or
registered before the first block; every other one is the head (layer ``L + 1``: final norm,
pooler, ``lm_head``, classifier). A tied output head is decided by its first name (GPT-2's
``lm_head.weight`` is ``transformer.wte.weight``: layer 0).

``L`` and the ids count every tensor of the model, frozen ones included (timm's layer decay does the
same): freezing a block, or the top blocks, changes no other parameter's lr, and a model whose blocks
are all frozen still has its embeddings at layer 0 and its head at ``L + 1``.

A model in which no block is found is a ``ValueError``, never a silent no-op.
"""

from __future__ import annotations

import importlib
import logging
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from optsched._validation import check_number, did_you_mean
from optsched.params.classify import ParamInfo, classify_parameters

__all__ = [
    "BLOCK_CONTAINERS",
    "LayerIdFn",
    "assign_layer_ids",
    "callable_path",
    "check_layerwise_lr_decay",
    "get_layer_ids",
    "import_callable",
    "infer_block_index",
    "layer_lr_scale",
    "resolve_layer_id_fn",
    "trainable_layer_ids",
]

logger = logging.getLogger(__name__)

LayerIdFn = Callable[[str], "int | None"]

#: Names of the module lists that hold a model's repeated blocks (followed by the block index).
BLOCK_CONTAINERS: tuple[str, ...] = ("layer", "layers", "h", "block", "blocks", "resblocks")
_BLOCK = re.compile(r"(?:^|\.)(?:" + "|".join(BLOCK_CONTAINERS) + r")\.(\d+)(?:\.|$)")
_EMBED_WORDS = frozenset({"embed", "embeds", "embedding", "embeddings", "token", "tokens"})


def check_layerwise_lr_decay(field: str, value: Any) -> float | None:
    """``None`` (off) or a float in (0, 1]; 1 keeps every lr but still requires blocks to be found."""
    if value is None:
        return None
    return float(check_number(field, value, low=0.0, high=1.0, low_open=True))


def layer_lr_scale(layer_id: int, num_layers: int, decay: float) -> float:
    """``decay ** (num_layers + 1 - layer_id)``: 1 for the head (``L + 1``), ``decay`` for the last block.

    >>> [round(layer_lr_scale(i, 2, 0.5), 3) for i in range(4)]
    [0.125, 0.25, 0.5, 1.0]
    """
    return decay ** (num_layers + 1 - layer_id)


def infer_block_index(name: str) -> tuple[str, int] | None:
    """``(stack prefix, N)`` for a name in a block (``"encoder.layer.3.x"`` -> ``("encoder.layer.", 3)``).

    >>> infer_block_index("model.layers.11.mlp.up_proj.weight")
    ('model.layers.', 11)
    >>> infer_block_index("lm_head.weight") is None
    True
    """
    match = _BLOCK.search(name)
    if match is None:
        return None
    return name[: match.start(1)], int(match.group(1))


def _is_embedding_like(info: ParamInfo) -> bool:
    if info.is_embedding:
        return True
    return any(
        not _EMBED_WORDS.isdisjoint(component.split("_")) for component in info.name.lower().split(".")
    )


def callable_path(fn: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` when importing that path gives ``fn`` back, else ``None`` (lambdas, closures)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    try:
        return f"{module}:{qualname}" if _import_path(f"{module}:{qualname}") is fn else None
    except (ImportError, AttributeError):
        return None


def _import_path(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep:  # "pkg.module.function"
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(path)
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def resolve_layer_id_fn(value: Any, field: str = "layer_id_fn") -> LayerIdFn | None:
    """``None``, a callable ``name -> int | None``, or an import path ``"module:function"`` -> the callable.

    Raises:
        ValueError: a path that cannot be imported or names nothing (with "did you mean").
        TypeError: neither a callable, a string nor ``None``; a path to something not callable.
    """
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"{field} must be a callable name -> int | None, an import path 'module:function' or None, "
            f"got {type(value).__name__} {value!r}."
        )
    return import_callable(value, field, "a callable name -> int | None")


def import_callable(value: str, field: str, what: str) -> Callable[..., Any]:
    """The callable an import path ``"module:function"`` (or ``"module.function"``) names.

    Raises:
        ValueError: a path that cannot be imported or names nothing (with "did you mean").
        TypeError: the path names something that is not callable (``what`` says what was expected).
    """
    module_name, sep, attr = value.partition(":")
    if not sep:
        module_name, _, attr = value.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{field}={value!r} is not an import path; accepted: 'module:function'.")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{field}={value!r}: cannot import module {module_name!r} ({exc}).") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise ValueError(
                f"{field}={value!r}: {module_name!r} has no attribute {attr!r}.{did_you_mean(part, names)}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{field}={value!r} is a {type(target).__name__}, not {what}.")
    return target


def _block_indices(infos: Sequence[ParamInfo], layer_id_fn: LayerIdFn | None) -> list[int | None]:
    """The global block index of each record, or ``None`` (stacks numbered one after the other)."""
    if layer_id_fn is not None:
        out: list[int | None] = []
        for info in infos:
            index = layer_id_fn(info.name)
            if index is not None and (not isinstance(index, numbers.Integral) or isinstance(index, bool)):
                raise TypeError(
                    f"layer_id_fn must return an int or None, got {type(index).__name__} {index!r} for "
                    f"parameter {info.name!r}."
                )
            if index is not None and index < 0:
                raise ValueError(
                    f"layer_id_fn returned {index!r} for parameter {info.name!r}; accepted: a block "
                    "index >= 0 (the N of 'layers.N') or None for a parameter in no block."
                )
            out.append(None if index is None else int(index))
        return out
    found = [infer_block_index(info.name) for info in infos]
    depth: dict[str, int] = {}  # stack prefix -> number of blocks, in registration order
    for hit in found:
        if hit is not None:
            depth[hit[0]] = max(depth.get(hit[0], 0), hit[1] + 1)
    offsets, total = {}, 0
    for prefix, n in depth.items():
        offsets[prefix] = total
        total += n
    if len(depth) > 1:
        logger.info("layer-wise lr decay: %d block stacks numbered in order: %s", len(depth), dict(depth))
    return [None if hit is None else offsets[hit[0]] + hit[1] for hit in found]


def assign_layer_ids(
    infos: Sequence[ParamInfo], layer_id_fn: LayerIdFn | None = None
) -> tuple[list[int], int]:
    """The layer id of each record (0 embeddings, ``1..L`` blocks, ``L + 1`` head) and ``L``.

    Args:
        infos: :class:`ParamInfo` records (as :func:`optsched.params.classify_parameters` gives;
            usually the trainable first names).
        layer_id_fn: returns a name's block index or ``None``; replaces the name patterns.

    Raises:
        ValueError: no record is in a block (the message shows some names and how to fix it).
    """
    blocks = _block_indices(infos, layer_id_fn)
    in_block = [b for b in blocks if b is not None]
    if not in_block:
        sample = ", ".join(repr(info.name) for info in infos[:6]) + (", ..." if len(infos) > 6 else "")
        how = (
            "layer_id_fn returned None for every parameter"
            if layer_id_fn is not None
            else "no parameter name has a block container followed by an index ("
            + ", ".join(f"'{c}.N'" for c in BLOCK_CONTAINERS) + ")"
        )
        raise ValueError(
            f"layerwise_lr_decay needs the model's layers, but {how}. Parameter names: {sample}. "
            "Accepted: a model with such names, or layer_id_fn=<function name -> block index or None> "
            "(an import path 'module:function' from YAML/CLI)."
        )
    num_layers = max(in_block) + 1
    first_block = min(info.index for info, b in zip(infos, blocks) if b is not None)
    head = num_layers + 1
    ids = [
        b + 1 if b is not None else (0 if info.index < first_block or _is_embedding_like(info) else head)
        for info, b in zip(infos, blocks)
    ]
    return ids, num_layers


def get_layer_ids(model: nn.Module, layer_id_fn: LayerIdFn | str | None = None) -> dict[str, int]:
    """``{name: layer id}`` for the trainable parameters of ``model`` (first names of tied tensors).

    Example:
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed = nn.Embedding(10, 4)
        ...         self.layers = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(2))
        ...         self.head = nn.Linear(4, 2, bias=False)
        >>> get_layer_ids(Net())
        {'embed.weight': 0, 'layers.0.weight': 1, 'layers.1.weight': 2, 'head.weight': 3}

    Raises:
        ValueError: no layer found (see :func:`assign_layer_ids`); a bad ``layer_id_fn`` path.
    """
    infos = classify_parameters(model)
    by_index, _ = trainable_layer_ids(infos, resolve_layer_id_fn(layer_id_fn))
    return {info.name: by_index[info.index] for info in infos if info.index in by_index and info.alias_of is None}


def trainable_layer_ids(
    infos: Sequence[ParamInfo], layer_id_fn: LayerIdFn | None = None
) -> tuple[dict[int, int], int]:
    """The layer id of each trainable tensor, by its ``ParamInfo.index``, and ``L``.

    The ids and ``L`` are numbered over every tensor of the model (the first name of each), frozen ones
    included (see the module docstring): freezing a block changes no other lr.

    Args:
        infos: :func:`optsched.params.classify_parameters` of the model (every record).
        layer_id_fn: as for :func:`assign_layer_ids`.

    Raises:
        ValueError: no record is in a block (see :func:`assign_layer_ids`).
    """
    firsts = [info for info in infos if info.alias_of is None]
    ids, num_layers = assign_layer_ids(firsts, layer_id_fn)
    return {info.index: layer for info, layer in zip(firsts, ids) if not info.frozen}, num_layers
