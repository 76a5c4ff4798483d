"""How checkpoint files are written and read fast: zlib-ng CRC-32, small optimizer tensors packed into
one record, CRC checks beside the parser, weights loaded on a worker thread (optsched.trainer.checkpoint)."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from optsched.trainer import checkpoint as ckpt
from optsched.trainer import integrity, torch_files
from optsched.trainer.checkpoint import CheckpointError
from optsched.trainer.crc import torch_save_with_crc

# ---- CRC-32 -----------------------------------------------------------------------------------------


@settings(max_examples=50)
@given(data=st.binary(max_size=20_000), start=st.integers(0, 2**32 - 1))
def test_crc32_gives_zlibs_values(data, start):
    assert ckpt.crc32(data) == zlib.crc32(data)
    assert ckpt.crc32(data, start) == zlib.crc32(data, start)  # the running form checksums use


def test_crc32_is_zlib_ngs_when_installed():
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")
    assert ckpt.crc32 is zlib_ng.crc32


# ---- small optimizer tensors: one record ------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _stepped(make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    optimizer = make_optimizer(model.parameters())
    for _ in range(2):
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


OPTIMIZERS = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adam_for_loop": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


def _records(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_packed_state_saves_fewer_records_and_loads_back_exactly(tmp_path, name):
    model, optimizer = _stepped(OPTIMIZERS[name])
    before = {k: v.clone() if torch.is_tensor(v) else v for s in optimizer.state.values() for k, v in s.items()}
    ckpt.save_optimizer_state(optimizer, tmp_path)
    plain = tmp_path / "plain.pt"
    torch.save(optimizer.state_dict(), plain)
    small = sum(1 for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.nbytes <= 64)
    assert len(_records(tmp_path / ckpt.OPTIMIZER_NAME)) == len(_records(plain)) - max(small - 1, 0)
    assert (tmp_path / ckpt.OPTIMIZER_NAME).stat().st_size <= plain.stat().st_size
    # the live state was not touched
    for s in optimizer.state.values():
        for v in s.values():
            if torch.is_tensor(v) and v.nbytes <= 64:
                assert v.untyped_storage().nbytes() == v.nbytes
    fresh_model = _model()
    fresh = OPTIMIZERS[name](fresh_model.parameters())
    ckpt.load_optimizer_state(fresh, tmp_path)
    after = {k: v for s in fresh.state.values() for k, v in s.items()}
    assert before.keys() == after.keys()
    pointers = set()
    for s in fresh.state.values():
        for key, value in s.items():
            if torch.is_tensor(value):
                assert value.untyped_storage().nbytes() == value.nbytes, key  # unpacked: memory of its own
                pointers.add(value.untyped_storage().data_ptr())
    assert len(pointers) == sum(torch.is_tensor(v) for s in fresh.state.values() for v in s.values())
    for (k1, s1), (k2, s2) in zip(optimizer.state_dict()["state"].items(), fresh.state_dict()["state"].items()):
        assert k1 == k2
        for key in s1:
            assert torch.equal(torch.as_tensor(s1[key]), torch.as_tensor(s2[key])), key


def test_a_packed_file_loads_with_plain_torch_like_transformers_does(tmp_path):
    """transformers' Trainer loads optimizer.pt with torch.load + load_state_dict: the packed steps come
    back as views of one tensor, and training continues exactly as from an unpacked file."""
    model, optimizer = _stepped(OPTIMIZERS["adamw_fused"])
    ckpt.save_optimizer_state(optimizer, tmp_path)
    torch.save(optimizer.state_dict(), tmp_path / "plain.pt")
    runs = []
    for file in (ckpt.OPTIMIZER_NAME, "plain.pt"):
        m = _model()
        m.load_state_dict(model.state_dict())
        opt = OPTIMIZERS["adamw_fused"](m.parameters())
        opt.load_state_dict(torch.load(tmp_path / file, weights_only=True))
        torch.manual_seed(1)
        for _ in range(3):
            m(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append((m, opt))
    (m1, o1), (m2, o2) = runs
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    steps = [s["step"].item() for s in o1.state.values()]
    assert steps == [5.0] * len(steps)  # each view counted its own steps


@pytest.mark.parametrize("cls_name", ["AdamW8bit", "AdamW4bit"])
def test_a_tensor_subclass_state_saves_and_loads_back_exactly(tmp_path, cls_name):
    """torchao's low-bit moments are wrapper tensor subclasses without a storage of their own: sizing the
    file's records read their storage and optim='adamw_torch_8bit' / '_4bit' crashed at the first save."""
    torchao_optim = pytest.importorskip("torchao.optim")
    make = getattr(torchao_optim, cls_name)
    model = nn.Linear(64, 128)  # 8192 elements: quantized moments (torchao keeps small tensors' plain)
    optimizer = make(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).square().mean().backward()
    optimizer.step()
    assert any(type(v) is not torch.Tensor for s in optimizer.state.values() for v in s.values())
    ckpt.save_optimizer_state(optimizer, tmp_path)
    fresh = make(nn.Linear(64, 128).parameters(), lr=1e-2)
    ckpt.load_optimizer_state(fresh, tmp_path)
    def plain(value):
        return value.dequantize() if type(value) is not torch.Tensor else value

    for saved, loaded in zip(optimizer.state.values(), fresh.state.values()):
        assert saved.keys() == loaded.keys()
        for key in saved:
            assert type(loaded[key]) is type(saved[key]) and torch.equal(plain(saved[key]), plain(loaded[key])), key


def test_pack_leaves_other_layouts_alone():
    odd = {"state": [1, 2], "param_groups": []}
    assert ckpt.pack_small_tensors(odd) is odd
    assert ckpt.unpack_small_tensors(odd) is odd
    one = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []}
    assert ckpt.pack_small_tensors(one)["state"][0]["step"] is one["state"][0]["step"]  # nothing to pack with


# ---- checks beside the parser -----------------------------------------------------------------------


def _big_file(directory: Path) -> Path:
    path = directory / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg": torch.arange(400_000, dtype=torch.float32)}}, "param_groups": []}, path)
    ckpt.write_checksums(directory)
    assert path.stat().st_size >= ckpt.OVERLAP_MIN_BYTES
    return path


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[path.stat().st_size // 2 if offset is None else offset] ^= 0x04
    path.write_bytes(bytes(data))


def test_a_same_size_damage_is_caught_even_when_the_parser_reads_it(tmp_path):
    path = _big_file(tmp_path)
    _flip(path)  # inside a tensor: torch.load would read it without complaint
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is damaged: its CRC-32 is"):
        with ckpt.verified_while_parsing(path, "full"):
            torch.load(path, weights_only=True)
    torch.load(path, weights_only=True)  # (the parse itself succeeds)


def test_the_damage_is_reported_in_place_of_the_parsers_error(tmp_path):
    path = _big_file(tmp_path)
    _flip(path)
    with pytest.raises(CheckpointError, match="CRC-32"):
        with ckpt.verified_while_parsing(path, "full"):
            raise RuntimeError("the parser choked")


def test_a_good_file_lets_the_parsers_error_through(tmp_path):
    path = _big_file(tmp_path)
    with pytest.raises(RuntimeError, match="the parser choked"):
        with ckpt.verified_while_parsing(path, "full"):
            raise RuntimeError("the parser choked")


def test_a_truncated_file_is_refused_before_the_body_runs(tmp_path):
    path = _big_file(tmp_path)
    os.truncate(path, path.stat().st_size - 10)
    ran = []
    with pytest.raises(CheckpointError, match="truncated"):
        with ckpt.verified_while_parsing(path, "full"):
            ran.append(True)
    assert not ran


def test_size_level_does_not_read_the_bytes(tmp_path):
    path = _big_file(tmp_path)
    _flip(path)
    with ckpt.verified_while_parsing(path, "size"):
        pass


def test_an_unknown_level_names_the_accepted_ones(tmp_path):
    with pytest.raises(ValueError, match=r"verify='ful'.*Did you mean 'full'.*Accepted: full, size"):
        with ckpt.verified_while_parsing(_big_file(tmp_path), "ful"):
            pass


# ---- the CRC computed from the bytes torch.load reads ------------------------------------------------


def _our_big_file(directory: Path) -> tuple[Path, dict]:
    """An optimizer file as optsched writes it (a whole-file CRC-32 in checksums.json)."""
    obj = {"state": {0: {"exp_avg": torch.arange(400_000, dtype=torch.float32)}}, "param_groups": []}
    path = directory / "optimizer.pt"
    torch_save_with_crc(obj, path)
    ckpt.write_checksums(directory)
    return path, obj


def test_a_full_load_checks_every_byte_with_no_pass_of_its_own(tmp_path, monkeypatch):
    path, obj = _our_big_file(tmp_path)
    passes = []
    monkeypatch.setattr(integrity, "file_checksum", lambda *a, **k: passes.append(a) or "")
    loaded = ckpt.safe_torch_load(path, expect_keys=("state",), verify="full")
    assert torch.equal(loaded["state"][0]["exp_avg"], obj["state"][0]["exp_avg"])
    assert passes == []  # the CRC came from the bytes torch.load read


@pytest.mark.parametrize("where", ["tensor", "not read by torch"])
def test_damage_torch_reads_or_skips_is_caught_by_the_load(tmp_path, where):
    path, _ = _our_big_file(tmp_path)
    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith("/data/0"))
    # inside the tensor's bytes (torch.load parses it without complaint), or in the record's data
    # descriptor, 4 bytes after its data (torch never reads descriptors)
    offset = path.stat().st_size // 2 if where == "tensor" else None
    if offset is None:
        header = path.read_bytes()[record.header_offset : record.header_offset + 30]
        name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        offset = record.header_offset + 30 + name_len + extra_len + record.compress_size + 5
    _flip(path, offset)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is damaged: its CRC-32 is"):
        ckpt.safe_torch_load(path, verify="full")
    ckpt.safe_torch_load(path, verify="size")  # what "size" lets through


def test_damage_that_breaks_the_parser_is_reported_as_damage(tmp_path):
    path, _ = _our_big_file(tmp_path)
    data = bytearray(path.read_bytes())
    start = data.index(b"data.pkl") + 100  # inside the pickle: torch.load raises
    data[start : start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC-32 is"):
        ckpt.safe_torch_load(path, verify="full")


def test_a_truncated_file_is_refused_before_torch_reads_it(tmp_path, monkeypatch):
    path, _ = _our_big_file(tmp_path)
    os.truncate(path, path.stat().st_size - 10)
    monkeypatch.setattr(torch_files, "_torch_load_weights_only", lambda source: pytest.fail("parsed a truncated file"))
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.safe_torch_load(path, verify="full")


# ---- weights on a worker thread, optimizer file parsed beside -----------------------------------------


class _Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(512, 512)  # ~1 MB of weights: checked on the worker thread
        self.head = nn.Linear(512, 3)
        self.out = nn.Linear(3, 512, bias=False)
        self.out.weight = nn.Parameter(self.head.weight.T.contiguous())  # not tied: shapes differ


def _saved_checkpoint(tmp_path: Path) -> tuple[nn.Module, torch.optim.Optimizer, Path]:
    torch.manual_seed(0)
    model = _Wide()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.body(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    directory = tmp_path / "checkpoint-1"
    ckpt.save_model_weights(model, directory)
    ckpt.save_optimizer_state(optimizer, directory)
    ckpt.write_checksums(directory)
    return model, optimizer, directory


def test_weights_and_optimizer_file_come_back(tmp_path):
    model, optimizer, directory = _saved_checkpoint(tmp_path)
    torch.manual_seed(5)
    fresh = _Wide()
    saved = ckpt.load_weights_and_read_optimizer(fresh, directory)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    ckpt.load_optimizer_state(fresh_opt, directory, saved=saved)
    assert torch.equal(fresh_opt.state[fresh.body.weight]["exp_avg"], optimizer.state[model.body.weight]["exp_avg"])


@pytest.mark.parametrize("damaged", [ckpt.WEIGHTS_NAME, ckpt.OPTIMIZER_NAME])
def test_damage_in_either_file_is_named(tmp_path, damaged):
    model, _, directory = _saved_checkpoint(tmp_path)
    _flip(directory / damaged)
    torch.manual_seed(5)
    fresh = _Wide()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{damaged.replace('.', '[.]')} is damaged"):
        ckpt.load_weights_and_read_optimizer(fresh, directory)
    if damaged == ckpt.WEIGHTS_NAME:  # nothing copied from a file that failed its check
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    else:  # the weights passed their check and were loaded; the optimizer state was not
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_without_optimizer_file_only_the_weights_load(tmp_path):
    model, _, directory = _saved_checkpoint(tmp_path)
    (directory / ckpt.OPTIMIZER_NAME).unlink()
    ckpt.write_checksums(directory)
    fresh = _Wide()
    assert ckpt.load_weights_and_read_optimizer(fresh, directory) is None
    assert torch.equal(fresh.body.weight, model.body.weight)


def test_a_lost_optimizer_file_leaves_the_model_untouched(tmp_path):
    """checksums.json lists optimizer.pt: its absence is damage, not save_only_model, and it is found
    before the weights are copied."""
    _, _, directory = _saved_checkpoint(tmp_path)
    (directory / ckpt.OPTIMIZER_NAME).unlink()
    torch.manual_seed(5)
    fresh = _Wide()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{directory / ckpt.OPTIMIZER_NAME} is missing, but checksums.json"):
        ckpt.load_weights_and_read_optimizer(fresh, directory)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: setattr(m, "extra", nn.Linear(2, 2)), r"missing in the file: \['extra.weight', 'extra.bias'\]"),
        (lambda m: delattr(m, "out"), r"not in the model: \['out.weight'\]"),
        (lambda m: setattr(m, "head", nn.Linear(512, 4)), r"shape mismatch: .*head.weight: \(3, 512\) in the file, \(4, 512\) in the model"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_weights_that_do_not_fit_leave_the_model_untouched(tmp_path, change, message):
    _, _, directory = _saved_checkpoint(tmp_path)
    torch.manual_seed(7)
    other = _Wide()
    change(other)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        ckpt.load_model_weights(other, directory)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_tied_weights_saved_once_load_under_every_name(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    ckpt.save_model_weights(model, tmp_path)
    fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    ckpt.load_model_weights(fresh, tmp_path)
    assert torch.equal(fresh[1].weight, model[0].weight) and fresh[1].weight is fresh[0].weight


# ---- how a file's bytes are read for its checksum -----------------------------------------------------


def test_a_ram_file_system_is_recognised():
    if not Path("/proc/self/mountinfo").is_file() or not Path("/dev/shm").is_dir():
        pytest.skip("needs Linux with /dev/shm")
    if integrity._filesystem_type("/dev/shm") is None:
        pytest.skip("/dev/shm is not listed in this container's mountinfo")
    assert integrity._filesystem_type("/dev/shm") in integrity._READ_FILESYSTEMS


@pytest.mark.parametrize(
    "size", [0, 1, integrity._READ_PIECE - 1, integrity._READ_PIECE, 2 * integrity._READ_PIECE + 5]
)
def test_read_and_mapped_checksums_agree(tmp_path, monkeypatch, size):
    path = tmp_path / "x.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    mapped = ckpt.file_checksum(path)
    monkeypatch.setattr(integrity, "_READ_FILESYSTEMS", frozenset({integrity._filesystem_type(path)}))
    read = ckpt.file_checksum(path)
    assert mapped == read == f"{zlib.crc32(data):08x}"
    assert ckpt.file_checksum(path, "sha256") == __import__("hashlib").sha256(data).hexdigest()


def test_without_device_numbers_files_are_mapped(tmp_path, monkeypatch):
    """Windows: no os.major, no /proc: the file system is unknown and checksums go through the map."""
    monkeypatch.delattr(os, "major", raising=False)
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc" * 1000)
    assert integrity._filesystem_type(path) is None
    assert ckpt.file_checksum(path) == f"{zlib.crc32(path.read_bytes()):08x}"


def test_gc_paused_restores_the_collector_whatever_happens():
    import gc

    assert gc.isenabled()
    with ckpt.gc_paused():
        assert not gc.isenabled()
        with ckpt.gc_paused():  # nested: the outer one switches it back on
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), ckpt.gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with ckpt.gc_paused():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()


def test_saving_and_loading_a_state_leave_the_collector_on(tmp_path):
    import gc

    _, optimizer = _stepped(OPTIMIZERS["adamw_fused"])
    ckpt.save_optimizer_state(optimizer, tmp_path)
    ckpt.write_checksums(tmp_path)
    ckpt.load_optimizer_state(optimizer, tmp_path)
    assert gc.isenabled()


@pytest.mark.parametrize("compiled", [False, True], ids=["into_the_model", "into_the_compiled_model"])
def test_weights_saved_with_the_compiled_prefix_load(tmp_path, compiled):
    # transformers' Trainer given a torch.compile'd model writes its state_dict() keys: "_orig_mod.<name>"
    from safetensors.torch import save_file

    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    save_file({f"_orig_mod.{k}": v for k, v in saved.state_dict().items()}, tmp_path / ckpt.WEIGHTS_NAME)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    ckpt.load_model_weights(torch.compile(fresh, backend="eager") if compiled else fresh, tmp_path)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in saved.state_dict().items())
    with pytest.raises(ValueError, match=r"not in the model: \['_orig_mod.1.bias', '_orig_mod.1.weight'\]"):  # still checked
        ckpt.load_model_weights(nn.Sequential(nn.Linear(4, 4)), tmp_path)
