"""A checkpoint's ``torch.save`` files read as data (``weights_only=True``), checked as they are read.

:func:`safe_torch_load` loads on CPU with ``weights_only=True`` (a pickle that asks for code is refused
before it runs), reports a truncated or corrupted file as :class:`~optsched.trainer.integrity.CheckpointError`
naming it, and with ``verify="full"`` computes the file's CRC-32 from the bytes ``torch.load`` reads
(:class:`~optsched.trainer.crc.SharedFileCrc`), so that nothing parsed is returned before the file passed
its check against ``checksums.json`` (:mod:`optsched.trainer.integrity`).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from optsched._validation import check_choice
from optsched.trainer.crc import SharedFileCrc, crc32
from optsched.trainer.integrity import (
    DEFAULT_VERIFY,
    OVERLAP_MIN_BYTES,
    VERIFY_LEVELS,
    CheckpointError,
    _check_digest,
    _recorded_crc32,
    _running_beside,
    verified_while_parsing,
    verify_file,
)

__all__ = ["safe_torch_load"]


def safe_torch_load(
    path: str | os.PathLike,
    expect_keys: Sequence[str] = (),
    verify: str = DEFAULT_VERIFY,
    *,
    beside: Callable[[], None] | None = None,
) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; numpy's RNG-state types are allow-listed.

    ``weights_only`` unpickles tensors and plain containers only: a pickle that asks for any other
    callable (``os.system``, a class's ``__reduce__``) is refused before it runs.

    With ``verify="full"`` and a whole-file CRC-32 in ``checksums.json`` (what optsched writes), the
    CRC is computed from the bytes as ``torch.load`` reads them, a worker thread taking the records
    it has not reached yet (:class:`~optsched.trainer.crc.SharedFileCrc`): every byte is checked at
    almost no cost to the load, and nothing parsed is returned before the check passed; a file under
    :data:`~optsched.trainer.integrity.OVERLAP_MIN_BYTES` (scheduler, RNG state) is read once and
    checked before it is parsed. Other entries are checked beside the parser
    (:func:`verified_while_parsing`). A damaged file is reported in place of the parser's error.

    Args:
        path: the file.
        expect_keys: keys the loaded object must have (it must then be a dict).
        verify: how much to check against ``checksums.json`` (:data:`VERIFY_LEVELS`).
        beside: a task for the worker thread while the file is parsed (a resume loads the weights
            there); it runs before the worker's share of the CRC, and its error is raised in place
            of the load's.

    Raises:
        CheckpointError: checksum mismatch, a truncated / corrupted file, a pickle that would run code,
            or content without ``expect_keys``; each naming ``path``.
    """
    verify = check_choice("verify", verify, VERIFY_LEVELS, what="verification level")
    path = Path(path)
    expected = _recorded_crc32(path) if verify == "full" else None
    if expected is None:
        with verified_while_parsing(path, verify), _maybe_beside(beside):  # the CRC pass runs beside torch.load
            obj = _parse_torch_file(path, path)
    elif path.stat().st_size < OVERLAP_MIN_BYTES:  # scheduler, RNG, a small model's optimizer
        verify_file(path, "size")
        data = path.read_bytes()  # one read; the bytes parsed are the bytes checked, checked first
        _check_digest(path, "crc32", f"{crc32(data):08x}", expected)
        with _maybe_beside(beside):
            obj = _parse_torch_file(io.BytesIO(data), path)
    else:
        verify_file(path, "size")  # a truncated file is refused before anything reads it
        with SharedFileCrc(path) as shared:
            try:
                with _maybe_beside(_then(beside, shared.help)):  # a helper thread pays off at this size
                    obj = _parse_torch_file(shared.reader(), path)
            except CheckpointError:
                verify_file(path, "full")  # damaged bytes are the cause of the parser's error: say so
                raise
            digest = shared.value()
        _check_digest(path, "crc32", f"{digest:08x}", expected)
    if expect_keys:
        missing = [k for k in expect_keys if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise CheckpointError(
                f"{path} does not hold what it should: a dict with keys {list(expect_keys)} was expected, got "
                f"{type(obj).__name__}{' without ' + str(missing) if isinstance(obj, dict) else ''}."
            )
    return obj


def _maybe_beside(task: Callable[[], None] | None) -> Any:
    """:func:`_running_beside` for a task, no thread at all without one."""
    return _running_beside(task) if task is not None else nullcontext()


def _then(first: Callable[[], None] | None, second: Callable[[], None]) -> Callable[[], None]:
    """``first()`` (when given), then ``second()``."""

    def both() -> None:
        if first is not None:
            first()
        second()

    return both


def _parse_torch_file(source: Any, path: Path) -> Any:
    """:func:`_torch_load_weights_only` of ``source`` (a path or an open file), its errors as
    :class:`CheckpointError` naming ``path``. The allow-list is set up outside the ``try``: an error
    there is optsched's (an API this torch lacks), not the file's, and must not read as damage."""
    with _numpy_rng_types_allowed():
        try:
            return _torch_load_weights_only(source)
        except pickle.UnpicklingError as exc:
            first = " ".join(str(exc).split())[:300]
            raise CheckpointError(
                f"{path} refused: its pickle asks for something other than tensors and plain containers, "
                f"which could run code, so it was not loaded (torch.load weights_only=True: {first})."
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise CheckpointError(
                f"{path} is damaged: cannot be read as a torch file ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:300]})."
            ) from None


def _torch_load_weights_only(source: Any) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (inside :func:`_numpy_rng_types_allowed`)."""
    return torch.load(source, map_location="cpu", weights_only=True)


def _numpy_rng_types_allowed() -> Any:
    """A context in which ``weights_only`` loads also accept numpy's RNG-state types (arrays, dtypes:
    data, nothing that runs code). From torch 2.5 on, ``safe_globals`` scopes them to the context; torch
    2.4 has only the process-wide list (and allows ``_codecs.encode``, how a numpy array's bytes are
    pickled, only from 2.5 on), so there they are added to it for good."""
    allow: list[Any] = []
    try:
        import numpy as np

        allow = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        core = getattr(np, "_core", None) or np.core
        allow.append(core.multiarray._reconstruct)
    except ImportError:  # numpy is optional: without it there is no numpy state to load either
        pass
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(allow)
    import _codecs

    present = torch.serialization.get_safe_globals()  # a list in torch 2.4: add each entry once, not per load
    torch.serialization.add_safe_globals([g for g in (*allow, _codecs.encode) if g not in present])
    return nullcontext()
