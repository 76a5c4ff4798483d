"""Checkpoint files in transformers' layout, written atomically, and the checks a resume needs.

``output_dir/checkpoint-{global_step}/`` holds::

    model.safetensors      weights (tied tensors stored once; safetensors refuses shared storage)
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
directory without ``trainer_state.json`` and ``model.safetensors`` is never picked for a resume.
Every load goes through ``torch.load(weights_only=True)``, safetensors or JSON: a checkpoint file is
data, never code. A file that cannot be read (truncated, corrupted, a pickle that asks for code, a
size or checksum that differs from ``checksums.json``) raises :class:`CheckpointError` naming the file
and what is wrong; loading never writes anything.

Cost (50M parameters + AdamW state, 605 MB; ``benchmarks/checkpoint_io.py``): ``optimizer.pt`` is
written by :func:`~optsched.trainer.crc.torch_save_with_crc`, which computes torch's record CRC-32s
with zlib-ng as the bytes are written (faster than torch's own) and the whole file's CRC for
``checksums.json`` in the same pass; the weights' CRC runs on a worker thread meanwhile
(:func:`checksum_in_background`): a save is faster than transformers' unchecked one. A resume with
``verify="full"`` (the default, :data:`VERIFY_LEVELS`) checks and copies the weights on a worker thread
while ``torch.load`` reads the optimizer file (:func:`load_weights_and_read_optimizer`), whose CRC is
computed from the bytes as they are read, the worker taking the records not read yet
(:class:`~optsched.trainer.crc.SharedFileCrc`): the check costs ~12 ms per 600 MB on the 2-core
benchmark VM, the memory bandwidth of reading every byte. Small optimizer-state tensors share one zip record
(:func:`pack_small_tensors`): the checkpoint is smaller than transformers'. Plain objects in an
optimizer state (GaLore / APOLLO projectors) are stored as class path + attributes
(:func:`encode_objects`), so ``optimizer.pt`` still loads with ``weights_only=True``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import mmap
import os
import pickle
import random
import re
import shutil
import sys
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optsched._validation import check_choice
from optsched.trainer.crc import (
    ZIP_LOCAL_HEADER_SIZE,
    ZIP_LOCAL_SIGNATURE,
    SharedFileCrc,
    crc32,
    file_pieces,
    record_data_start,
    torch_save_with_crc,
)
from optsched.trainer.distributed import DistributedContext, barrier

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKSUMS_NAME",
    "CHECKSUM_ALGORITHM",
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
    "check_param_groups_match",
    "checksum_in_background",
    "crc32",
    "decode_objects",
    "encode_objects",
    "file_checksum",
    "gc_paused",
    "get_last_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "load_optimizer_state",
    "load_rng_state",
    "load_trainer_state",
    "load_weights_and_read_optimizer",
    "make_durable",
    "pack_small_tensors",
    "read_model_weights",
    "read_optimizer_state",
    "rotate_checkpoints",
    "safe_torch_load",
    "save_model_weights",
    "save_optimizer_state",
    "save_rng_state",
    "staged_checkpoint",
    "trusted_packages",
    "unpack_small_tensors",
    "verified_while_parsing",
    "verify_file",
    "write_checksums",
    "zip_records",
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


@dataclass(frozen=True)
class ChecksumAlgorithm:
    """A way to fingerprint a file's bytes for ``checksums.json``.

    Attributes:
        name: the value of ``"algorithm"`` in ``checksums.json`` and the key of each file's digest.
        label: how messages name it (``"CRC-32"``).
        update: ``update(data, running) -> running``, fed the bytes in order.
        initial: the running value before any byte.
        finish: the running value as the digest stored in the file.
    """

    name: str
    label: str
    update: Callable[[Any, Any], Any]
    initial: Callable[[], Any]
    finish: Callable[[Any], str]


def _sha256_update(data: Any, running: Any) -> Any:
    running.update(data)
    return running


#: Checksums a checkpoint can carry. ``crc32`` is what :func:`write_checksums` writes: it detects every
#: burst error up to 32 bits and any truncation (sizes are checked too) at ~35 GB/s (zlib-ng), 30x SHA-256;
#: refusing a *crafted* file is ``weights_only``'s job, not the checksum's. ``sha256`` is read for
#: checkpoints written by optsched before the switch.
CHECKSUM_ALGORITHMS: dict[str, ChecksumAlgorithm] = {
    "crc32": ChecksumAlgorithm("crc32", "CRC-32", crc32, lambda: 0, lambda v: f"{v:08x}"),
    "sha256": ChecksumAlgorithm("sha256", "SHA-256", _sha256_update, hashlib.sha256, lambda h: h.hexdigest()),
}
CHECKSUM_ALGORITHM = "crc32"

#: How much a load checks a file before parsing it (``verify=`` of the loaders; the Trainer reads
#: ``args.checkpoint_verification``): ``"full"``: size and CRC-32 of every byte (a flipped bit anywhere
#: is caught; one pass over the page cache, ~25 ms per 600 MB, beside the parser on a worker thread);
#: ``"size"``: sizes only (a truncated or extended file is caught, a same-size corruption only where
#: torch / safetensors / JSON cannot parse it; no pass at all).
VERIFY_LEVELS = ("full", "size")
DEFAULT_VERIFY = "full"



@contextmanager
def _file_bytes(path: str | os.PathLike) -> Iterator[memoryview]:
    """A read-only view of a file's bytes through a memory map: checksums run over the page cache itself
    (a just-written or just-read checkpoint is there), with no copy into Python memory."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap refuses an empty file
            yield memoryview(b"")
            return
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a filesystem without mmap: the same bytes, read into memory
            mapped = None
        if mapped is None:
            logger.debug("%s cannot be memory-mapped; reading it into memory to check it", path)
            yield memoryview(f.read())
            return
        with mapped:
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)  # read-ahead when the file is not cached
            with memoryview(mapped) as view:  # released before the map closes
                yield view


#: File systems whose pages are read faster by ``read`` into a small buffer than through a memory map:
#: their pages are mapped one 4 KiB fault at a time (no fault-around), 58 ms per 400 MB here against
#: 32 ms by ``read``; a disk's page cache is the other way round (13 ms mapped, 21 ms read).
_READ_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
_FILESYSTEM_TYPES: dict[int, str | None] = {}
_READ_PIECE = 4 << 20  # bytes per read: fits the L2/L3 cache, so the CRC reads what the copy just wrote


def _filesystem_type(path: str | os.PathLike) -> str | None:
    """The type of the file system holding ``path`` (``"tmpfs"``, ``"ext4"``, ...), from
    ``/proc/self/mountinfo`` by device number; ``None`` where that file does not exist (not Linux)."""
    if not hasattr(os, "major"):  # Windows: no device numbers, no mountinfo
        return None
    device = os.stat(path).st_dev
    if device not in _FILESYSTEM_TYPES:
        wanted, found = f"{os.major(device)}:{os.minor(device)}", None
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
                for line in mounts:
                    fields = line.split()
                    if len(fields) > 3 and fields[2] == wanted and "-" in fields:
                        found = fields[fields.index("-") + 1]  # the same device may be mounted twice: same type
        except OSError:
            pass
        _FILESYSTEM_TYPES[device] = found
    return _FILESYSTEM_TYPES[device]


def file_checksum(path: str | os.PathLike, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """The digest (hex) of a file's bytes: over a memory map of the file (no copy), or on a file system
    in RAM (:data:`_READ_FILESYSTEMS`) read in pieces into one reused buffer.

    Raises:
        ValueError: an unknown ``algorithm`` (with "did you mean").
    """
    algo = CHECKSUM_ALGORITHMS[check_choice("algorithm", algorithm, CHECKSUM_ALGORITHMS, what="checksum algorithm")]
    running = algo.initial()
    if _filesystem_type(path) in _READ_FILESYSTEMS:
        with open(path, "rb", buffering=0) as f:
            for piece in file_pieces(f, 0, os.fstat(f.fileno()).st_size, _READ_PIECE):
                running = algo.update(piece, running)
        return algo.finish(running)
    with _file_bytes(path) as data:
        return algo.finish(algo.update(data, running))  # zlib / hashlib release the GIL here


def zip_records(path: str | os.PathLike) -> list[zipfile.ZipInfo] | None:
    """The records of a ``torch.save`` file (a zip archive of stored records), each with its CRC-32.

    torch computes a CRC-32 of every record while it writes (the zip format requires one) but
    ``torch.load`` never checks them; :func:`verify_file` does, so ``optimizer.pt`` needs no checksum
    pass of optsched's own on save. Reads the zip directory only.

    Returns:
        The records, or ``None`` for a file that is not such an archive (another format, a truncated
        file, compressed records) or whose CRCs were not written (``torch.serialization.
        set_crc32_options(False)`` leaves them all 0).
    """
    try:
        with open(path, "rb") as f:
            if f.read(len(ZIP_LOCAL_SIGNATURE)) != ZIP_LOCAL_SIGNATURE:
                return None
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return None
    if any(r.compress_type != zipfile.ZIP_STORED for r in records):
        return None
    if not any(r.CRC for r in records) and any(r.file_size for r in records):
        return None  # torch skipped the CRCs: nothing to check them against
    return records


def _bad_zip_records(path: Path, records: Sequence[zipfile.ZipInfo]) -> list[str]:
    """Names of the records whose bytes do not match the CRC-32 stored for them in the zip directory."""
    bad = []
    with _file_bytes(path) as data:
        for record in records:
            offset = record.header_offset
            try:
                first = record_data_start(record, bytes(data[offset : offset + ZIP_LOCAL_HEADER_SIZE]))
            except ValueError:  # no local header where the directory says (damaged, truncated)
                bad.append(record.filename)
                continue
            with data[first : first + record.compress_size] as body:
                if len(body) != record.compress_size or crc32(body) != record.CRC:
                    bad.append(record.filename)
    return bad


def _checksum_entry(path: Path, algorithm: str) -> dict[str, Any]:
    """``{"size": bytes, algorithm: digest of the whole file}``, from :func:`checksum_in_background` when
    it computed this very file (same path, size and modification time), else computed now."""
    key = _early_key(path, algorithm)
    with _EARLY_LOCK:
        early = _EARLY.pop(key, None)
    return {"size": key[1], algorithm: early.result() if early is not None else file_checksum(path, algorithm)}


def _early_key(path: Path, algorithm: str) -> tuple[str, int, int, str]:
    """What identifies a file's bytes for :func:`checksum_in_background`: path, size, mtime, algorithm."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, algorithm


_EARLY_LOCK = threading.Lock()
_EARLY: OrderedDict[tuple[str, int, int, str], Future[str]] = OrderedDict()
_EARLY_MAX = 64  # entries nobody asked for (a save that failed later) are dropped, oldest first
_CHECKSUM_WORKER: ThreadPoolExecutor | None = None


def checksum_in_background(path: str | os.PathLike, algorithm: str = CHECKSUM_ALGORITHM) -> None:
    """Start the checksum of a file that is complete, on a worker thread, for :func:`write_checksums`.

    The Trainer calls this for ``model.safetensors`` as soon as it is written, so its CRC pass (~8 ms
    per 200 MB) runs while ``optimizer.pt`` is being written instead of after it. The result is used
    only for the same path, size and modification time; the file must not change in between (a
    changed file gets a new modification time and is checksummed again).
    """
    global _CHECKSUM_WORKER
    path = Path(path)
    with _EARLY_LOCK:
        if _CHECKSUM_WORKER is None:
            _CHECKSUM_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="optsched-checksum")
    _put_early(path, algorithm, _CHECKSUM_WORKER.submit(file_checksum, path, algorithm))


def _remember_checksum(path: Path, algorithm: str, digest: str) -> None:
    """Hand :func:`write_checksums` a digest computed while ``path`` was written (same key as
    :func:`checksum_in_background`: used only while the file keeps its size and modification time)."""
    done: Future[str] = Future()
    done.set_result(digest)
    _put_early(path, algorithm, done)


def _put_early(path: Path, algorithm: str, digest: Future[str]) -> None:
    """File ``digest`` (done or under way) for :func:`_checksum_entry`, dropping the oldest beyond the cap."""
    key = _early_key(path, algorithm)
    with _EARLY_LOCK:
        _EARLY[key] = digest
        while len(_EARLY) > _EARLY_MAX:
            _EARLY.popitem(last=False)


def write_checksums(directory: str | os.PathLike, algorithm: str = CHECKSUM_ALGORITHM) -> Path:
    """Write ``checksums.json``: ``{"algorithm": "crc32", "files": {name: entry}}``.

    Covers every regular file in ``directory`` (not in sub-directories), so a later load can tell a
    truncated or bit-flipped file from a good one before parsing it. An entry is ``{"size": bytes,
    "crc32": "<8 hex digits>"}``: the whole file's CRC-32, computed while it was written
    (:func:`save_optimizer_state`), on a worker thread once it was (:func:`checksum_in_background`),
    or else now over the page cache (~20 ms per 600 MB with zlib-ng). A whole-file CRC can be
    assembled from pieces checked by any thread (:class:`~optsched.trainer.crc.SharedFileCrc`, or one
    GIL-free call beside the parser, :func:`verified_while_parsing`); checking a torch file
    through its records' own CRC-32s instead (what checksums.json files of optsched 0.1.0 ask for with
    ``"zip_crc32": <record count>``, still read) costs no pass on save, but one call per record, which
    contends with ``torch.load``'s Python unpickler for the GIL and ran 3x slower beside it.
    """
    directory = Path(directory)
    files = {
        p.name: _checksum_entry(p, algorithm)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != CHECKSUMS_NAME
    }
    path = directory / CHECKSUMS_NAME
    text = json.dumps({"algorithm": algorithm, "files": files}, indent=1, sort_keys=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _short(digest: str) -> str:
    return digest if len(digest) <= 16 else digest[:16] + "..."


def _recorded_checksums(directory: Path) -> tuple[str, dict[str, Any]] | None:
    """``(algorithm, {name: entry})`` from ``checksums.json``, or None when the directory has none."""
    path = directory / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
        algorithm = data.get("algorithm", "sha256")  # the first checksums.json had SHA-256 only
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r}; accepted: {', '.join(CHECKSUM_ALGORITHMS)}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged: not the checksum JSON optsched writes ({exc}).") from None
    return algorithm, files


def _check_zip_crcs(path: Path, expected_records: int | None) -> None:
    """Raise :class:`CheckpointError` unless every record of the torch file matches its stored CRC-32."""
    records = zip_records(path)
    if records is None:
        raise CheckpointError(
            f"{path} is damaged: it is no longer a torch zip archive with CRC-32s (its directory is unreadable; "
            f"see {CHECKSUMS_NAME})."
        )
    if expected_records is not None and len(records) != expected_records:
        raise CheckpointError(
            f"{path} is damaged: {len(records)} records, but {expected_records} were written (see {CHECKSUMS_NAME})."
        )
    bad = _bad_zip_records(path, records)
    if bad:
        shown = ", ".join(repr(b) for b in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"{path} is damaged: the bytes of record {shown} do not match the CRC-32 torch wrote for them "
            "(same size, different bytes)."
        )


def verify_file(path: str | os.PathLike, verify: str = DEFAULT_VERIFY) -> None:
    """Check ``path`` before it is parsed: its size, and with ``verify="full"`` a CRC-32 of every byte.

    Against the entry in its directory's ``checksums.json`` (see :func:`write_checksums`). Without one
    (a transformers checkpoint, or a file it does not list), ``"full"`` still checks a ``torch.save``
    file's records against the CRC-32s torch stored in it (:func:`zip_records`), so a flipped byte in a
    transformers ``optimizer.pt`` is caught too; other files are then left to their parsers.

    Raises:
        ValueError: ``verify`` is not one of :data:`VERIFY_LEVELS`.
        CheckpointError: ``checksums.json`` is unreadable, or the size, a record count or a checksum
            differs (the message names the file and gives both values).
    """
    verify = check_choice("verify", verify, VERIFY_LEVELS, what="verification level")
    path = Path(path)
    recorded = _recorded_checksums(path.parent)
    entry = recorded[1].get(path.name) if recorded is not None else None
    if not isinstance(entry, dict):
        if entry is not None:
            raise CheckpointError(
                f"{path.parent / CHECKSUMS_NAME} is damaged: the entry of {path.name} is not an object."
            )
        if verify == "full" and zip_records(path) is not None:
            _check_zip_crcs(path, None)
        return
    algorithm = recorded[0]
    expected_size = entry.get("size")
    size = path.stat().st_size
    if size != expected_size:
        how = "truncated" if isinstance(expected_size, int) and size < expected_size else "extended"
        raise CheckpointError(
            f"{path} is damaged: {size} bytes, but {expected_size} were written ({how}; see {CHECKSUMS_NAME})."
        )
    if verify == "size":
        return
    if "zip_crc32" in entry:
        _check_zip_crcs(path, entry["zip_crc32"])
        return
    _check_digest(path, algorithm, file_checksum(path, algorithm), str(entry.get(algorithm)))


def _check_digest(path: Path, algorithm: str, digest: str, expected: str) -> None:
    """Raise :class:`CheckpointError` when a file's digest is not the one ``checksums.json`` lists."""
    if digest != expected:
        label = CHECKSUM_ALGORITHMS[algorithm].label
        raise CheckpointError(
            f"{path} is damaged: its {label} is {_short(digest)}, but {_short(expected)} was written "
            f"(same size, different bytes; see {CHECKSUMS_NAME})."
        )


#: From this size on, ``verify="full"`` runs its CRC pass on a worker thread while the file is parsed.
OVERLAP_MIN_BYTES = 1 << 20


@contextmanager
def _running_beside(task: Callable[[], None]) -> Iterator[None]:
    """Run ``task`` on a worker thread while the body of the ``with`` runs; on exit wait for it.

    The task's exception is raised on exit, and in place of the body's own one when both fail (the
    task checks the files the body parses: a damaged file is the cause of the body's error).
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            task()
        except BaseException as exc:  # handed to the calling thread, raised there
            failure.append(exc)

    worker = threading.Thread(target=run, name="optsched-checkpoint", daemon=True)
    worker.start()
    try:
        yield
    except BaseException:
        worker.join()
        if failure:
            raise failure[0] from None
        raise
    worker.join()
    if failure:
        raise failure[0]


@contextmanager
def verified_while_parsing(path: str | os.PathLike, verify: str) -> Iterator[None]:
    """Check a file (:func:`verify_file`) while the body of the ``with`` parses it.

    The size check runs first, inline. With ``verify="full"`` the CRC pass over a file of
    :data:`OVERLAP_MIN_BYTES` or more then runs on a worker thread: the CRC releases the GIL, so it
    overlaps torch reading the same page-cached bytes on another core instead of adding a pass. The body must only parse into new objects (nothing it does may be kept if the check
    fails): it runs before the verdict. A damaged file raises :class:`CheckpointError` on exit even
    when the body parsed it, and in place of the body's own error (the damage is its cause). Loaders
    called inside may be given ``verify="size"``: the full check is this one's.

    Example::

        with verified_while_parsing(optimizer_file, "full"):
            state = safe_torch_load(optimizer_file, verify="size")   # parse only
        optimizer.load_state_dict(state)                             # applied once the file passed
    """
    verify = check_choice("verify", verify, VERIFY_LEVELS, what="verification level")
    path = Path(path)
    if verify != "full" or path.stat().st_size < OVERLAP_MIN_BYTES:
        verify_file(path, verify)
        yield
        return
    verify_file(path, "size")  # a truncated file is refused before anything reads it
    with _running_beside(lambda: verify_file(path, "full")):
        yield


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
    with ``model.state_dict()``. A tied tensor (saved once) may be missing under its other names.

    Raises:
        FileNotFoundError: no ``model.safetensors`` in ``directory``.
        CheckpointError: the file is damaged (checksum, or not a readable safetensors file).
        ValueError: the file's tensors do not match the model (names missing or unexpected, shapes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a checkpoint needs {WEIGHTS_NAME}.")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    verify_file(path, verify)
    try:
        saved = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is damaged: not a readable safetensors file ({exc}).") from None
    _check_weights_match(model.state_dict(), saved, path)
    return saved


def apply_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (from :func:`read_model_weights`) into ``model``'s tensors, in place."""
    model.load_state_dict(weights, strict=False)  # the names left out are tied to loaded ones (checked)


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
    :func:`load_model_weights`.

    Returns:
        :func:`read_optimizer_state`'s dict for :func:`load_optimizer_state` (``saved=``), or ``None``
        without an ``optimizer.pt``.

    Raises:
        FileNotFoundError: no ``model.safetensors``.
        CheckpointError: a damaged file (a damaged optimizer file after the weights were loaded leaves
            the model with the checkpoint's weights, which passed their check).
        ValueError: the weights do not match the model.
    """
    verify = check_choice("verify", verify, VERIFY_LEVELS, what="verification level")
    if not (Path(checkpoint) / OPTIMIZER_NAME).is_file():
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


# ---- optimizer / scheduler files -----------------------------------------------------------------


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
    almost no cost to the load, and nothing parsed is returned before the check passed. Other entries
    are checked beside the parser (:func:`verified_while_parsing`). A damaged file is reported in
    place of the parser's error.

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
    else:
        verify_file(path, "size")  # a truncated file is refused before anything reads it
        with SharedFileCrc(path) as shared:
            big = shared.size >= OVERLAP_MIN_BYTES  # a helper thread pays off from here on
            try:
                with _maybe_beside(_then(beside, shared.help) if big else beside):
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


def _recorded_crc32(path: Path) -> str | None:
    """The whole-file CRC-32 that ``checksums.json`` lists for ``path``, or None (no entry, another
    algorithm, a legacy per-record entry)."""
    recorded = _recorded_checksums(path.parent)
    if recorded is None or recorded[0] != "crc32":
        return None
    entry = recorded[1].get(path.name)
    if not isinstance(entry, dict) or "zip_crc32" in entry or not isinstance(entry.get("crc32"), str):
        return None
    return entry["crc32"]


def _parse_torch_file(source: Any, path: Path) -> Any:
    """:func:`_torch_load_weights_only` of ``source`` (a path or an open file), its errors as
    :class:`CheckpointError` naming ``path``."""
    try:
        return _torch_load_weights_only(source)
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


def _torch_load_weights_only(source: Any) -> Any:
    allow: list[Any] = []
    try:
        import numpy as np

        allow = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        core = getattr(np, "_core", None) or np.core
        allow.append(core.multiarray._reconstruct)
    except ImportError:  # numpy is optional: without it there is no numpy state to load either
        pass
    with torch.serialization.safe_globals(allow):
        return torch.load(source, map_location="cpu", weights_only=True)


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


def _is_plain_object(value: Any) -> bool:
    """An object pickle would rebuild as ``cls.__new__(cls)`` + its ``__dict__``: no custom reduce or state
    protocol, no ``__slots__`` (so ``vars`` is its whole state)."""
    cls = type(value)
    return (
        isinstance(getattr(value, "__dict__", None), dict)
        and not hasattr(cls, "__slots__")
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and getattr(cls, "__getstate__", object.__getstate__) is object.__getstate__
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
    """Number and total bytes of the storages (``torch.save`` records) of an optimizer state's tensors."""
    storages: dict[tuple[str, int], int] = {}
    state = state_dict.get("state")
    for _, _, value in _state_tensors(state) if isinstance(state, dict) else ():
        storage = value.untyped_storage()
        storages[(str(value.device), storage.data_ptr())] = storage.nbytes()
    return len(storages), sum(storages.values())


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
