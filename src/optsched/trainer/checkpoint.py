"""Checkpoint files in transformers' layout, written atomically, and the checks a resume needs.

``output_dir/checkpoint-{global_step}/`` holds::

    model.safetensors      weights (tied tensors stored once; safetensors refuses shared storage)
    optimizer.pt           optimizer.state_dict()       (param groups carry ``name`` / ``param_names``)
    scheduler.pt           lr_scheduler.state_dict()
    scaler.pt              GradScaler state (fp16 only)
    rng_state.pth          python / numpy / torch CPU / CUDA RNG states (rng_state_{rank}.pth under DDP)
    trainer_state.json     TrainerState
    training_args.json     the arguments, as JSON
    optsched_plan.json     the resolved plan: groups and settings, schedule spec (optsched.trainer.resume)
    checksums.json         size and SHA-256 of every other file (optsched; absent in transformers' checkpoints)

A checkpoint is first written to ``output_dir/.tmp-checkpoint-{step}`` and renamed into place when every
file is there, so an interrupted save leaves no half checkpoint under a ``checkpoint-*`` name; a
directory without ``trainer_state.json`` and ``model.safetensors`` is never picked for a resume.
Every load goes through ``torch.load(weights_only=True)``, safetensors or JSON: a checkpoint file is
data, never code. A file that cannot be read (truncated, corrupted, a pickle that asks for code, a
size or SHA-256 that differs from ``checksums.json``) raises :class:`CheckpointError` naming the file
and what is wrong; loading never writes anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from optsched.trainer.distributed import DistributedContext, barrier

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKSUMS_NAME",
    "CheckpointError",
    "OPTIMIZER_NAME",
    "PREFIX_CHECKPOINT_DIR",
    "RNG_STATE_NAME",
    "SCALER_NAME",
    "SCHEDULER_NAME",
    "TRAINER_STATE_NAME",
    "TRAINING_ARGS_NAME",
    "WEIGHTS_NAME",
    "check_param_groups_match",
    "get_last_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "load_rng_state",
    "load_trainer_state",
    "verify_file",
    "write_checksums",
    "rotate_checkpoints",
    "safe_torch_load",
    "save_model_weights",
    "save_rng_state",
    "staged_checkpoint",
]

PREFIX_CHECKPOINT_DIR = "checkpoint"
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
RNG_STATE_NAME = "rng_state.pth"
CHECKSUMS_NAME = "checksums.json"
_TMP_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_REQUIRED_FILES = (TRAINER_STATE_NAME, WEIGHTS_NAME)


class CheckpointError(ValueError):
    """A checkpoint file is damaged, incomplete or untrusted; the message names the file and the fault."""


# ---- integrity ------------------------------------------------------------------------------------


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()  # chunked: hashlib.file_digest needs Python 3.11
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | os.PathLike) -> Path:
    """Write ``checksums.json``: ``{"algorithm": "sha256", "files": {name: {"size", "sha256"}}}``.

    Covers every regular file in ``directory`` (not in sub-directories), so a later load can tell a
    truncated or bit-flipped file from a good one before parsing it.
    """
    directory = Path(directory)
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != CHECKSUMS_NAME
    }
    path = directory / CHECKSUMS_NAME
    path.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _recorded_checksums(directory: Path) -> dict[str, Any] | None:
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged: not the checksum JSON optsched writes ({exc}).") from None
    return files


def verify_file(path: str | os.PathLike) -> None:
    """Check ``path`` against the size and SHA-256 recorded in its directory's ``checksums.json``.

    Does nothing when there is no ``checksums.json`` (a transformers checkpoint) or it does not list
    the file.

    Raises:
        CheckpointError: the size or the digest differs (the message gives both).
    """
    path = Path(path)
    recorded = _recorded_checksums(path.parent)
    if recorded is None or path.name not in recorded:
        return
    entry = recorded[path.name]
    size = path.stat().st_size
    if size != entry.get("size"):
        raise CheckpointError(
            f"{path} is damaged: {size} bytes, but {entry.get('size')} were written "
            f"({'truncated' if size < entry.get('size', 0) else 'extended'}; see {CHECKSUMS_NAME})."
        )
    digest = _sha256(path)
    if digest != entry.get("sha256"):
        raise CheckpointError(
            f"{path} is damaged: its SHA-256 is {digest[:16]}..., but {str(entry.get('sha256'))[:16]}... was "
            f"written (same size, different bytes; see {CHECKSUMS_NAME})."
        )


# ---- finding and rotating checkpoints -------------------------------------------------------------


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A ``checkpoint-N`` directory holding at least ``trainer_state.json`` and ``model.safetensors``."""
    p = Path(path)
    return bool(_CHECKPOINT_RE.match(p.name)) and p.is_dir() and all((p / f).is_file() for f in _REQUIRED_FILES)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (by step number, not by mtime)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def get_last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, or ``None``."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rotate_checkpoints(
    output_dir: str | os.PathLike, save_total_limit: int | None, best_model_checkpoint: str | None = None
) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``save_total_limit`` remain; return the deleted ones.

    ``None`` or ``0`` keeps everything. The best checkpoint (when tracked) is never deleted; as in
    transformers, with a limit of 1 and a best checkpoint that is not the newest, 2 are kept.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    found = list_checkpoints(output_dir)
    limit = save_total_limit
    best = Path(best_model_checkpoint).resolve() if best_model_checkpoint else None
    if best is not None and found and best != found[-1].resolve() and limit == 1:
        limit = 2
    if best is not None:
        # move the best to the newest end so the oldest-first deletion passes it by
        found = [p for p in found if p.resolve() != best] + [p for p in found if p.resolve() == best]
    doomed = found[: max(len(found) - limit, 0)]
    for path in doomed:
        logger.info("Deleting older checkpoint %s (save_total_limit=%d)", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


@contextmanager
def staged_checkpoint(final_dir: str | os.PathLike, ctx: DistributedContext | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``final_dir``; on success rename it to ``final_dir``.

    Every process writes its files into the yielded directory (process 0 creates and renames it;
    barriers order the steps). On an exception the temporary directory is removed and ``final_dir`` is
    untouched. An existing ``final_dir`` (the same step saved twice) is replaced.
    """
    ctx = ctx or DistributedContext()
    final = Path(final_dir)
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}"
    if ctx.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(ctx)
    try:
        yield tmp
        barrier(ctx)
        if ctx.is_main_process:
            write_checksums(tmp)  # after every process wrote its files, before the rename publishes them
    except BaseException:
        if ctx.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ctx.is_main_process:
        old = None
        if final.exists():
            old = final.parent / f"{_TMP_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)


# ---- model weights --------------------------------------------------------------------------------


def save_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` (tied weights once) and, for a transformers model, ``config.json``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WEIGHTS_NAME
    save_model(model, str(path), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "to_json_file", None)):
        config.to_json_file(str(directory / "config.json"))
    return path


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Load ``model.safetensors`` into ``model`` in place (strict: every tensor must match).

    Raises:
        FileNotFoundError: no ``model.safetensors`` in ``directory``.
        CheckpointError: the file is damaged (checksum, or not a readable safetensors file).
        ValueError: the file's tensors do not match the model (names missing or unexpected).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a checkpoint needs {WEIGHTS_NAME}.")
    verify_file(path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        load_model(model, str(path), strict=True, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is damaged: not a readable safetensors file ({exc}).") from None
    except RuntimeError as exc:
        raise ValueError(f"the weights in {path} do not match the model: {exc}") from None


# ---- optimizer / scheduler files -----------------------------------------------------------------


def safe_torch_load(path: str | os.PathLike, expect_keys: Sequence[str] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; numpy's RNG-state types are allow-listed.

    ``weights_only`` unpickles tensors and plain containers only: a pickle that asks for any other
    callable (``os.system``, a class's ``__reduce__``) is refused before it runs.

    Args:
        path: the file.
        expect_keys: keys the loaded object must have (it must then be a dict).

    Raises:
        CheckpointError: checksum mismatch, a truncated / corrupted file, a pickle that would run code,
            or content without ``expect_keys``; each naming ``path``.
    """
    path = Path(path)
    verify_file(path)
    try:
        obj = _torch_load_weights_only(path)
    except pickle.UnpicklingError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{path} refused: its pickle asks for something other than tensors and plain containers, which "
            f"could run code, so it was not loaded (torch.load weights_only=True: {first})."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"{path} is damaged: cannot be read as a torch file ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]})."
        ) from None
    if expect_keys:
        missing = [k for k in expect_keys if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise CheckpointError(
                f"{path} does not hold what it should: a dict with keys {list(expect_keys)} was expected, got "
                f"{type(obj).__name__}{' without ' + str(missing) if isinstance(obj, dict) else ''}."
            )
    return obj


def _torch_load_weights_only(path: Path) -> Any:
    allow: list[Any] = []
    try:
        import numpy as np

        allow = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        core = getattr(np, "_core", None) or np.core
        allow.append(core.multiarray._reconstruct)
    except ImportError:  # numpy is optional: without it there is no numpy state to load either
        pass
    with torch.serialization.safe_globals(allow):
        return torch.load(path, map_location="cpu", weights_only=True)


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
    for i, (cur, old) in enumerate(zip(current_groups, saved_groups)):
        if "name" in cur and "name" in old and cur["name"] != old["name"]:
            problems.append(f"group {i} is named {cur['name']!r} now but {old['name']!r} in the checkpoint")
        cur_names, old_names = cur.get("param_names"), old.get("param_names")
        if cur_names is not None and old_names is not None:
            if list(cur_names) == list(old_names):
                continue
            added = [n for n in cur_names if n not in set(old_names)]
            removed = [n for n in old_names if n not in set(cur_names)]
            parts = []
            if removed:
                parts.append(f"in the checkpoint but not trained now (frozen or removed): {removed}")
            if added:
                parts.append(f"trained now but not in the checkpoint (unfrozen or added): {added}")
            if not parts:
                parts.append("same parameters in a different order")
            problems.append(f"{label(cur, i)}: " + "; ".join(parts))
        elif len(cur["params"]) != len(old["params"]):
            problems.append(
                f"{label(cur, i)} has {len(cur['params'])} parameters now but {len(old['params'])} in the checkpoint"
            )
    if problems:
        raise ValueError(
            f"Cannot resume the optimizer from {source}: its parameter groups no longer match the model "
            "(a parameter was frozen, unfrozen, added or removed since the checkpoint was saved):\n  - "
            + "\n  - ".join(problems)
            + "\nRestore the model's trainable parameters as they were, or start from the checkpoint's weights "
            "with a fresh optimizer (load model.safetensors yourself and call train() without resume_from_checkpoint)."
        )


# ---- RNG states ------------------------------------------------------------------------------------


def load_trainer_state(checkpoint: str | os.PathLike) -> Any:
    """Read ``trainer_state.json`` of ``checkpoint`` (a :class:`~optsched.trainer.state.TrainerState`).

    Raises:
        CheckpointError: checksum mismatch, not valid JSON / UTF-8, not an object, or a ``global_step``
            that is not an integer >= 0; each naming the file.
    """
    from optsched.trainer.state import TrainerState

    path = Path(checkpoint) / TRAINER_STATE_NAME
    verify_file(path)
    try:
        state = TrainerState.load_from_json(path)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is damaged: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is damaged: {' '.join(str(exc).split())[:300]}.") from None
    step = state.global_step
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} is damaged: global_step={step!r}; an integer >= 0 was expected.")
    return state


def rng_state_name(ctx: DistributedContext) -> str:
    """``rng_state.pth`` for one process, ``rng_state_{rank}.pth`` under several."""
    return f"rng_state_{ctx.rank}.pth" if ctx.enabled else RNG_STATE_NAME


def save_rng_state(directory: str | os.PathLike, ctx: DistributedContext) -> Path:
    """Write this process's python / numpy / torch CPU / CUDA RNG states (transformers' keys)."""
    states: dict[str, Any] = {"python": random.getstate(), "cpu": torch.random.get_rng_state()}
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.random.get_rng_state_all() if ctx.enabled else torch.cuda.random.get_rng_state()
    path = Path(directory) / rng_state_name(ctx)
    torch.save(states, path)
    return path


def load_rng_state(directory: str | os.PathLike, ctx: DistributedContext) -> bool:
    """Restore the RNG states saved by :func:`save_rng_state`; False (and a warning) when the file is absent."""
    path = Path(directory) / rng_state_name(ctx)
    if not path.is_file():
        logger.warning(
            "No %s in %s: random states are not restored, so dropout masks after the resume will differ "
            "from an uninterrupted run (was the checkpoint saved with a different number of processes?).",
            path.name,
            directory,
        )
        return False
    states = safe_torch_load(path, expect_keys=("python", "cpu"))
    random.setstate(states["python"])
    torch.random.set_rng_state(states["cpu"])
    if "numpy" in states:
        try:
            import numpy as np

            np.random.set_state(states["numpy"])
        except ImportError:
            pass
    if "cuda" in states and torch.cuda.is_available():
        cuda_state = states["cuda"]
        if isinstance(cuda_state, (list, tuple)):
            torch.cuda.random.set_rng_state_all(cuda_state)
        else:
            torch.cuda.random.set_rng_state(cuda_state)
    return True
