"""CRC-32 for checkpoint files: the fastest implementation installed, computed as files are written and read.

``torch.save`` writes a zip archive and computes every record's CRC-32 itself, with miniz's
table-driven loop (~7 GB/s here): on a 400 MB ``optimizer.pt`` that is ~60 ms of a ~260 ms save
(``benchmarks/checkpoint_io.py``). :func:`torch_save_with_crc` turns torch's own computation off
(``torch.serialization.set_crc32_options``) and fills the same CRC-32s in from zlib-ng, computed on
the bytes while torch writes them, and returns the whole file's CRC-32 for ``checksums.json`` at no
extra pass over the file. :class:`SharedFileCrc` is the reverse: the CRC of a file computed from the
bytes ``torch.load`` reads, with a helper thread taking the records it has not reached yet, so
checking a file costs its parser almost no time.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ZIP_LOCAL_HEADER_SIZE",
    "ZIP_LOCAL_SIGNATURE",
    "SharedFileCrc",
    "crc32",
    "crc32_combine",
    "file_pieces",
    "record_data_start",
    "torch_save_with_crc",
]


def _load_crc32() -> tuple[Callable[..., int], Callable[[int, int, int], int] | None]:
    """zlib-ng's CRC-32 (and its ``crc32_combine``) when installed, else the standard library's crc32.

    zlib-ng folds with carry-less multiplication (~35 GB/s on this machine's page cache) where CPython's
    zlib 1.2 runs a table loop (~6 GB/s): on a 600 MB checkpoint, ~17 ms instead of ~100 ms. Both
    release the GIL on large buffers, which a check beside the parser relies on
    (``integrity.verified_while_parsing``). The standard library has no ``crc32_combine``.
    """
    try:
        from zlib_ng import zlib_ng
    except ImportError:  # a platform without a zlib-ng wheel (see pyproject.toml): slower, same result
        return zlib.crc32, None
    return zlib_ng.crc32, getattr(zlib_ng, "crc32_combine", None)


_crc32, _combine = _load_crc32()

#: ``crc32(data, value=0) -> int``, the zip / gzip CRC-32 (IEEE 802.3 polynomial).
crc32: Callable[..., int] = _crc32

#: ``crc32_combine(crc_a, crc_b, len_b) -> crc32(a + b)`` without the bytes (zlib-ng), or ``None``.
crc32_combine: Callable[[int, int, int], int] | None = _combine

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length (30 bytes)
#: How every local file header of a zip archive (and so every ``torch.save`` file) starts.
ZIP_LOCAL_SIGNATURE = b"PK\x03\x04"
#: Bytes of a local file header before its name and extra field.
ZIP_LOCAL_HEADER_SIZE = _LOCAL_HEADER.size
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"
_CENTRAL_ENTRY = struct.Struct("<4s24xHHH12x")  # signature, ..., name, extra, comment lengths (46 bytes)
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_CRC_IN_LOCAL_HEADER = 14
_CRC_IN_DESCRIPTOR = 4
_CRC_IN_CENTRAL_ENTRY = 16
_HAS_DESCRIPTOR = 0x08  # general purpose flag bit 3: the CRC and sizes follow the data

_OPTION_LOCK = threading.Lock()


class _RecordingWriter:
    """What ``torch.save`` writes into: passes every write on and keeps its offset, length and CRC-32.

    torch's zip writer hands over each record's bytes in one ``write`` (a memoryview of the tensor's
    own memory), so the CRC here runs on bytes already in cache and needs no read of the file.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self.crcs: list[int] = []
        self.size = 0

    def write(self, data: Any) -> int:
        with memoryview(data) as view:
            n = view.nbytes
            self.offsets.append(self.size)
            self.lengths.append(n)
            self.crcs.append(crc32(view))
            self._raw.write(view)  # a buffered file writes all of it (a raw one could stop short)
        self.size += n
        return n

    def flush(self) -> None:
        self._raw.flush()


@contextmanager
def _torch_record_crcs_off() -> Any:
    """``torch.save`` without its own CRC-32 pass for the duration (the setting is process-wide: a
    ``torch.save`` on another thread meanwhile writes zero CRCs too, which ``torch.load`` accepts).
    A torch without the setting (< 2.5) computes them as before; the values filled in are the same."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    set_ = getattr(torch.serialization, "set_crc32_options", None)
    if get is None or set_ is None:
        yield
        return
    with _OPTION_LOCK:
        before = get()
        set_(False)
        try:
            yield
        finally:
            set_(before)


def torch_save_with_crc(obj: Any, path: str | os.PathLike) -> int:
    """``torch.save(obj, path)``, with the record CRC-32s computed by :data:`crc32`; the file's CRC-32.

    The file is what ``torch.save`` writes into a file object: every record carries its CRC-32 in its
    data descriptor and in the central directory (``zipfile.ZipFile(path).testzip()`` passes and
    ``torch.load`` reads it), the folder inside the archive is named ``archive`` (as for any file
    object; ``torch.save`` to a path names it after the file), and ``.data/serialization_id`` differs
    (torch derives it from the CRCs it computed itself).

    A failed save (an object torch cannot pickle, a full disk) removes the partial file and raises.

    Returns:
        The CRC-32 of the whole file as written: combined from the CRCs of the writes and of the
        patched bytes (zlib-ng's ``crc32_combine``), or, without zlib-ng, one pass over the file.
    """
    path = Path(path)
    try:
        with open(path, "w+b") as f:
            writer = _RecordingWriter(f)
            with _torch_record_crcs_off():
                torch.save(obj, writer)  # type: ignore[arg-type]  # anything with write() and flush()
            f.flush()
            patches = _fill_record_crcs(f, writer)
            for offset, value in patches.items():
                f.seek(offset)
                f.write(struct.pack("<I", value))
            f.flush()
            if crc32_combine is None:
                return _file_crc(f, 0, writer.size)
            return _whole_file_crc(f, writer, patches, crc32_combine)
    except BaseException:
        path.unlink(missing_ok=True)  # a half-written file is nobody's data: torch.save would leave it
        raise


def file_pieces(
    f: BinaryIO, start: int, length: int, piece: int = 1 << 20, buffer: memoryview | None = None
) -> Iterator[memoryview]:
    """``length`` bytes of an open file from ``start``, read into one reused buffer of ``piece`` bytes
    (cache-sized: a checksum reads what the copy just wrote; no fresh allocation per piece). Each view
    is valid until the next one. Moves the file's position: one thread per file object.

    Args:
        f, start, length: the file and the bytes to read.
        piece: the size of the buffer made for this call when ``buffer`` is not given.
        buffer: a writable byte buffer to read into instead, for a caller that reads many ranges
            (one allocation for all of them: glibc serves a 1 MiB block as fresh pages from the
            kernel until its mmap threshold has risen, so a buffer per range can cost page faults).

    Raises:
        OSError: the file ends before ``start + length``.
    """
    end = start + length
    if buffer is None:
        buffer = memoryview(bytearray(min(length, piece)))
    elif len(buffer) == 0 and length:
        raise ValueError("file_pieces: buffer has no room; accepted: a writable buffer of at least one byte")
    f.seek(start)
    while start < end:
        n = f.readinto(buffer[: min(end - start, len(buffer))])
        if not n:
            raise OSError(f"short read at byte {start} while checksumming")
        yield buffer[:n]
        start += n


def _file_crc(f: BinaryIO, start: int, length: int, value: int = 0, buffer: memoryview | None = None) -> int:
    """CRC-32 of ``length`` bytes of an open file from ``start`` (:func:`file_pieces`, into ``buffer``)."""
    for data in file_pieces(f, start, length, buffer=buffer):
        value = crc32(data, value)
    return value


def record_data_start(record: zipfile.ZipInfo, header: bytes) -> int:
    """Where a stored zip record's bytes begin: after its local header, name and extra field.

    Args:
        record: the record, from the zip directory.
        header: the :data:`ZIP_LOCAL_HEADER_SIZE` bytes of the file at ``record.header_offset``.

    Raises:
        ValueError: a compressed record, or no local header there (a damaged or truncated file).
    """
    if record.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"record {record.filename!r} is compressed; torch.save stores its records")
    if len(header) < ZIP_LOCAL_HEADER_SIZE or header[: len(ZIP_LOCAL_SIGNATURE)] != ZIP_LOCAL_SIGNATURE:
        raise ValueError(f"no local header for record {record.filename!r} at byte {record.header_offset}")
    _, name_len, extra_len = _LOCAL_HEADER.unpack(header[:ZIP_LOCAL_HEADER_SIZE])
    return record.header_offset + ZIP_LOCAL_HEADER_SIZE + name_len + extra_len


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    """``size`` bytes of an open file from ``offset`` (fewer at its end)."""
    f.seek(offset)
    return f.read(size)


def _fill_record_crcs(f: BinaryIO, writer: _RecordingWriter) -> dict[int, int]:
    """``{file offset: CRC-32}`` of the CRC fields torch left at 0: in each record's data descriptor
    (or local header) and in its central-directory entry.

    A record's CRC is combined from the CRCs of the writes that tile its bytes (torch writes each
    record's data in one call), or read back from the file where writes do not line up with it.
    """
    f.seek(0)
    with zipfile.ZipFile(f) as archive:  # reads the central directory only
        records = archive.infolist()
        central_start = archive.start_dir  # type: ignore[attr-defined]  # where the first entry begins
    if records and all(r.CRC for r in records if r.file_size):
        return {}  # this torch computed them itself (no set_crc32_options)
    central = _read_at(f, central_start, writer.size - central_start)
    patches: dict[int, int] = {}
    entry = 0
    for record in records:
        start = record_data_start(record, _read_at(f, record.header_offset, ZIP_LOCAL_HEADER_SIZE))
        sig_c, c_name, c_extra, c_comment = _CENTRAL_ENTRY.unpack_from(central, entry)
        if sig_c != _CENTRAL_SIGNATURE:
            raise ValueError(f"unexpected zip layout at record {record.filename!r} of a torch.save file")
        value = _record_crc(f, writer, start, record.compress_size)
        end = start + record.compress_size
        if record.flag_bits & _HAS_DESCRIPTOR:
            if _read_at(f, end, len(_DESCRIPTOR_SIGNATURE)) != _DESCRIPTOR_SIGNATURE:
                raise ValueError(f"no data descriptor after record {record.filename!r} of a torch.save file")
            patches[end + _CRC_IN_DESCRIPTOR] = value
        else:
            patches[record.header_offset + _CRC_IN_LOCAL_HEADER] = value
        patches[central_start + entry + _CRC_IN_CENTRAL_ENTRY] = value
        entry += _CENTRAL_ENTRY.size + c_name + c_extra + c_comment
    return patches


def _record_crc(f: BinaryIO, writer: _RecordingWriter, start: int, length: int) -> int:
    """CRC-32 of the file's bytes ``[start, start + length)``, from the writes when they tile it exactly."""
    if length == 0:
        return 0
    i = bisect.bisect_left(writer.offsets, start)
    if crc32_combine is not None and i < len(writer.offsets) and writer.offsets[i] == start:
        value, covered = writer.crcs[i], writer.lengths[i]
        while covered < length and i + 1 < len(writer.offsets):
            i += 1
            value, covered = crc32_combine(value, writer.crcs[i], writer.lengths[i]), covered + writer.lengths[i]
        if covered == length:
            return value
    elif i < len(writer.offsets) and writer.offsets[i] == start and writer.lengths[i] == length:
        return writer.crcs[i]
    logger.debug("torch.save record at byte %d was not written in whole pieces; reading it back", start)
    return _file_crc(f, start, length)


def _whole_file_crc(f: BinaryIO, writer: _RecordingWriter, patches: dict[int, int], combine: Callable[..., int]) -> int:
    """CRC-32 of the file after patching: the writes' CRCs combined in order, the patched writes re-read."""
    touched = {bisect.bisect_right(writer.offsets, at) - 1 for offset in patches for at in (offset, offset + 3)}
    value = 0
    for i, (offset, length) in enumerate(zip(writer.offsets, writer.lengths)):
        piece = _file_crc(f, offset, length) if i in touched else writer.crcs[i]
        value = combine(value, piece, length)
    return value


_READER, _HELPER = "reader", "helper"
_HELPER_PIECE = 1 << 20  # SharedFileCrc.help's read buffer: cache-sized, like file_pieces' default


class SharedFileCrc:
    """The CRC-32 of a file being parsed, shared out between the parsing thread and a helper thread.

    The file's zip records (a ``torch.save`` file) are the units of work. The parser reads through
    :meth:`reader`: each large read is checksummed right after it, while its bytes are in cache, and
    claimed by its offset. :meth:`help`, on another thread, reads the zip directory, checksums the
    bytes between the records (headers), then the records nobody has claimed yet, from the last one
    back, from the page cache. Each record is taken once (the first claim wins). :meth:`value` combines
    it all: a check of every byte that costs the parser little more than the CRC of what it read. A
    record the parser read in pieces, a helper that did not run, a file that is not a zip archive and
    a machine without ``crc32_combine`` (no zlib-ng) are handled in :meth:`value` by reading what is
    missing (the whole file, for the last two).

    Use as a context manager (it holds the file open)::

        with SharedFileCrc(path) as shared:
            obj = torch.load(shared.reader(), weights_only=True)   # another thread may call shared.help()
        digest = shared.value()                                    # after the helper has returned
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = Path(path)
        self._file = open(path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        self._claims: dict[int, str] = {}  # offset -> who took it (dict.setdefault: atomic under the GIL)
        self._crcs: dict[int, tuple[int, int]] = {}  # offset -> (length, CRC-32), the parser's reads
        self._helped: dict[int, tuple[int, int]] = {}  # record start -> (length, CRC-32), the helper's
        self._layout: tuple[dict[int, int], dict[int, tuple[int, int]]] | None = None  # regions, gaps

    def __enter__(self) -> SharedFileCrc:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def reader(self) -> _ClaimingReader:
        """The file, for the parser (``read`` / ``readinto`` / ``seek`` / ``tell``), from byte 0."""
        self._file.seek(0)
        return _ClaimingReader(self)

    def help(self) -> None:
        """Checksum the records not yet claimed, last first (for a thread beside the parser; its own
        file handle, so no position is shared).

        Each record's local header is read right before its data: on a cold disk that is one seek per
        record, where reading every header first would be ~250 scattered small reads up front on a
        50M-parameter AdamW state. The records found that way (all of them, or those before a
        damaged entry) with the bytes between them, checksummed last, tile the file: that is the
        layout :meth:`value` combines, with no second parse of the zip directory. By then the
        parser has brought those bytes into the page cache.
        """
        if crc32_combine is None:
            return
        buffer = memoryview(bytearray(_HELPER_PIECE))  # one for every record and gap (file_pieces)
        with open(self._path, "rb") as own:
            regions: dict[int, int] = {}
            for start, length in _records_from_the_end(own, self.size):
                regions[start] = length
                if self._claims.setdefault(start, _HELPER) is _HELPER:
                    self._helped[start] = (length, _file_crc(own, start, length, buffer=buffer))
            self._layout = regions, _gaps(own, self.size, regions, buffer)

    def _read(self, start: int, view: memoryview) -> None:
        """The parser read ``view`` at ``start``: a large read is checksummed now and claimed."""
        if view.nbytes >= _ClaimingReader.MIN_BYTES and self._claims.setdefault(start, _READER) is _READER:
            self._crcs[start] = (view.nbytes, crc32(view))

    def value(self) -> int:
        """The CRC-32 of the whole file (call once the parser and the helper are done)."""
        if crc32_combine is None:
            return _file_crc(self._file, 0, self.size)
        buffer: memoryview | None = None  # made once if anything must be read here (see help)
        if self._layout is None:
            buffer = memoryview(bytearray(_HELPER_PIECE))
            regions, gaps = _layout(self._file, self.size, buffer)
        else:
            regions, gaps = self._layout
        pieces: list[tuple[int, int, int]] = list((start, n, c) for start, (n, c) in gaps.items())
        for start, length in regions.items():
            done = self._helped.get(start) or self._crcs.get(start)
            if done is not None and done[0] == length:
                pieces.append((start, length, done[1]))
            else:  # read in pieces, or not read at all: read now
                if buffer is None:
                    buffer = memoryview(bytearray(_HELPER_PIECE))
                pieces.append((start, length, _file_crc(self._file, start, length, buffer=buffer)))
        value, at = 0, 0
        for start, length, piece in sorted(pieces):
            if start != at:  # cannot happen (the layout tiles the file); if it did, one pass is right
                logger.warning("CRC pieces of %s do not tile it (byte %d vs %d); reading it whole", self._path, at, start)
                return _file_crc(self._file, 0, self.size)
            value, at = crc32_combine(value, piece, length), start + length
        return value


def _layout(
    f: BinaryIO, size: int, buffer: memoryview | None = None
) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
    """``({record start: length}, {gap start: (length, CRC-32)})``: the stored records of a zip file
    (:func:`_records_from_the_end`, the same parse as :meth:`SharedFileCrc.help`'s) and the bytes
    around them, which together tile the file; no records and one gap (the whole file) for anything
    else. The gaps are read into ``buffer`` when given (:func:`file_pieces`)."""
    regions = dict(_records_from_the_end(f, size))
    return regions, _gaps(f, size, regions, buffer)


def _gaps(
    f: BinaryIO, size: int, regions: dict[int, int], buffer: memoryview | None = None
) -> dict[int, tuple[int, int]]:
    """``{start: (length, CRC-32)}`` of the bytes of the file outside ``regions`` (disjoint, inside the
    file): the gaps which, with the regions, tile it (the whole file when there are no regions); read
    into ``buffer`` when given (:func:`file_pieces`)."""
    gaps: dict[int, tuple[int, int]] = {}
    at = 0
    for start in sorted(regions):
        if start > at:
            gaps[at] = (start - at, _file_crc(f, at, start - at, buffer=buffer))
        at = start + regions[start]
    if at < size or size == 0:
        gaps[at] = (size - at, _file_crc(f, at, size - at, buffer=buffer))
    return gaps


def _records_from_the_end(f: BinaryIO, size: int) -> Iterator[tuple[int, int]]:
    """``(start, length)`` of the data of each stored record of a zip file, the last record first, each
    local header read just before its record's data. Nothing for a file that is not a zip archive;
    stops at the first record that does not fit before the next one (a damaged directory:
    :meth:`SharedFileCrc.value` reads whatever is left)."""
    try:
        with zipfile.ZipFile(f) as archive:
            records = sorted(archive.infolist(), key=lambda record: record.header_offset, reverse=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return
    limit = size  # where the record after this one (or the central directory) begins
    for record in records:
        try:
            start = record_data_start(record, _read_at(f, record.header_offset, ZIP_LOCAL_HEADER_SIZE))
        except (OSError, ValueError):
            return
        if start + record.compress_size > limit:
            return
        if record.compress_size:
            yield start, record.compress_size
        limit = record.header_offset


class _ClaimingReader:
    """What the parser reads from: the file, with each large read handed to :meth:`SharedFileCrc._read`.

    torch reads each record's bytes straight into the tensor's memory with ``readinto``; the CRC then
    runs on bytes just read, still in cache, before torch goes on.
    """

    MIN_BYTES = 1 << 16  # smaller reads (headers, the zip directory) are left to the gaps' CRCs

    def __init__(self, shared: SharedFileCrc) -> None:
        self._shared = shared
        self._raw = shared._file

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        start = self._raw.tell()
        data = self._raw.read(size)
        with memoryview(data) as view:
            self._shared._read(start, view)
        return data

    def readinto(self, buffer: Any) -> int:
        start = self._raw.tell()
        n = self._raw.readinto(buffer) or 0
        with memoryview(buffer) as view, view.cast("B") as flat, flat[:n] as got:
            self._shared._read(start, got)
        return n
