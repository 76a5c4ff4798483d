"""torch.save with its record CRC-32s filled in by zlib-ng while it writes (optsched.trainer.crc)."""

from __future__ import annotations

import io
import os
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optsched.trainer import checkpoint as ckpt
from optsched.trainer import crc, integrity, optimizer_state

SERIALIZATION_ID = ".data/serialization_id"  # torch derives it from the CRCs it computed: differs


def _record_crcs(data: bytes) -> dict[str, int]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {r.filename.split("/", 1)[1]: r.CRC for r in archive.infolist()}


#: torch < 2.5 has no switch for its own record CRCs (it always computes them).
HAS_CRC_OPTION = hasattr(torch.serialization, "set_crc32_options")
needs_crc_option = pytest.mark.skipif(not HAS_CRC_OPTION, reason="torch < 2.5: no set_crc32_options")


def _torch_own(obj) -> bytes:
    """What torch.save writes into a file object with its own CRCs (the same record names as ours)."""
    buffer = io.BytesIO()
    if not HAS_CRC_OPTION:
        torch.save(obj, buffer)
        return buffer.getvalue()
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        torch.save(obj, buffer)
    finally:
        torch.serialization.set_crc32_options(before)
    return buffer.getvalue()


def _check_file(path: Path, obj, value: int, reference: bytes | None = None) -> None:
    data = path.read_bytes()
    assert value == zlib.crc32(data)  # the returned CRC is the file's, patched fields included
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every record matches its CRC-32
    ours, theirs = _record_crcs(data), _record_crcs(reference or _torch_own(obj))
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if k != SERIALIZATION_ID} == {
        k: v for k, v in theirs.items() if k != SERIALIZATION_ID
    }


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "state": {
            0: {"exp_avg": torch.randn(64, 32, generator=g), "step": torch.tensor(3.0)},
            1: {"exp_avg": torch.randn(7, generator=g).to(torch.bfloat16), "empty": torch.zeros(0)},
        },
        "param_groups": [{"lr": 1e-3, "params": [0, 1], "name": "decay"}],
    }


def test_records_carry_the_crcs_torch_would_write_and_the_file_crc_is_returned(tmp_path):
    obj = _state()
    path = tmp_path / "optimizer.pt"
    value = crc.torch_save_with_crc(obj, path)
    _check_file(path, obj, value)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state"][0]["exp_avg"], obj["state"][0]["exp_avg"])
    assert loaded["param_groups"] == obj["param_groups"]


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 40), max_size=3), min_size=0, max_size=6),
    dtypes=st.lists(st.sampled_from(_DTYPES), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_any_tensors_give_a_valid_zip_and_the_files_crc(tmp_path_factory, shapes, dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    obj = {f"t{i}": (torch.rand(shape, generator=g) * 100).to(dtypes[i]) for i, shape in enumerate(shapes)}
    path = tmp_path_factory.mktemp("crc") / "x.pt"
    value = crc.torch_save_with_crc(obj, path)
    _check_file(path, obj, value)
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == obj.keys() and all(torch.equal(loaded[k], obj[k]) for k in obj)


@needs_crc_option
@pytest.mark.parametrize("before", [True, False])
def test_torchs_own_setting_is_restored(tmp_path, before):
    torch.serialization.set_crc32_options(before)
    try:
        crc.torch_save_with_crc(_state(), tmp_path / "a.pt")
        assert torch.serialization.get_crc32_options() is before
        with pytest.raises(Exception):  # noqa: B017  # whatever pickle raises for a lambda
            crc.torch_save_with_crc({"f": lambda: 0}, tmp_path / "b.pt")
        assert torch.serialization.get_crc32_options() is before
    finally:
        torch.serialization.set_crc32_options(True)


def test_a_failed_save_leaves_no_file(tmp_path):
    with pytest.raises(Exception):  # noqa: B017
        crc.torch_save_with_crc({"f": lambda: 0}, tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()


def test_without_crc32_combine_the_file_is_read_once_more_and_agrees(tmp_path, monkeypatch):
    monkeypatch.setattr(crc, "crc32_combine", None)
    obj = _state(1)
    value = crc.torch_save_with_crc(obj, tmp_path / "x.pt")
    _check_file(tmp_path / "x.pt", obj, value)


def test_a_torch_that_computes_its_own_crcs_gets_the_same_file(tmp_path, monkeypatch):
    obj = _state(2)
    reference = _torch_own(obj)
    monkeypatch.delattr(torch.serialization, "set_crc32_options", raising=False)  # torch < 2.5: no setting
    value = crc.torch_save_with_crc(obj, tmp_path / "x.pt")
    _check_file(tmp_path / "x.pt", obj, value, reference)


def test_a_record_written_in_several_pieces_is_combined(tmp_path, monkeypatch, caplog):
    original = crc._RecordingWriter.write

    def in_halves(self, data):
        view = memoryview(data).cast("B")
        half = view.nbytes // 2
        return original(self, view[:half]) + original(self, view[half:])

    monkeypatch.setattr(crc._RecordingWriter, "write", in_halves)
    obj = _state(3)
    with caplog.at_level("DEBUG", logger=crc.__name__):
        value = crc.torch_save_with_crc(obj, tmp_path / "x.pt")
    _check_file(tmp_path / "x.pt", obj, value)
    if crc.crc32_combine is not None:
        assert "reading it back" not in caplog.text


@needs_crc_option  # torch < 2.5 fills its CRCs itself: nothing to read back
def test_writes_that_do_not_line_up_with_records_are_read_back(tmp_path, monkeypatch, caplog):
    """A writer that merges small writes (as a buffered one would): a record's bytes then start inside a
    write, and are read back from the file."""
    original_write, original_flush = crc._RecordingWriter.write, crc._RecordingWriter.flush
    pending = bytearray()

    def coalescing(self, data):
        view = memoryview(data).cast("B")
        pending.extend(view)
        if len(pending) >= 64:
            chunk = bytes(pending)
            pending.clear()
            original_write(self, chunk)
        return view.nbytes

    def flush(self):
        if pending:
            chunk = bytes(pending)
            pending.clear()
            original_write(self, chunk)
        original_flush(self)

    monkeypatch.setattr(crc._RecordingWriter, "write", coalescing)
    monkeypatch.setattr(crc._RecordingWriter, "flush", flush)
    obj = _state(4)
    with caplog.at_level("DEBUG", logger=crc.__name__):
        value = crc.torch_save_with_crc(obj, tmp_path / "x.pt")
    assert "reading it back" in caplog.text
    _check_file(tmp_path / "x.pt", obj, value)


def test_concurrent_saves_all_get_valid_files(tmp_path):
    objs = [_state(i) for i in range(4)]
    values: dict[int, int] = {}

    def save(i: int) -> None:
        values[i] = crc.torch_save_with_crc(objs[i], tmp_path / f"{i}.pt")

    threads = [threading.Thread(target=save, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        _check_file(tmp_path / f"{i}.pt", objs[i], values[i])


def test_crc32_combine_is_zlib_ngs_when_installed():
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")
    assert crc.crc32_combine is zlib_ng.crc32_combine
    a, b = b"optimizer", b"state" * 100
    assert crc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_the_trainers_optimizer_file_is_listed_with_its_crc(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = ckpt.save_optimizer_state(optimizer, tmp_path)
    ckpt.write_checksums(tmp_path)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    entry = integrity._recorded_checksums(tmp_path)[1][ckpt.OPTIMIZER_NAME]
    assert entry == {"size": path.stat().st_size, "crc32": f"{zlib.crc32(path.read_bytes()):08x}"}
    ckpt.verify_file(path, "full")


# ---- SharedFileCrc: the CRC of a file as it is parsed --------------------------------------------------


def _file(tmp_path: Path, size: int = 600_000) -> tuple[Path, bytes]:
    data = bytes(range(256)) * (size // 256) + b"tail"
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    "reads",
    [
        [],  # nothing read: every byte comes from the gap filling
        [(0, None)],  # all of it at once
        [(100, 70_000), (200_000, 65_536), (400_000, None)],  # large reads with gaps between
        [(300_000, 100_000), (0, 100_000)],  # out of order
        [(0, 100_000), (50_000, 100_000)],  # overlapping
        [(10, 5), (20, 30_000)],  # small reads only
    ],
)
@pytest.mark.parametrize("combine", [True, False])
def test_any_reads_of_any_file_give_its_crc(tmp_path, monkeypatch, reads, combine):
    if not combine:
        monkeypatch.setattr(crc, "crc32_combine", None)
    elif crc.crc32_combine is None:
        pytest.skip("needs zlib-ng")
    path, data = _file(tmp_path)
    with crc.SharedFileCrc(path) as shared:
        f = shared.reader()
        got = []
        for start, size in reads:
            f.seek(start)
            if size is not None and size % 2:
                got.append(f.read(size))
            else:
                buffer = bytearray(len(data) - start if size is None else size)
                got.append(bytes(memoryview(buffer)[: f.readinto(buffer)]))
        shared.help()
        assert shared.value() == zlib.crc32(data)
    assert got == [data[s : None if n is None else s + n] for s, n in reads]


def _torch_file(tmp_path: Path) -> tuple[Path, dict]:
    obj = {f"t{i}": torch.randn(400 + i, 50) for i in range(8)}  # 80 KB records: large reads
    path = tmp_path / "x.pt"
    crc.torch_save_with_crc(obj, path)
    return path, obj


def _regions(path: Path) -> dict[int, int]:
    """``{data start: length}`` of each stored record, parsed here with zipfile and the local headers'
    layout, apart from crc.py's parse (``{}`` for a file that is no readable zip archive)."""
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            regions = {}
            for record in archive.infolist():
                f.seek(record.header_offset)
                name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
                if record.compress_size:
                    regions[record.header_offset + 30 + name_len + extra_len] = record.compress_size
            return regions
    except zipfile.BadZipFile:
        return {}


@pytest.mark.parametrize("when", ["before", "after", "beside"])
def test_records_are_shared_between_the_parser_and_the_helper(tmp_path, when):
    if crc.crc32_combine is None:
        pytest.skip("needs zlib-ng")
    path, obj = _torch_file(tmp_path)
    regions = _regions(path)
    large = {start for start, n in regions.items() if n >= crc._ClaimingReader.MIN_BYTES}
    assert len(large) == len(obj)
    with crc.SharedFileCrc(path) as shared:
        helper = threading.Thread(target=shared.help)
        if when == "before":
            shared.help()
        elif when == "beside":
            helper.start()
        loaded = torch.load(shared.reader(), weights_only=True)
        if when == "after":
            shared.help()
        elif when == "beside":
            helper.join()
        value = shared.value()
        claims = dict(shared._claims)
    assert value == zlib.crc32(path.read_bytes())
    assert all(torch.equal(loaded[k], obj[k]) for k in obj)
    assert set(regions) <= set(claims)  # every record taken exactly once (a claim per offset)
    if when == "before":
        assert {claims[s] for s in regions} == {crc._HELPER}
    if when == "after":  # torch read every large record in one piece and checksummed it as it arrived
        assert {claims[s] for s in large} == {crc._READER}
        assert {claims[s] for s in set(regions) - large} == {crc._HELPER}


def test_a_record_read_in_pieces_is_read_again(tmp_path):
    if crc.crc32_combine is None:
        pytest.skip("needs zlib-ng")
    path, _ = _torch_file(tmp_path)
    start, length = max(_regions(path).items(), key=lambda kv: kv[1])
    with crc.SharedFileCrc(path) as shared:
        f = shared.reader()
        f.seek(start)
        first = crc._ClaimingReader.MIN_BYTES
        f.read(first)  # a large read: claims the record's offset, with part of its length
        f.read(length - first)
        assert shared._claims[start] == crc._READER
        shared.help()  # leaves it: claimed
        assert shared.value() == zlib.crc32(path.read_bytes())  # value() reads it whole


def test_without_the_helper_the_layout_is_read_at_the_end(tmp_path):
    if crc.crc32_combine is None:
        pytest.skip("needs zlib-ng")
    path, _ = _torch_file(tmp_path)
    with crc.SharedFileCrc(path) as shared:
        torch.load(shared.reader(), weights_only=True)
        assert crc._HELPER not in shared._claims.values()
        assert shared.value() == zlib.crc32(path.read_bytes())


class _LoggedFile:
    """A read-only file that logs ``(offset, bytes)`` of every read."""

    def __init__(self, path, mode="rb", log=None):
        self._f = open(path, mode)  # noqa: SIM115 - closed by close()/__exit__
        self.log = log

    def read(self, n=-1):
        at = self._f.tell()
        data = self._f.read(n)
        self.log.append((at, len(data)))
        return data

    def readinto(self, buffer):
        at = self._f.tell()
        n = self._f.readinto(buffer)
        self.log.append((at, n))
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_the_helper_reads_each_header_right_before_its_record_last_first(tmp_path, monkeypatch):
    """On a cold disk, reading every local header first cost one seek each; the helper reads a header and
    then its record's data, from the last record back, and takes the layout from that one pass (the gaps
    last, by then in the page cache, read by the parser): each header is read once."""
    if crc.crc32_combine is None:
        pytest.skip("needs zlib-ng")
    path, _ = _torch_file(tmp_path)
    regions = _regions(path)
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        headers = {r.header_offset for r in archive.infolist()}
    log: list[tuple[int, int]] = []
    with crc.SharedFileCrc(path) as shared:
        monkeypatch.setattr(crc, "open", lambda p, mode="rb": _LoggedFile(p, mode, log), raising=False)
        shared.help()  # only the helper's own handle is logged
        monkeypatch.undo()
        assert shared.value() == zlib.crc32(path.read_bytes())
    header_reads = [i for i, (at, n) in enumerate(log) if at in headers and n == crc.ZIP_LOCAL_HEADER_SIZE]
    data_of = set(regions)
    assert len(header_reads) == len(headers)  # once each: the layout comes from the same pass
    offsets = [log[i][0] for i in header_reads]
    assert offsets == sorted(offsets, reverse=True)  # last record first
    for i in header_reads:  # the next read is that record's data (records of 0 bytes have none)
        if i + 1 < len(log) and log[i + 1][0] not in headers:
            assert log[i + 1][0] in data_of
    assert {start for start, _ in shared._helped.items()} == set(regions)
    assert shared._layout[0] == regions  # the regions a separate parse of the directory finds


def test_the_helper_reads_every_record_and_gap_into_one_buffer(tmp_path, monkeypatch):
    """A 1 MiB buffer per record was a fresh mapping (and 256 page faults) per record while glibc's mmap
    threshold is still low, as in a new process: the helper makes one and reads everything into it."""
    if crc.crc32_combine is None:
        pytest.skip("needs zlib-ng")
    path, _ = _torch_file(tmp_path)
    buffers: list[object] = []
    real = crc.file_pieces

    def logged(f, start, length, piece=1 << 20, buffer=None):
        buffers.append(buffer)
        return real(f, start, length, piece, buffer)

    monkeypatch.setattr(crc, "file_pieces", logged)
    with crc.SharedFileCrc(path) as shared:
        shared.help()
        assert len(buffers) > len(_regions(path))  # the records and the gaps between them
        assert buffers[0] is not None and all(b is buffers[0] for b in buffers)
        assert shared.value() == zlib.crc32(path.read_bytes())
    # Without the helper, value() reads the layout and every record itself: one buffer there too.
    buffers.clear()
    with crc.SharedFileCrc(path) as shared:
        assert shared.value() == zlib.crc32(path.read_bytes())
    assert len(buffers) > len(_regions(path))
    assert buffers[0] is not None and all(b is buffers[0] for b in buffers)


def test_file_pieces_refuses_an_empty_buffer(tmp_path):
    path, _ = _file(tmp_path)
    with open(path, "rb") as f, pytest.raises(ValueError, match="buffer has no room"):
        list(crc.file_pieces(f, 0, 10, buffer=memoryview(bytearray(0))))


@pytest.mark.parametrize("length", [0, 1, 5, 4096, 10_000])
def test_file_pieces_into_a_given_buffer(tmp_path, length):
    path, data = _file(tmp_path)
    buffer = memoryview(bytearray(4096))
    with open(path, "rb") as f:
        pieces = [bytes(p) for p in crc.file_pieces(f, 100, length, buffer=buffer)]
    assert b"".join(pieces) == data[100 : 100 + length]
    assert all(len(p) <= 4096 for p in pieces)


def test_a_file_that_is_no_zip_archive_is_read_whole(tmp_path):
    path, data = _file(tmp_path)
    truncated_zip = tmp_path / "t.pt"
    torch.save({"a": torch.ones(10)}, truncated_zip)
    truncated_zip.write_bytes(truncated_zip.read_bytes()[:-30])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for p in (path, truncated_zip, empty):
        assert _regions(p) == {}
        with crc.SharedFileCrc(p) as shared:
            shared.help()
            assert shared.value() == zlib.crc32(p.read_bytes())


def test_no_positional_io_is_needed(tmp_path, monkeypatch):
    """Windows has no os.pread / os.pwrite (and macOS no os.preadv): saving and checking must not need them."""
    for name in ("pread", "preadv", "pwrite", "pwritev"):
        monkeypatch.delattr(os, name, raising=False)
    obj = _state(6)
    value = crc.torch_save_with_crc(obj, tmp_path / "x.pt")
    _check_file(tmp_path / "x.pt", obj, value)
    with crc.SharedFileCrc(tmp_path / "x.pt") as shared:
        helper = threading.Thread(target=shared.help)
        helper.start()
        torch.load(shared.reader(), weights_only=True)
        helper.join()
        assert shared.value() == value


@pytest.mark.parametrize(("width", "fast"), [(256, True), (4, False)])
def test_large_states_are_written_with_the_crcs_small_ones_by_torch(tmp_path, monkeypatch, width, fast):
    """Records of >= 64 KiB on average go through torch_save_with_crc; many small ones through torch.save
    (Python write calls per record would cost more than torch's CRC pass saves)."""
    used = []
    real = crc.torch_save_with_crc
    monkeypatch.setattr(optimizer_state, "torch_save_with_crc", lambda obj, path: used.append(path) or real(obj, path))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(3)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    path = ckpt.save_optimizer_state(optimizer, tmp_path)
    assert bool(used) is fast
    ckpt.write_checksums(tmp_path)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    entry = integrity._recorded_checksums(tmp_path)[1][ckpt.OPTIMIZER_NAME]
    assert entry == {"size": path.stat().st_size, "crc32": f"{zlib.crc32(path.read_bytes()):08x}"}
    loaded = ckpt.read_optimizer_state(tmp_path)
    assert torch.equal(loaded["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
