"""Integrity of checkpoint files: ``checksums.json`` written on save, every file checked against it on load.

``checksums.json`` lists the size and CRC-32 of every file of a checkpoint (:func:`write_checksums`); the
CRC of a file optsched writes is computed while it is written or on a worker thread as soon as it is
complete (:func:`checksum_in_background`), so a save makes no pass of its own. A load checks a file's
size and, with ``verify="full"`` (:data:`VERIFY_LEVELS`), every byte (:func:`verify_file`), for a large
file beside the parser on a worker thread (:func:`verified_while_parsing`); a torch file that
``checksums.json`` does not list is checked through the CRC-32s of its own zip records
(:func:`zip_records`). A file that fails raises :class:`CheckpointError` naming the file and the fault,
and so does a file ``checksums.json`` lists that is gone (:func:`check_recorded_files_present`,
:func:`file_present`): a loader never takes it for one that was not written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optsched._validation import check_choice
from optsched.trainer.crc import (
    ZIP_LOCAL_HEADER_SIZE,
    ZIP_LOCAL_SIGNATURE,
    crc32,
    file_pieces,
    record_data_start,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKSUMS_NAME",
    "CHECKSUM_ALGORITHM",
    "CHECKSUM_ALGORITHMS",
    "DEFAULT_VERIFY",
    "OVERLAP_MIN_BYTES",
    "VERIFY_LEVELS",
    "CheckpointError",
    "ChecksumAlgorithm",
    "check_recorded_files_present",
    "checksum_in_background",
    "file_checksum",
    "file_present",
    "missing_recorded_files",
    "verified_while_parsing",
    "verify_file",
    "write_checksums",
    "zip_records",
]

CHECKSUMS_NAME = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint file is damaged, incomplete or untrusted; the message names the file and the fault."""


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
    truncated or bit-flipped file from a good one before parsing it. An entry is ``{"size": bytes, "crc32":
    "<8 hex digits>"}``: the whole file's CRC-32, computed while it was written
    (:func:`~optsched.trainer.optimizer_state.save_optimizer_state`), on a worker thread once it was
    (:func:`checksum_in_background`), or else now over the page cache (~20 ms per 600 MB with zlib-ng). A
    whole-file CRC can be assembled from pieces checked by any thread
    (:class:`~optsched.trainer.crc.SharedFileCrc`, or one GIL-free call beside the parser,
    :func:`verified_while_parsing`); checking a torch file through its records' own CRC-32s instead (what
    checksums.json files of optsched 0.1.0 ask for with ``"zip_crc32": <record count>``, still read) costs
    no pass on save, but one call per record, which contends with ``torch.load``'s Python unpickler for the
    GIL and ran 3x slower beside it.
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


def missing_recorded_files(directory: str | os.PathLike) -> list[str]:
    """The names that ``checksums.json`` of ``directory`` lists but that are not files in it, sorted.

    Empty without a ``checksums.json`` (a transformers checkpoint): nothing records what was written.

    Raises:
        CheckpointError: ``checksums.json`` is unreadable.
    """
    directory = Path(directory)
    recorded = _recorded_checksums(directory)
    if recorded is None:
        return []
    return sorted(name for name in recorded[1] if not (directory / name).is_file())


def _missing_error(directory: Path, names: Sequence[str]) -> CheckpointError:
    """The error for files that ``checksums.json`` records as written but that are gone."""
    what = f"{directory / names[0]} is missing" if len(names) == 1 else f"{directory} is missing {', '.join(names)}"
    return CheckpointError(
        f"{what}, but {CHECKSUMS_NAME} records {'it' if len(names) == 1 else 'them'} as written: the "
        "checkpoint is incomplete (a file deleted or lost in a copy: truncated to nothing). Accepted: a "
        f"checkpoint with every file its {CHECKSUMS_NAME} lists; resume from another checkpoint, or, to "
        f"resume without {'it' if len(names) == 1 else 'them'} on purpose, remove the "
        f"entr{'y' if len(names) == 1 else 'ies'} from {directory / CHECKSUMS_NAME}."
    )


def check_recorded_files_present(directory: str | os.PathLike) -> None:
    """Raise unless every file that ``checksums.json`` of ``directory`` lists is there.

    A resume calls this before it reads or applies anything: a loader that finds no ``optimizer.pt``,
    ``scheduler.pt`` or ``rng_state.pth`` goes on without it (``save_only_model``, a transformers
    checkpoint), which for a file that was written would silently resume a different run. Without a
    ``checksums.json`` nothing is checked.

    Raises:
        CheckpointError: a listed file is missing (all of them named), or ``checksums.json`` is unreadable.
    """
    missing = missing_recorded_files(directory)
    if missing:
        raise _missing_error(Path(directory), missing)


def file_present(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file; for a loader that goes on without a file that was never written.

    Returns:
        True for a file; False for a missing one that no ``checksums.json`` beside it lists.

    Raises:
        CheckpointError: ``path`` is missing but its directory's ``checksums.json`` lists it (it was
            written, so it was lost), or ``checksums.json`` is unreadable.
    """
    path = Path(path)
    if path.is_file():
        return True
    recorded = _recorded_checksums(path.parent)
    if recorded is not None and path.name in recorded[1]:
        raise _missing_error(path.parent, [path.name])
    return False


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
        CheckpointError: ``checksums.json`` is unreadable, the file it lists is missing, or the size, a
            record count or a checksum differs (the message names the file and gives both values).
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
    if not path.is_file():
        raise _missing_error(path.parent, [path.name])
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
    overlaps torch reading the same page-cached bytes on another core instead of adding a pass. The
    body must only parse into new objects (nothing it does may be kept if the check fails): it runs
    before the verdict. A damaged file raises :class:`CheckpointError` on exit even
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
