"""Checkpoint files in transformers' layout, written atomically, and the checks a resume needs.

``output_dir/checkpoint-{global_step}/`` holds::

    model.safetensors      weights (tied tensors stored once, under the name transformers keeps)
    config.json            a transformers model's config (and generation_config.json where it generates)
    optimizer.pt           optimizer.state_dict()       (param groups carry ``name`` / ``param_names``;
                                                         small tensors share one record)
    scheduler.pt           lr_scheduler.state_dict()
    scaler.pt              GradScaler state (fp16 only)
    rng_state.pth          python / numpy / torch CPU / CUDA RNG states (rng_state_{rank}.pth under DDP)
    trainer_state.json     TrainerState
    training_args.json     the arguments, as JSON
    optsched_plan.json     the resolved plan: groups and settings, schedule spec (optsched.trainer.resume)
    checksums.json         size and CRC-32 of every other file (optsched; absent in transformers' checkpoints)

A checkpoint is first written to ``output_dir/.tmp-checkpoint-{step}`` and renamed into place when every
file is there, so an interrupted save leaves no half checkpoint under a ``checkpoint-*`` name; a
directory without ``trainer_state.json`` and ``model.safetensors`` is never picked for a resume. A save
replaces an existing ``checkpoint-N`` only when it holds checkpoint files alone and, unless the same run
wrote it, they are intact; one holding anything else, or damaged files, is renamed to
``checkpoint-N.replaced-K``, never deleted (:func:`staged_checkpoint`).
Every load goes through ``torch.load(weights_only=True)``, safetensors or JSON: a checkpoint file is
data, never code. A file that cannot be read (truncated, corrupted, a pickle that asks for code, a
size or checksum that differs from ``checksums.json``, missing while ``checksums.json`` lists it) raises
:class:`CheckpointError` naming the file and what is wrong; loading never writes anything.

Cost (50M parameters + AdamW state, 605 MB; ``benchmarks/checkpoint_io.py``): ``optimizer.pt`` is
written by :func:`~optsched.trainer.crc.torch_save_with_crc`, which computes torch's record CRC-32s
with zlib-ng as the bytes are written (faster than torch's own) and the whole file's CRC for
``checksums.json`` in the same pass; the weights' CRC runs on a worker thread meanwhile
(:func:`~optsched.trainer.integrity.checksum_in_background`): a save is faster than transformers'
unchecked one. A resume with ``verify="full"`` (the default,
:data:`~optsched.trainer.integrity.VERIFY_LEVELS`) checks and copies the weights on a worker thread
while ``torch.load`` reads the optimizer file (:func:`load_weights_and_read_optimizer`), whose CRC is
computed from the bytes as they are read, the worker taking the records not read yet
(:class:`~optsched.trainer.crc.SharedFileCrc`): the check costs ~12 ms per 600 MB on the 2-core
benchmark VM, the memory bandwidth of reading every byte. Small optimizer-state tensors share one zip
record (:func:`~optsched.trainer.optimizer_state.pack_small_tensors`): the checkpoint is smaller than
transformers'. Plain objects in an optimizer state (GaLore / APOLLO projectors) are stored as class
path + attributes (:func:`~optsched.trainer.optimizer_state.encode_objects`), so ``optimizer.pt``
still loads with ``weights_only=True``.

This module keeps the layout, finding, rotating and staging checkpoints, the weights, and the trainer
and RNG states; :mod:`optsched.trainer.integrity` holds the checksums and the checks on load,
:mod:`optsched.trainer.torch_files` the loading of a torch file as data, and
:mod:`optsched.trainer.optimizer_state` the optimizer file. Their public names are re-exported here.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from optsched._validation import check_choice
from optsched.params.classify import unwrap_compiled
from optsched.trainer.crc import crc32
from optsched.trainer.distributed import DistributedContext, barrier
from optsched.trainer.integrity import (
    CHECKSUM_ALGORITHM,
    CHECKSUM_ALGORITHMS,
    CHECKSUMS_NAME,
    DEFAULT_VERIFY,
    OVERLAP_MIN_BYTES,
    VERIFY_LEVELS,
    CheckpointError,
    ChecksumAlgorithm,
    check_recorded_files_present,
    checksum_in_background,
    file_checksum,
    file_present,
    missing_recorded_files,
    verified_while_parsing,
    verify_file,
    write_checksums,
    zip_records,
)
from optsched.trainer.optimizer_state import (
    OBJECT_KEY,
    OPTIMIZER_NAME,
    PACK_MAX_BYTES,
    WRITER_CRC_MIN_BYTES,
    check_param_groups_match,
    decode_objects,
    encode_objects,
    gc_paused,
    load_optimizer_state,
    pack_small_tensors,
    read_optimizer_state,
    save_optimizer_state,
    trusted_packages,
    unpack_small_tensors,
)
from optsched.trainer.resume import PLAN_NAME
from optsched.trainer.torch_files import safe_torch_load

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILE_NAMES",
    "CHECKSUMS_NAME",
    "CHECKSUM_ALGORITHM",
    "CONFIG_NAME",
    "GENERATION_CONFIG_NAME",
    "CHECKSUM_ALGORITHMS",
    "DEFAULT_VERIFY",
    "OBJECT_KEY",
    "OPTIMIZER_NAME",
    "OVERLAP_MIN_BYTES",
    "PACK_MAX_BYTES",
    "PREFIX_CHECKPOINT_DIR",
    "RNG_STATE_NAME",
    "SCALER_NAME",
    "SCHEDULER_NAME",
    "TRAINER_STATE_NAME",
    "TRAINING_ARGS_NAME",
    "VERIFY_LEVELS",
    "WEIGHTS_NAME",
    "WRITER_CRC_MIN_BYTES",
    "CheckpointError",
    "ChecksumAlgorithm",
    "apply_model_weights",
    "check_checkpoint_files",
    "check_recorded_files_present",
    "checkpoint_step",
    "checkpoints_above",
    "check_param_groups_match",
    "checksum_in_background",
    "crc32",
    "decode_objects",
    "encode_objects",
    "file_checksum",
    "file_present",
    "gc_paused",
    "get_last_checkpoint",
    "holds_only_checkpoint_files",
    "incomplete_checkpoints",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "load_optimizer_state",
    "load_rng_state",
    "load_trainer_state",
    "load_weights_and_read_optimizer",
    "make_durable",
    "make_writable_dir",
    "missing_recorded_files",
    "missing_required_files",
    "pack_small_tensors",
    "read_model_weights",
    "read_optimizer_state",
    "rotate_checkpoints",
    "safe_torch_load",
    "save_model_weights",
    "save_optimizer_state",
    "save_rng_state",
    "saved_process_count",
    "saved_training_argument",
    "staged_checkpoint",
    "trusted_packages",
    "unpack_small_tensors",
    "verified_while_parsing",
    "verify_file",
    "weights_to_save",
    "write_checksums",
    "zip_records",
]

PREFIX_CHECKPOINT_DIR = "checkpoint"
WEIGHTS_NAME = "model.safetensors"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
RNG_STATE_NAME = "rng_state.pth"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# OPTIMIZER_NAME, CHECKSUMS_NAME and PLAN_NAME are imported above, from the modules that write those files
_TMP_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_REQUIRED_FILES = (TRAINER_STATE_NAME, WEIGHTS_NAME)
#: transformers' Trainer's own checkpoint files that optsched does not write (its constants of the same
#: names in ``transformers.trainer``; FSDP and DeepSpeed write sub-directories, which are not files)
_TRANSFORMERS_FILE_NAMES = frozenset({
    "training_args.bin", "pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors.index.json",
    "optimizer.bin", "adapter_config.json", "adapter_model.safetensors",
    "adapter_model.bin",
})
#: The names of the files a checkpoint directory holds when optsched or transformers' Trainer wrote it;
#: ``rng_state_{rank}.pth`` and weight shards (``model-00001-of-00002.safetensors``) are matched by
#: :data:`_CHECKPOINT_FILE_RE`. An existing ``checkpoint-N`` of these only (and intact, or written by the
#: same run) is replaced by a save at step N; any other is renamed aside (:func:`staged_checkpoint`).
CHECKPOINT_FILE_NAMES = frozenset({
    WEIGHTS_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME, RNG_STATE_NAME, TRAINER_STATE_NAME,
    TRAINING_ARGS_NAME, CHECKSUMS_NAME, PLAN_NAME, CONFIG_NAME, GENERATION_CONFIG_NAME,
}) | _TRANSFORMERS_FILE_NAMES
_CHECKPOINT_FILE_RE = re.compile(r"^(rng_state_\d+\.pth|(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin))$")
#: What a ``checkpoint-N`` that a save must not delete is renamed to: ``checkpoint-N.replaced-K`` (not a
#: ``checkpoint-N`` name, so neither resumed from nor rotated away)
_ASIDE_SUFFIX = ".replaced-"


# ---- finding and rotating checkpoints -------------------------------------------------------------


def missing_required_files(path: str | os.PathLike) -> list[str]:
    """Which of ``trainer_state.json`` and ``model.safetensors``, the files that make a checkpoint
    complete, are not files in ``path``."""
    p = Path(path)
    return [f for f in _REQUIRED_FILES if not (p / f).is_file()]


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A ``checkpoint-N`` directory holding at least ``trainer_state.json`` and ``model.safetensors``."""
    p = Path(path)
    return bool(_CHECKPOINT_RE.match(p.name)) and p.is_dir() and not missing_required_files(p)


def _checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` directories in ``output_dir``, complete or not, oldest first (by step number,
    not by mtime)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if checkpoint_step(p) is not None and p.is_dir()), key=checkpoint_step)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (by step number, not by mtime)."""
    return [p for p in _checkpoint_dirs(output_dir) if not missing_required_files(p)]


def get_last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``, or ``None``."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(
            f"output_dir must be a path (a str or os.PathLike), got {type(output_dir).__name__} {output_dir!r}."
        )
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def incomplete_checkpoints(output_dir: str | os.PathLike, above: int = -1) -> list[Path]:
    """``checkpoint-N`` directories in ``output_dir`` with ``N > above`` that lack ``trainer_state.json`` or
    ``model.safetensors``, oldest first: what :func:`get_last_checkpoint` passes over. A save never leaves
    one (it renames a complete directory into place), so each is damage or a partial copy."""
    return [p for p in _checkpoint_dirs(output_dir) if checkpoint_step(p) > above and missing_required_files(p)]


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step ``N`` of a ``checkpoint-N`` path, or ``None`` for any other name (``checkpoint-4.replaced-1``)."""
    found = _CHECKPOINT_RE.match(Path(path).name)
    return int(found.group(1)) if found else None


def checkpoints_above(output_dir: str | os.PathLike, step: int) -> list[Path]:
    """Complete checkpoints in ``output_dir`` numbered above ``step``, oldest first.

    Beside a run that has just saved at ``step`` these come from another run (one trained further in the
    same ``output_dir``, or the newer checkpoints of a resume from an older one): ``resume_from_checkpoint=True``
    would pick the highest of them, and :func:`rotate_checkpoints` never deletes them.
    """
    return [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step]


def check_checkpoint_files(checkpoint: str | os.PathLike) -> None:
    """What a resume checks before it reads or applies anything: every file ``checksums.json`` lists is there.

    A checkpoint that optsched wrote (it has ``optsched_plan.json``) but without ``checksums.json`` is
    logged as a warning: its files cannot be verified, only parsed. A checkpoint of transformers (neither
    file) is parsed as it is, and a file it lacks (``optimizer.pt`` of ``save_only_model``) is left out.

    Raises:
        CheckpointError: a file ``checksums.json`` lists is missing (named), or ``checksums.json`` is
            unreadable.
    """
    directory = Path(checkpoint)
    if (directory / CHECKSUMS_NAME).exists():
        check_recorded_files_present(directory)
    elif (directory / PLAN_NAME).is_file():
        logger.warning(
            "%s has %s (optsched wrote it) but no %s: its files cannot be verified, only parsed; a "
            "truncated or corrupted file is caught only where torch, safetensors or JSON cannot read it, "
            "and a missing %s, %s or %s is taken for one that was never written.",
            directory, PLAN_NAME, CHECKSUMS_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, RNG_STATE_NAME,
        )


def rotate_checkpoints(
    output_dir: str | os.PathLike,
    save_total_limit: int | None,
    best_model_checkpoint: str | None = None,
    current: str | os.PathLike | None = None,
) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``save_total_limit`` remain; return the deleted ones.

    ``None`` or ``0`` keeps everything. The best checkpoint (when tracked) is never deleted; as in
    transformers, with a limit of 1 and a best checkpoint that is not the newest, 2 are kept.

    ``current`` is the checkpoint just written: it is never deleted, and it is the newest one counted.
    Checkpoints numbered above it are not older but from another run (:func:`checkpoints_above`): they
    are neither counted nor deleted (transformers sorts them in and deletes the run's new checkpoints
    instead). ``current=None`` takes the highest-numbered checkpoint as the one just written.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    found = list_checkpoints(output_dir)
    if current is not None:
        newest = checkpoint_step(current)
        if newest is None:
            raise ValueError(
                f"current={str(current)!r} is not a checkpoint directory; accepted: a path named "
                f"{PREFIX_CHECKPOINT_DIR}-<step>."
            )
        found = [p for p in found if checkpoint_step(p) <= newest]
    limit = save_total_limit
    best = Path(best_model_checkpoint).resolve() if best_model_checkpoint else None
    if best is not None and found and best != found[-1].resolve() and limit == 1:
        limit = 2
    if best is not None:
        # move the best to the newest end so the oldest-first deletion passes it by
        found = [p for p in found if p.resolve() != best] + [p for p in found if p.resolve() == best]
    keep = Path(current).resolve() if current is not None else None
    doomed = [p for p in found[: max(len(found) - limit, 0)] if p.resolve() != keep]
    for path in doomed:
        logger.info("Deleting older checkpoint %s (save_total_limit=%d)", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def holds_only_checkpoint_files(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a directory (not a link to one) whose every entry is a regular file named
    as optsched or transformers name checkpoint files (:data:`CHECKPOINT_FILE_NAMES`, ``rng_state_{rank}.pth``,
    weight shards). True for an empty directory; False for a file, a link, a missing path, or a directory
    holding a sub-directory or any other name (a user's file).
    """
    path = Path(directory)
    return not path.is_symlink() and path.is_dir() and not _foreign_entries(path)


def _is_checkpoint_file(entry: os.DirEntry) -> bool:
    """A regular file (not a link) named as optsched or transformers name a checkpoint's files."""
    name = entry.name
    return entry.is_file(follow_symlinks=False) and (name in CHECKPOINT_FILE_NAMES or bool(_CHECKPOINT_FILE_RE.match(name)))


def _foreign_entries(directory: Path) -> list[str]:
    """The sorted names of the entries of ``directory`` that are not checkpoint files (a directory's with "/")."""
    with os.scandir(directory) as entries:
        return sorted(
            e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in entries if not _is_checkpoint_file(e)
        )


def _aside_path(final: Path) -> Path:
    """``checkpoint-N.replaced-K`` beside ``final``, K the first from 1 that names nothing yet."""
    k = 1
    while os.path.lexists(final.parent / f"{final.name}{_ASIDE_SUFFIX}{k}"):
        k += 1
    return final.parent / f"{final.name}{_ASIDE_SUFFIX}{k}"


def _damage(directory: Path) -> str | None:
    """Why the checkpoint files in ``directory`` are not a checkpoint as a save leaves one, in words, or
    ``None`` when they are (or when there are none: an empty folder holds nothing to keep).

    Incomplete: no ``trainer_state.json`` or ``model.safetensors``, a file that ``checksums.json`` lists is
    gone, or ``optsched_plan.json`` (optsched wrote it) without ``checksums.json``. Damaged: an unreadable
    ``checksums.json``, or a file whose size differs from it (:func:`verify_file` at ``"size"``: a
    truncated or partial copy). Only sizes, never the bytes: this runs in the save, and another run's
    checkpoint at this step may be hundreds of GB, so its CRCs would cost minutes of the new run's time;
    a flipped byte in it is no reason to keep it, as the new checkpoint supersedes it.
    """
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        return None
    try:
        missing = sorted(set(missing_required_files(directory)) | set(missing_recorded_files(directory)))
        if missing:
            return f"is incomplete (no {', '.join(missing)})"
        if PLAN_NAME in names and CHECKSUMS_NAME not in names:
            return f"is incomplete (no {CHECKSUMS_NAME}, which optsched writes beside {PLAN_NAME})"
        for name in names:
            if name != CHECKSUMS_NAME:
                verify_file(directory / name, "size")
    except (CheckpointError, OSError) as exc:
        return f"is damaged ({str(exc).rstrip('.')})"
    return None


def _reason_to_keep(final: Path, own: bool) -> str | None:
    """Why a save must rename the existing ``final`` aside rather than replace it, in words; ``None`` when
    it may be replaced: a directory of checkpoint files only (:func:`holds_only_checkpoint_files`) that
    this run wrote (``own``) or that is intact (:func:`_damage`). A checkpoint another run left is replaced
    when intact (a copy of what the new one supersedes) but kept when damaged or incomplete: its intact
    files (weights, say) may be the only copy left of them."""
    if final.is_symlink() or not final.is_dir():
        return "is not a directory"
    foreign = _foreign_entries(final)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"holds more than checkpoint files ({shown})"
    damage = None if own else _damage(final)
    if damage is None:
        return None
    names = sorted(p.name for p in final.iterdir())
    return f"{damage}, and this run did not write it; it holds {', '.join(names)}"


def _move_aside(final: Path, reason: str) -> Path:
    """Rename ``final`` to :func:`_aside_path` and warn naming both paths and ``reason`` (from
    :func:`_reason_to_keep`); return the new path."""
    aside = _aside_path(final)
    os.replace(final, aside)
    logger.warning(
        "%s already existed and %s: it was renamed to %s, not deleted, and the new checkpoint took its "
        "place. Nothing deletes %s (save_total_limit rotates checkpoint-N directories only, and a resume "
        "never picks it): take what you need out of it and delete it yourself.",
        final, reason, aside, aside.name,
    )
    return aside


@contextmanager
def staged_checkpoint(
    final_dir: str | os.PathLike, ctx: DistributedContext | None = None, *, own: bool = False
) -> Iterator[Path]:
    """Yield a temporary directory beside ``final_dir``; on success rename it to ``final_dir``.

    Every process writes its files into the yielded directory (process 0 creates and renames it;
    barriers order the steps). On an exception the temporary directory is removed and ``final_dir`` is
    untouched. An existing ``final_dir`` is replaced when it holds checkpoint files only
    (:func:`holds_only_checkpoint_files`) and they are intact (every file as ``checksums.json`` records
    it, see :func:`_damage`), or when ``own`` says this run wrote it (the same step saved twice: its
    damage is the run's own). Any other (a user's file or a sub-directory in it, not a directory, or a
    damaged or incomplete checkpoint of another run) is renamed to ``checkpoint-N.replaced-K`` (the first
    free K) with a warning naming both paths and what it holds, never deleted.
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
        if os.path.lexists(final):  # a link too: renamed, whatever it points to stays
            reason = _reason_to_keep(final, own)
            if reason is not None:
                _move_aside(final, reason)
            else:
                old = final.parent / f"{_TMP_PREFIX}old-{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)


def make_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` (and its parents) and make and remove a probe folder in it, so that a path
    that cannot hold a run's files (a file, a read-only place) fails now, not at the first save.

    Raises:
        OSError: it cannot be created or written to (``strerror`` says why, ``filename`` where).
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    os.rmdir(tempfile.mkdtemp(prefix=".optsched-write-test-", dir=path))  # unique: ranks probe at once
    return path


def make_durable(directory: str | os.PathLike) -> None:
    """Flush a checkpoint to the disk: ``fsync`` every file of ``directory``, the directory and its parent.

    A rename publishes a checkpoint at once, but its bytes may sit in the page cache for tens of seconds;
    after a power loss or a kernel crash such a checkpoint can come back with empty or partly written
    files. Once this returns, it comes back whole. The Trainer calls it on a worker thread after each
    save and deletes older checkpoints (``save_total_limit``) only once it has returned: the last
    checkpoint that is surely on disk is never the one deleted. (``fsync`` of a directory is not
    possible on every platform, e.g. Windows: skipped there.)

    Raises:
        OSError: a file could not be flushed (a full or failing disk).
    """
    directory = Path(directory)
    mode = os.O_RDWR if os.name == "nt" else os.O_RDONLY  # Windows flushes only a handle that may write
    for path in sorted(directory.iterdir()):
        if path.is_file():
            fd = os.open(path, mode)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in (directory, directory.parent):
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:  # a platform that cannot open a directory
            continue
        try:
            os.fsync(fd)
        except OSError:  # ... or not fsync one
            pass
        finally:
            os.close(fd)


# ---- model weights --------------------------------------------------------------------------------


def save_model_weights(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` (tied weights once) and, for a transformers model, ``config.json`` and,
    for one that generates, ``generation_config.json``.

    The files hold what transformers' ``save_pretrained`` writes: the weights under the names of
    :func:`weights_to_save` with the metadata ``{"format": "pt"}``; the config with ``architectures``
    (the model's class, which inference servers such as vLLM read to pick the model) and ``dtype`` set
    as ``save_pretrained`` sets them (on a copy: the model's own config is left as it is); the
    generation config (end-of-sequence ids, sampling defaults) where ``model.can_generate()``, which
    ``from_pretrained`` would otherwise rebuild from the config, losing what the model's own held. A
    plain ``nn.Module`` gets the weights alone.

    A ``torch.compile``'d model is saved as the module it wraps, as transformers' Trainer saves a model
    it compiles itself (``torch_compile=True``): the keys have no ``_orig_mod.`` prefix, so the
    uncompiled model and ``from_pretrained`` load them (and a compiled one, through
    :func:`read_model_weights`).
    """
    from safetensors.torch import save_file

    model = unwrap_compiled(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WEIGHTS_NAME
    save_file(weights_to_save(model), str(path), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "to_json_file", None)):
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
        dtype = getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            config.dtype = str(dtype).removeprefix("torch.")
        config.to_json_file(str(directory / CONFIG_NAME))
        generation_config = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", None)
        if generation_config is not None and callable(can_generate) and can_generate():
            generation_config.save_pretrained(str(directory))
    return path


def weights_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each tensor once: safetensors refuses tensors that share memory.

    Of the names that share one tensor (tied weights, a parameter or module used twice), the one kept
    is the first in ``state_dict()`` order that covers the whole memory and that a transformers model
    does not declare as tied to another (the keys of its ``all_tied_weights_keys``): GPT-2's
    ``transformer.wte.weight``, not ``lm_head.weight``, as ``save_pretrained`` keeps it. The others are
    left out; loading the kept one fills them, since they share its memory in the model too
    (:func:`read_model_weights`). safetensors' own ``save_model`` kept the alphabetically first name
    (``lm_head.weight``), which transformers 5 loads too, but a tool that reads the file by the names
    of transformers' own checkpoints finds no ``transformer.wte.weight`` in it. Tensors that share memory without either covering all of it (two
    halves of one buffer) are left to safetensors, which refuses them.
    """
    state = model.state_dict()
    declared = getattr(model, "all_tied_weights_keys", None)
    tied_targets = set(declared) if isinstance(declared, dict) else set()
    groups: dict[tuple[torch.device, int], list[str]] = {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage()
        if tensor.device.type != "meta" and storage.data_ptr() != 0 and storage.nbytes() != 0:
            groups.setdefault((tensor.device, storage.data_ptr()), []).append(name)
    for names in groups.values():
        if len(names) < 2:
            continue
        complete = [n for n in names if _covers_storage(state[n])]
        if not complete:
            continue
        keep = next((n for n in complete if n not in tied_targets), complete[0])
        for name in names:
            if name != keep:
                del state[name]
    return state


def _covers_storage(tensor: torch.Tensor) -> bool:
    storage = tensor.untyped_storage()
    return (
        tensor.data_ptr() == storage.data_ptr()
        and tensor.is_contiguous()
        and tensor.numel() * tensor.element_size() == storage.nbytes()
    )


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike, verify: str = DEFAULT_VERIFY) -> None:
    """Load ``model.safetensors`` into ``model`` in place (strict: every tensor must match).

    :func:`read_model_weights` (checked at level ``verify``, names and shapes compared), then
    :func:`apply_model_weights`: on any error the model is left as it was. These are the reads and
    copies of ``safetensors.torch.load_model`` (transformers' path too).

    Raises:
        FileNotFoundError: no ``model.safetensors`` in ``directory``.
        CheckpointError: the file is damaged (checksum, or not a readable safetensors file).
        ValueError: the file's tensors do not match the model (names missing or unexpected, shapes).
    """
    apply_model_weights(model, read_model_weights(model, directory, verify))


def read_model_weights(
    model: torch.nn.Module, directory: str | os.PathLike, verify: str = DEFAULT_VERIFY
) -> dict[str, torch.Tensor]:
    """``model.safetensors`` of ``directory`` as a state dict for ``model``, checked but not applied.

    The file is checked first (:func:`verify_file` at level ``verify``; safetensors only maps it, so
    there is no parse to run the check beside), then mapped, then every name and shape is compared
    with ``model.state_dict()``. A tied tensor (saved once) may be missing under its other names. Names
    written with torch.compile's ``_orig_mod.`` prefix (transformers' Trainer given a compiled model) are
    read as the model's own.

    Raises:
        FileNotFoundError: no ``model.safetensors`` in ``directory``.
        CheckpointError: the file is damaged (checksum, or not a readable safetensors file), or missing
            while ``checksums.json`` lists it.
        ValueError: the file's tensors do not match the model (names missing or unexpected, shapes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = unwrap_compiled(model)  # the keys save_model_weights writes
    path = Path(directory) / WEIGHTS_NAME
    if not file_present(path):
        raise FileNotFoundError(f"{path} does not exist; a checkpoint needs {WEIGHTS_NAME}.")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    verify_file(path, verify)
    try:
        saved = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is damaged: not a readable safetensors file ({exc}).") from None
    current = model.state_dict()
    saved = _without_compiled_prefix(saved, current)
    _check_weights_match(current, saved, path)
    return saved


_COMPILED_PREFIX = "_orig_mod."


def _without_compiled_prefix(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``saved`` with the ``_orig_mod.`` prefix taken off the names the model has without it: transformers'
    Trainer, given a ``torch.compile``'d model, writes its ``state_dict()`` keys as they are."""
    if not any(key.startswith(_COMPILED_PREFIX) and key not in current for key in saved):
        return saved
    renamed = {}
    for key, tensor in saved.items():
        name = key
        while name.startswith(_COMPILED_PREFIX) and name not in current:
            name = name[len(_COMPILED_PREFIX):]
        renamed[name if name in current else key] = tensor
    return renamed


def apply_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (from :func:`read_model_weights`) into ``model``'s tensors, in place."""
    # the names left out are tied to loaded ones (checked); a compiled model's keys are its wrapped module's
    unwrap_compiled(model).load_state_dict(weights, strict=False)


def load_weights_and_read_optimizer(
    model: torch.nn.Module, checkpoint: str | os.PathLike, verify: str = DEFAULT_VERIFY
) -> dict[str, Any] | None:
    """Load ``model.safetensors`` into ``model`` and read ``optimizer.pt`` (not applied), on two threads.

    What a resume reads, in the least time: a worker thread checks the weights (level ``verify``) and
    copies them into the model (:func:`load_model_weights`: only once they passed), while this thread
    parses the optimizer file (:func:`read_optimizer_state`, the longest part, whose CRC is computed
    from the bytes as ``torch.load`` reads them, the worker taking the records not yet read once the
    weights are in). The weights' check and copy thus cost no time of their own; memory bandwidth is
    the limit. Without an ``optimizer.pt`` (``save_only_model``) it is
    :func:`load_model_weights`; an ``optimizer.pt`` that ``checksums.json`` lists but that is missing
    raises before the weights are touched.

    Returns:
        :func:`read_optimizer_state`'s dict for :func:`load_optimizer_state` (``saved=``), or ``None``
        without an ``optimizer.pt``.

    Raises:
        FileNotFoundError: no ``model.safetensors``.
        CheckpointError: a damaged file (a damaged optimizer file after the weights were loaded leaves
            the model with the checkpoint's weights, which passed their check); an ``optimizer.pt``
            that ``checksums.json`` lists is missing (the model is left as it was).
        ValueError: the weights do not match the model.
    """
    verify = check_choice("verify", verify, VERIFY_LEVELS, what="verification level")
    if not file_present(Path(checkpoint) / OPTIMIZER_NAME):  # before the weights: a lost file changes nothing
        load_model_weights(model, checkpoint, verify)
        return None
    return read_optimizer_state(checkpoint, verify, beside=lambda: load_model_weights(model, checkpoint, verify))


def _check_weights_match(current: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ``ValueError`` unless ``saved`` fills every tensor of the model's ``current`` state dict with
    the same shape; a name may be missing when its tensor shares storage with a saved one (tied)."""
    loaded_storages = {current[k].untyped_storage().data_ptr() for k in saved if k in current}
    missing = [
        k for k, t in current.items() if k not in saved and t.untyped_storage().data_ptr() not in loaded_storages
    ]
    unexpected = [k for k in saved if k not in current]
    shapes = [
        f"{k}: {tuple(saved[k].shape)} in the file, {tuple(current[k].shape)} in the model"
        for k in saved
        if k in current and saved[k].shape != current[k].shape
    ]
    problems = [f"missing in the file: {missing}"] if missing else []
    problems += [f"not in the model: {unexpected}"] if unexpected else []
    problems += [f"shape mismatch: {'; '.join(shapes)}"] if shapes else []
    if problems:
        raise ValueError(f"the weights in {path} do not match the model ({'; '.join(problems)}).")


# ---- trainer state and RNG states -----------------------------------------------------------------


def load_trainer_state(checkpoint: str | os.PathLike, verify: str = DEFAULT_VERIFY) -> Any:
    """Read ``trainer_state.json`` of ``checkpoint`` (a :class:`~optsched.trainer.state.TrainerState`).

    Raises:
        CheckpointError: checksum mismatch, not valid JSON / UTF-8, not an object, or a ``global_step``
            that is not an integer >= 0; each naming the file.
    """
    from optsched.trainer.state import TrainerState

    path = Path(checkpoint) / TRAINER_STATE_NAME
    verify_file(path, verify)
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


def saved_training_argument(directory: str | os.PathLike, name: str) -> Any:
    """The value of ``name`` in the ``training_args.json`` optsched saved in ``directory``, or ``None``
    (no such file, as in a transformers checkpoint, which pickles its arguments; unreadable; no such key).
    For messages only: nothing is restored from it."""
    try:
        values = json.loads((Path(directory) / TRAINING_ARGS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values.get(name) if isinstance(values, dict) else None


def saved_process_count(directory: str | os.PathLike) -> int | None:
    """How many processes saved the checkpoint in ``directory``, read from its RNG files: the highest
    ``N`` of ``rng_state_{N}.pth`` plus one (DDP; transformers names them so too), 1 for ``rng_state.pth``
    alone, ``None`` when it holds neither (``save_only_model``)."""
    directory = Path(directory)
    ranks = [int(m.group(1)) for p in directory.glob("rng_state_*.pth") if (m := re.fullmatch(r"rng_state_(\d+)\.pth", p.name))]
    if ranks:
        return max(ranks) + 1
    return 1 if (directory / RNG_STATE_NAME).is_file() else None


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


def load_rng_state(directory: str | os.PathLike, ctx: DistributedContext, verify: str = DEFAULT_VERIFY) -> bool:
    """Restore the RNG states saved by :func:`save_rng_state`; False (and a warning) when the file is absent.

    Raises:
        CheckpointError: the file is damaged or untrusted, or missing while ``checksums.json`` lists it
            (the RNG states are left as they were).
    """
    path = Path(directory) / rng_state_name(ctx)
    if not file_present(path):
        logger.warning(
            "No %s in %s: random states are not restored, so dropout masks after the resume will differ "
            "from an uninterrupted run (was the checkpoint saved with a different number of processes?).",
            path.name,
            directory,
        )
        return False
    states = safe_torch_load(path, expect_keys=("python", "cpu"), verify=verify)
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
