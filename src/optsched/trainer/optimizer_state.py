"""``optimizer.pt``: an optimizer's ``state_dict()`` saved so that it loads with ``weights_only=True``.

Plain objects of the state (GaLore / APOLLO projectors) are stored as class path and attributes
(:func:`encode_objects`) and rebuilt from the live optimizer's own packages only (:func:`decode_objects`);
small state tensors share one zip record (:func:`pack_small_tensors`); the file is written with its CRC-32
for ``checksums.json`` (:func:`save_optimizer_state`), read through
:func:`~optsched.trainer.torch_files.safe_torch_load` (:func:`read_optimizer_state`), and loaded into an
optimizer only once its parameter groups still fit it (:func:`load_optimizer_state`,
:func:`check_param_groups_match`); Python's garbage collector is paused meanwhile (:func:`gc_paused`).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from optsched.trainer.crc import torch_save_with_crc
from optsched.trainer.integrity import (
    CHECKSUM_ALGORITHM,
    DEFAULT_VERIFY,
    CheckpointError,
    _remember_checksum,
    checksum_in_background,
)
from optsched.trainer.torch_files import safe_torch_load

__all__ = [
    "OBJECT_KEY",
    "OPTIMIZER_NAME",
    "PACK_MAX_BYTES",
    "WRITER_CRC_MIN_BYTES",
    "check_param_groups_match",
    "decode_objects",
    "encode_objects",
    "gc_paused",
    "load_optimizer_state",
    "membership_parts",
    "moved_names",
    "pack_small_tensors",
    "read_optimizer_state",
    "save_optimizer_state",
    "trusted_packages",
    "unpack_small_tensors",
]

OPTIMIZER_NAME = "optimizer.pt"


# ---- optimizer state: objects stored as data -------------------------------------------------------

#: Marks an object of the optimizer state stored as its class path and attributes (see encode_objects).
OBJECT_KEY = "__optsched_object__"
_UNTRUSTED_PACKAGES = frozenset({"builtins", "torch"})  # torch's optimizers keep tensors and numbers only


def encode_objects(value: Any) -> Any:
    """The optimizer state with each plain-attribute object as ``{OBJECT_KEY: "module:qualname", "attributes"}``.

    GaLore / APOLLO keep a projector object per parameter in their state; pickled as is, ``torch.load``
    with ``weights_only=True`` refuses it on resume. Tensors, numbers, strings and containers are kept;
    an object without ``__dict__`` (or of a torch / builtin class) is left to torch's pickler.
    """
    if value is None or isinstance(value, (torch.Tensor, str, bytes, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {k: encode_objects(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encode_objects(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(encode_objects(v) for v in value)
    cls = type(value)
    if not _is_plain_object(value) or cls.__module__.split(".")[0] in _UNTRUSTED_PACKAGES:
        return value
    attributes = vars(value)
    path = f"{cls.__module__}:{cls.__qualname__}"
    return {OBJECT_KEY: path, "attributes": encode_objects(dict(attributes))}


#: ``object.__getstate__`` (Python >= 3.11; ``None`` on 3.10, where ``object`` has none).
_OBJECT_GETSTATE = getattr(object, "__getstate__", None)


def _is_plain_object(value: Any) -> bool:
    """An object pickle would rebuild as ``cls.__new__(cls)`` + its ``__dict__``: no custom reduce or state
    protocol, no ``__slots__`` (so ``vars`` is its whole state)."""
    cls = type(value)
    return (
        isinstance(getattr(value, "__dict__", None), dict)
        and not hasattr(cls, "__slots__")
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and getattr(cls, "__getstate__", _OBJECT_GETSTATE) is _OBJECT_GETSTATE
        and not hasattr(cls, "__setstate__")
        and cls.__new__ is object.__new__
    )


def trusted_packages(optimizer: Any) -> frozenset[str]:
    """Top-level packages of the optimizer's class and of its per-parameter optimizers' classes."""
    classes = [type(optimizer), getattr(optimizer, "optimizer_cls", None)]
    per_parameter = getattr(optimizer, "optimizer_dict", None) or {}
    inner = getattr(optimizer, "optimizers", None) or list(per_parameter.values())
    classes += [type(o) for o in inner if isinstance(o, torch.optim.Optimizer)]
    packages = {c.__module__.split(".")[0] for c in classes if isinstance(c, type)}
    return frozenset(packages - _UNTRUSTED_PACKAGES)


def decode_objects(value: Any, trusted: frozenset[str], where: str) -> Any:
    """Rebuild what :func:`encode_objects` tagged, without running any constructor or import.

    An object is rebuilt only when its class lives in a module already imported from one of the
    ``trusted`` packages (those of the live optimizer, :func:`trusted_packages`): ``cls.__new__(cls)``
    then its attributes.

    Raises:
        CheckpointError: a tagged object of another package, or whose class cannot be found.
    """
    if isinstance(value, dict):
        if OBJECT_KEY not in value:
            return {k: decode_objects(v, trusted, where) for k, v in value.items()}
        path = str(value[OBJECT_KEY])
        module_name, _, qualname = path.partition(":")
        cls: Any = sys.modules.get(module_name) if module_name.split(".")[0] in trusted else None
        for part in qualname.split(".") if cls is not None else ():
            cls = getattr(cls, part, None)
        attributes = value.get("attributes")
        plain = isinstance(cls, type) and cls.__new__ is object.__new__ and not hasattr(cls, "__slots__")
        if not plain or not isinstance(attributes, dict):
            raise CheckpointError(
                f"{where} holds an object of {path!r}, which is not a class of the optimizer's own packages "
                f"({', '.join(sorted(trusted)) or 'none'}) already imported; it was not rebuilt (a checkpoint "
                "of another optimizer, or an untrusted file)."
            )
        obj = cls.__new__(cls)
        obj.__dict__.update(decode_objects(attributes, trusted, where))
        return obj
    if isinstance(value, list):
        return [decode_objects(v, trusted, where) for v in value]
    if isinstance(value, tuple):
        return tuple(decode_objects(v, trusted, where) for v in value)
    return value


#: Optimizer-state tensors of at most this many bytes (AdamW's 0-d ``step``) are saved as views of one
#: tensor per dtype and device (:func:`pack_small_tensors`).
PACK_MAX_BYTES = 64


def pack_small_tensors(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of an optimizer ``state_dict`` whose small state tensors are views of one packed tensor.

    ``torch.save`` writes every storage as a zip record of its own, with ~130 bytes of local and central
    headers and padding to 64 bytes: a 4-byte ``step`` costs ~190 bytes on disk and one record read on
    load. Viewing each tensor of at most :data:`PACK_MAX_BYTES` bytes into one tensor per (dtype,
    device) stores them all in one record (AdamW on a 120-tensor model: 119 records and ~22 KB fewer)
    with the same values. ``torch.load`` gives views back; :func:`unpack_small_tensors` turns them into
    tensors of their own (transformers' loader takes the views as they are, which torch's optimizers
    handle: each view is its own element). The live optimizer state is not touched.

    Only ``state[param_id][key]`` tensors are packed; any other layout is returned as it is.
    """
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(state, dict):
        return state_dict
    small: dict[tuple[torch.dtype, torch.device], list[tuple[Any, str, torch.Tensor]]] = {}
    for pid, key, value in _small_state_tensors(state):
        if (
            type(value) is torch.Tensor  # not a subclass (DTensor, quantized 8-bit states)
            and value.layout == torch.strided
            and not value.requires_grad
        ):
            small.setdefault((value.dtype, value.device), []).append((pid, key, value))
    packed_state = dict(state)
    for members in small.values():
        if len(members) < 2:
            continue
        # grouped by shape: one stack per shape, one cat, and one unbind per shape gives every view
        # (a reshape and a view per tensor took 0.47 s for 20k parameters' steps and bias moments)
        by_shape: dict[torch.Size, list[tuple[Any, str, torch.Tensor]]] = {}
        for member in members:
            by_shape.setdefault(member[2].shape, []).append(member)
        groups = list(by_shape.items())
        flat = torch.cat([torch.stack([value for _, _, value in group]).reshape(-1) for _, group in groups])
        offset = 0
        for shape, group in groups:
            size = len(group) * shape.numel()
            views = flat[offset : offset + size].view(len(group), *shape).unbind(0)
            offset += size
            for (pid, key, _), view in zip(group, views):
                if packed_state[pid] is state[pid]:
                    packed_state[pid] = dict(state[pid])
                packed_state[pid][key] = view
    return {**state_dict, "state": packed_state}


def unpack_small_tensors(state_dict: Any) -> Any:
    """Give each small state tensor that :func:`pack_small_tensors` stored as a view its own storage, in place.

    Returns ``state_dict``. After this the loaded state is laid out as the optimizer made it: no two
    entries share memory, and resizing or replacing one never touches another.
    """
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    for pid, key, value in _small_state_tensors(state) if isinstance(state, dict) else ():
        if value.untyped_storage().nbytes() > value.nbytes:
            state[pid][key] = value.clone()
    return state_dict


def _state_tensors(state: dict[Any, Any]) -> Iterator[tuple[Any, str, torch.Tensor]]:
    """``(param_id, key, tensor)`` for each tensor ``state[param_id][key]`` of an optimizer state."""
    for pid, entry in state.items():
        if isinstance(entry, dict):
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    yield pid, key, value


def _small_state_tensors(state: dict[Any, Any]) -> list[tuple[Any, str, torch.Tensor]]:
    """``(param_id, key, tensor)`` for each tensor of at most :data:`PACK_MAX_BYTES` in ``state[param_id][key]``."""
    return [item for item in _state_tensors(state) if item[2].nbytes <= PACK_MAX_BYTES]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (on again after, if it was on).

    Building, pickling or unpickling an optimizer state allocates a few Python objects per tensor; with
    thousands of tensors the collector runs again and again over the whole growing state and finds
    nothing to free. 20k parameters with AdamW: packing 0.30 -> 0.09 s, ``torch.save`` 1.6-2.2 ->
    1.2 s, ``torch.load`` 2.8-3.4 -> 2.55 s. (The setting is process-wide: another thread meanwhile
    simply collects later.)
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def save_optimizer_state(optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> Path:
    """Write ``optimizer.pt``: ``optimizer.state_dict()`` with its plain objects encoded (:func:`encode_objects`)
    and its small tensors packed into one record per dtype (:func:`pack_small_tensors`)."""
    path = Path(directory) / OPTIMIZER_NAME
    with gc_paused():
        _save_state_dict(pack_small_tensors(encode_objects(optimizer.state_dict())), path)
    return path


def _save_state_dict(state_dict: dict[str, Any], path: Path) -> None:
    count, nbytes = _state_tensor_sizes(state_dict)
    if nbytes >= WRITER_CRC_MIN_BYTES * max(count, 1):
        # torch.save with its record CRC-32s filled in by zlib-ng while it writes (~60 ms less per 400 MB
        # than torch's own), which also gives checksums.json the whole file's CRC without a pass over it
        digest = torch_save_with_crc(state_dict, path)
        _remember_checksum(path, CHECKSUM_ALGORITHM, f"{digest:08x}")
    else:
        # many small records: each costs Python calls through a file object (~8 us) that torch's own
        # C++ writer does not make; its CRC pass is cheap on so few bytes, and ours runs on a worker
        torch.save(state_dict, path)
        checksum_in_background(path)


#: Average bytes per optimizer-state tensor from which ``optimizer.pt`` is written through
#: :func:`~optsched.trainer.crc.torch_save_with_crc`: it saves torch's CRC pass (~0.15 ms per MB here)
#: but costs ~8 us per record (five Python ``write`` calls and the bookkeeping); even at ~64 KiB.
WRITER_CRC_MIN_BYTES = 64 << 10


def _state_tensor_sizes(state_dict: dict[str, Any]) -> tuple[int, int]:
    """Number and total bytes of the storages (``torch.save`` records) of an optimizer state's tensors.

    A wrapper tensor subclass (torchao's 4-/8-bit moments, a ``DTensor``) has no storage of its own:
    its inner tensors' storages are counted (``__tensor_flatten__``).
    """
    storages: dict[tuple[str, int], int] = {}
    state = state_dict.get("state")
    for _, _, value in _state_tensors(state) if isinstance(state, dict) else ():
        for tensor in _storage_tensors(value):
            storage = tensor.untyped_storage()
            storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return len(storages), sum(storages.values())


def _storage_tensors(value: torch.Tensor) -> Iterator[torch.Tensor]:
    """``value``, or for a traceable wrapper subclass the plain tensors it is made of, recursively."""
    flatten = getattr(value, "__tensor_flatten__", None)
    if type(value) is torch.Tensor or not callable(flatten):
        yield value
        return
    names, _ = flatten()
    for name in names:
        inner = getattr(value, name)
        if isinstance(inner, torch.Tensor):
            yield from _storage_tensors(inner)


def read_optimizer_state(
    checkpoint: str | os.PathLike, verify: str = DEFAULT_VERIFY, *, beside: Callable[[], None] | None = None
) -> dict[str, Any]:
    """``checkpoint/optimizer.pt`` as saved (:func:`safe_torch_load`, ``beside`` passed on), for
    :func:`load_optimizer_state`.

    Raises:
        CheckpointError: a damaged or untrusted file, or not a dict with ``state`` and ``param_groups``.
    """
    with gc_paused():
        return safe_torch_load(
            Path(checkpoint) / OPTIMIZER_NAME, expect_keys=("state", "param_groups"), verify=verify, beside=beside
        )


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    checkpoint: str | os.PathLike,
    verify: str = DEFAULT_VERIFY,
    saved: dict[str, Any] | None = None,
) -> None:
    """Load ``checkpoint/optimizer.pt`` into ``optimizer`` after checking that its groups still fit.

    Read with :func:`read_optimizer_state` (``weights_only=True``) unless ``saved`` is what it returned
    already, objects rebuilt from the optimizer's own packages only (:func:`decode_objects`), small
    tensors unpacked (:func:`unpack_small_tensors`), groups compared with
    :func:`check_param_groups_match` before ``optimizer.load_state_dict``: on any error the optimizer
    is left as it was.

    Raises:
        CheckpointError: a damaged or untrusted file, or an object of another package (names the file).
        ValueError: the parameter groups no longer match the model.
    """
    path = Path(checkpoint) / OPTIMIZER_NAME
    if saved is None:
        saved = read_optimizer_state(checkpoint, verify)
    with gc_paused():
        saved = unpack_small_tensors(decode_objects(saved, trusted_packages(optimizer), str(path)))
        check_param_groups_match(optimizer.param_groups, saved["param_groups"], str(path))
        optimizer.load_state_dict(saved)


def moved_names(removed: Sequence[str], added: Sequence[str], old_all: set[str], new_all: set[str]) -> set[str]:
    """Of the names a param group lost (``removed``) or gained (``added``) since the checkpoint, those that
    are in another group on the other side (``new_all`` / ``old_all``: every name of the new / saved
    groups): moved between groups (``param_rules``, ``layerwise_lr_decay``), not frozen, unfrozen, added
    or removed."""
    return {n for n in removed if n in new_all} | {n for n in added if n in old_all}


def membership_parts(
    removed: Sequence[str], added: Sequence[str], moved: set[str], wording: tuple[str, str, str, str]
) -> list[str]:
    """The phrases that describe a param group whose names changed, ``"<words>: [names]"``, for the names
    removed (in no group now), added (in no group before), removed but in another group now, and added
    from another group (``moved``: :func:`moved_names`), in that order; ``wording`` gives the four
    ``<words>``. Kinds without a name are left out."""
    kinds = (
        [n for n in removed if n not in moved],
        [n for n in added if n not in moved],
        [n for n in removed if n in moved],
        [n for n in added if n in moved],
    )
    return [f"{words}: {names}" for words, names in zip(wording, kinds) if names]


_LOAD_WORDING = (
    "in the checkpoint but not trained now (frozen or removed)",
    "trained now but not in the checkpoint (unfrozen or added)",
    "in another group now",
    "in another group in the checkpoint",
)


def check_param_groups_match(
    current_groups: Sequence[dict[str, Any]], saved_groups: Sequence[dict[str, Any]], source: str
) -> None:
    """Refuse an optimizer state whose parameter groups no longer fit the optimizer built for the model.

    Groups are compared by position: their ``name`` and ``param_names`` when both sides carry them
    (optsched's groups do), else by parameter count. Run this before ``optimizer.load_state_dict``.

    Raises:
        ValueError: naming each group that differs and the parameters in only one of the two.
    """
    problems: list[str] = []

    def label(group: dict[str, Any], i: int) -> str:
        return f"group {i} ({group['name']!r})" if "name" in group else f"group {i}"

    if len(current_groups) != len(saved_groups):
        cur = [g.get("name", str(i)) for i, g in enumerate(current_groups)]
        old = [g.get("name", str(i)) for i, g in enumerate(saved_groups)]
        problems.append(f"the checkpoint has {len(saved_groups)} groups {old}, the optimizer has {len(current_groups)} {cur}")
    cur_all = {n for g in current_groups for n in g.get("param_names") or ()}
    old_all = {n for g in saved_groups for n in g.get("param_names") or ()}
    regrouped = False
    for i, (cur, old) in enumerate(zip(current_groups, saved_groups)):
        if "name" in cur and "name" in old and cur["name"] != old["name"]:
            problems.append(f"group {i} is named {cur['name']!r} now but {old['name']!r} in the checkpoint")
        cur_names, old_names = cur.get("param_names"), old.get("param_names")
        if cur_names is not None and old_names is not None:
            if list(cur_names) == list(old_names):
                continue
            added = [n for n in cur_names if n not in set(old_names)]
            removed = [n for n in old_names if n not in set(cur_names)]
            moved = moved_names(removed, added, old_all, cur_all)
            regrouped = regrouped or bool(moved)
            parts = membership_parts(removed, added, moved, _LOAD_WORDING) or ["same parameters in a different order"]
            problems.append(f"{label(cur, i)}: " + "; ".join(parts))
        elif len(cur["params"]) != len(old["params"]):
            problems.append(
                f"{label(cur, i)} has {len(cur['params'])} parameters now but {len(old['params'])} in the checkpoint"
            )
    if problems:
        cause, restore = "a parameter was frozen, unfrozen, added or removed", "the model's trainable parameters"
        if regrouped:
            cause = ("parameters moved between groups (param_rules, layerwise_lr_decay or the decay policy "
                     "changed), or were frozen, unfrozen, added or removed")
            restore = "the model's trainable parameters and the arguments that group them (param_rules, layerwise_lr_decay)"
        raise ValueError(
            f"Cannot resume the optimizer from {source}: its parameter groups no longer match the model "
            f"({cause} since the checkpoint was saved):\n  - "
            + "\n  - ".join(problems)
            + f"\nRestore {restore} as they were, or start from the checkpoint's weights "
            "with a fresh optimizer (load model.safetensors yourself and call train() without resume_from_checkpoint)."
        )
