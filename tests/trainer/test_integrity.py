"""checksums.json: CRC-32 of every file, torch files checked through their own zip CRCs, verify levels.

The damaged-checkpoint guarantees end to end (a resume names the damaged file) are in
tests/reliability/test_damaged_and_untrusted.py; these tests pin the pieces and the edge cases.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optsched.trainer import checkpoint as ckpt
from optsched.trainer.checkpoint import CheckpointError

# reference values: the CRC-32 check value of the standard ("123456789" -> cbf43926) and FIPS 180-2's "abc"
REFERENCE_DIGESTS = [
    ("crc32", b"123456789", "cbf43926"),
    ("crc32", b"", "00000000"),
    ("crc32", b"a", "e8b7be43"),
    ("sha256", b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    ("sha256", b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
]


@pytest.mark.parametrize("algorithm,data,digest", REFERENCE_DIGESTS)
def test_file_checksum_reference_values(tmp_path, algorithm, data, digest):
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert ckpt.file_checksum(path, algorithm) == digest


def test_file_checksum_rejects_an_unknown_algorithm(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"algorithm='crc23'.*Did you mean 'crc32'"):
        ckpt.file_checksum(tmp_path / "f", "crc23")


@pytest.mark.parametrize("algorithm", list(ckpt.CHECKSUM_ALGORITHMS))
def test_every_algorithm_matches_its_library(tmp_path, algorithm):
    data = bytes(range(256)) * 300
    (tmp_path / "f").write_bytes(data)
    expected = {"crc32": f"{zlib.crc32(data):08x}", "sha256": hashlib.sha256(data).hexdigest()}[algorithm]
    assert ckpt.file_checksum(tmp_path / "f", algorithm) == expected


# ---- whole-file CRC-32: any flipped byte is caught -------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=4096), position=st.integers(min_value=0), bits=st.integers(1, 255))
def test_any_changed_byte_of_a_small_file_is_caught(tmp_path, data, position, bits):
    directory = tmp_path / "ckpt"
    directory.mkdir(exist_ok=True)
    path = directory / "trainer_state.json"
    path.write_bytes(data)
    ckpt.write_checksums(directory)
    ckpt.verify_file(path)  # intact: passes
    damaged = bytearray(data)
    damaged[position % len(data)] ^= bits
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"trainer_state\.json is damaged: its CRC-32 is [0-9a-f]{8}, but"):
        ckpt.verify_file(path)
    ckpt.verify_file(path, verify="size")  # same size: the size level does not read the bytes


def test_a_size_change_is_caught_at_every_level(tmp_path):
    path = tmp_path / "scheduler.pt"
    torch.save({"last_epoch": 3}, path)
    ckpt.write_checksums(tmp_path)
    path.write_bytes(path.read_bytes()[:-7])
    for level in ckpt.VERIFY_LEVELS:
        with pytest.raises(CheckpointError, match=r"scheduler\.pt is damaged: \d+ bytes, but \d+ were written \(truncated"):
            ckpt.verify_file(path, verify=level)


def test_an_unknown_verify_level_is_a_value_error(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"verify='ful'.*Did you mean 'full'.*Accepted: full, size"):
        ckpt.verify_file(tmp_path / "f", verify="ful")


def test_checksums_of_the_first_format_sha256_are_still_verified(tmp_path):
    """A checkpoint written before the switch to CRC-32 carries SHA-256 digests; they are still checked."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights" * 100)
    entry = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (tmp_path / ckpt.CHECKSUMS_NAME).write_text(json.dumps({"algorithm": "sha256", "files": {path.name: entry}}))
    ckpt.verify_file(path)
    path.write_bytes(b"Weights" + b"weights" * 99)
    with pytest.raises(CheckpointError, match=r"its SHA-256 is [0-9a-f]{16}\.\.\., but"):
        ckpt.verify_file(path)


@pytest.mark.parametrize("content,words", [
    ({"algorithm": "md5", "files": {}}, "algorithm='md5'"),
    ({"algorithm": "crc32", "files": []}, "'files' is not an object"),
    ({"algorithm": "crc32", "files": {"f": 3}}, "the entry of f is not an object"),
])
def test_a_malformed_checksum_file_is_named(tmp_path, content, words):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / ckpt.CHECKSUMS_NAME).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=words) as info:
        ckpt.verify_file(tmp_path / "f")
    assert ckpt.CHECKSUMS_NAME in str(info.value)


# ---- torch files: their own zip CRC-32s --------------------------------------------------------------


def _written(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_bytes(b"x" * 10)
    ckpt.write_checksums(directory)


def test_a_listed_file_that_is_gone_is_named_by_every_check(tmp_path):
    _written(tmp_path, "optimizer.pt", "scheduler.pt", "notes.json")
    (tmp_path / "scheduler.pt").unlink()
    (tmp_path / "notes.json").unlink()
    assert ckpt.missing_recorded_files(tmp_path) == ["notes.json", "scheduler.pt"]
    with pytest.raises(CheckpointError, match=r"is missing notes.json, scheduler.pt, but checksums.json records them"):
        ckpt.check_recorded_files_present(tmp_path)
    message = rf"{tmp_path / 'scheduler.pt'} is missing, but checksums.json records it as written"
    with pytest.raises(CheckpointError, match=message):
        ckpt.file_present(tmp_path / "scheduler.pt")
    for level in ("full", "size"):  # what torch.load would have met: FileNotFoundError
        with pytest.raises(CheckpointError, match=message):
            ckpt.verify_file(tmp_path / "scheduler.pt", level)
    assert ckpt.file_present(tmp_path / "optimizer.pt")


def test_a_file_that_no_checksums_json_lists_may_be_absent(tmp_path):
    assert ckpt.missing_recorded_files(tmp_path) == [] and not ckpt.file_present(tmp_path / "optimizer.pt")
    ckpt.check_recorded_files_present(tmp_path)  # a transformers checkpoint: nothing recorded
    _written(tmp_path, "model.safetensors")  # save_only_model: optimizer.pt never written, not listed
    assert not ckpt.file_present(tmp_path / "optimizer.pt")
    ckpt.check_recorded_files_present(tmp_path)


def _big_torch_file(directory: Path, name: str = "optimizer.pt") -> Path:
    path = directory / name
    state = {"state": {0: {"exp_avg": torch.arange(300_000, dtype=torch.float32)}}, "param_groups": [{"lr": 0.1}]}
    torch.save(state, path)
    assert path.stat().st_size >= ckpt.OVERLAP_MIN_BYTES  # large enough to be checked on the worker thread
    return path


def _tensor_byte_offset(path: Path) -> int:
    """An offset inside the tensor's record (the middle of the file is in it)."""
    return path.stat().st_size // 2


def test_a_large_torch_file_gets_a_whole_file_crc(tmp_path):
    """One GIL-free CRC call per file: what a load can run beside torch.load (see write_checksums)."""
    path = _big_torch_file(tmp_path)
    ckpt.write_checksums(tmp_path)
    entry = json.loads((tmp_path / ckpt.CHECKSUMS_NAME).read_text())["files"][path.name]
    assert entry == {"size": path.stat().st_size, "crc32": f"{zlib.crc32(path.read_bytes()):08x}"}
    data = bytearray(path.read_bytes())
    data[_tensor_byte_offset(path)] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is damaged: its CRC-32 is"):
        ckpt.safe_torch_load(path)


def test_a_zip_crc32_entry_of_optsched_0_1_0_is_checked_through_the_records(tmp_path):
    """checksums.json of optsched 0.1.0 asked for the records' own CRC-32s; such checkpoints still load."""
    path = _big_torch_file(tmp_path)
    _write_zip_crc32_entry(path)
    records = ckpt.zip_records(path)
    assert any(r.file_size == 300_000 * 4 for r in records)  # the tensor's bytes are one record
    ckpt.verify_file(path)
    data = bytearray(path.read_bytes())
    data[_tensor_byte_offset(path)] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is damaged: the bytes of record '.*data/0' do not match the CRC-32"):
        ckpt.verify_file(path)
    ckpt.verify_file(path, verify="size")  # the size level does not read the bytes


def test_a_torch_file_without_checksums_json_is_still_checked(tmp_path):
    """transformers' checkpoints have no checksums.json: a flipped byte in their optimizer.pt is caught too."""
    path = _big_torch_file(tmp_path)
    ckpt.verify_file(path)
    data = bytearray(path.read_bytes())
    data[_tensor_byte_offset(path)] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the CRC-32 torch wrote"):
        ckpt.verify_file(path)
    with pytest.raises(CheckpointError, match="do not match the CRC-32 torch wrote"):
        ckpt.safe_torch_load(path)


def _write_zip_crc32_entry(path: Path) -> None:
    """checksums.json as optsched 0.1.0 wrote it for a large torch file: check the records' own CRC-32s."""
    entry = {"size": path.stat().st_size, "zip_crc32": len(ckpt.zip_records(path))}
    (path.parent / ckpt.CHECKSUMS_NAME).write_text(json.dumps({"algorithm": "crc32", "files": {path.name: entry}}))


def test_a_torch_file_whose_zip_directory_is_destroyed_is_named(tmp_path):
    path = _big_torch_file(tmp_path)
    _write_zip_crc32_entry(path)
    data = bytearray(path.read_bytes())
    data[-22:] = b"\x00" * 22  # the end-of-central-directory record
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="no longer a torch zip archive"):
        ckpt.verify_file(path)


@pytest.mark.skipif(not hasattr(torch.serialization, "set_crc32_options"), reason="torch < 2.5: no set_crc32_options")
def test_a_torch_file_saved_without_crcs_gets_a_whole_file_crc(tmp_path):
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        path = _big_torch_file(tmp_path)
    finally:
        torch.serialization.set_crc32_options(before)
    assert ckpt.zip_records(path) is None  # every CRC 0: nothing to check against
    ckpt.write_checksums(tmp_path)
    entry = json.loads((tmp_path / ckpt.CHECKSUMS_NAME).read_text())["files"][path.name]
    assert entry == {"size": path.stat().st_size, "crc32": ckpt.file_checksum(path)}
    data = bytearray(path.read_bytes())
    data[_tensor_byte_offset(path)] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="its CRC-32 is"):
        ckpt.verify_file(path)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", b"{\"a\": 1}", b"\x00" * 100])
def test_zip_records_is_none_for_other_files(tmp_path, content):
    (tmp_path / "f").write_bytes(content)
    assert ckpt.zip_records(tmp_path / "f") is None
    ckpt.verify_file(tmp_path / "f")  # no checksums.json, not a torch file: left to its parser


def test_small_torch_files_get_a_crc_of_every_byte(tmp_path):
    """Below ZIP_CHECK_MIN_BYTES the zip's alignment padding is covered too (a flip there is caught)."""
    path = tmp_path / "scheduler.pt"
    torch.save({"last_epoch": 3, "base_lrs": [0.1]}, path)
    ckpt.write_checksums(tmp_path)
    entry = json.loads((tmp_path / ckpt.CHECKSUMS_NAME).read_text())["files"][path.name]
    assert set(entry) == {"size", "crc32"}


# ---- the Trainer: what it writes and the level it verifies at ----------------------------------------


def _train(tmp_path: Path, verification: str | None = None, max_steps: int = 2, resume: bool = False):
    from trainer_helpers import TinyRegressor, make_regression_data

    from optsched import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2,
                             max_steps=max_steps, save_strategy="steps", save_steps=2, disable_tqdm=True,
                             report_to="none", use_cpu=True)
    if verification is not None:
        args.checkpoint_verification = verification  # validated on assignment, like every field
    torch.manual_seed(0)
    trainer = Trainer(TinyRegressor(), args, train_dataset=make_regression_data(16))
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer


def _flip_weight_byte(checkpoint: Path) -> None:
    path = checkpoint / ckpt.WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data: safetensors parses it fine
    path.write_bytes(bytes(data))


def test_the_trainer_checks_every_byte_by_default_and_sizes_only_when_asked(tmp_path):
    _train(tmp_path)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    recorded = json.loads((checkpoint / ckpt.CHECKSUMS_NAME).read_text())
    assert recorded["algorithm"] == "crc32"
    assert set(recorded["files"]) == {p.name for p in checkpoint.iterdir()} - {ckpt.CHECKSUMS_NAME}
    _flip_weight_byte(checkpoint)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged: its CRC-32"):
        _train(tmp_path, max_steps=4, resume=True)
    # "size": the same-size corruption goes unnoticed (the documented trade-off), the resume runs
    assert _train(tmp_path, "size", max_steps=4, resume=True).state.global_step == 4


def test_the_trainer_refuses_an_unknown_verification_level(tmp_path):
    _train(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint_verification='sizes'.*Did you mean 'size'"):
        _train(tmp_path, "sizes", max_steps=4, resume=True)


# ---- optimizer state I/O (objects stored as data) -----------------------------------------------------


def test_save_and_load_optimizer_state_round_trip(tmp_path):
    param = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([{"params": [param], "name": "decay", "param_names": ["w"]}], lr=0.1)
    param.grad = torch.ones_like(param)
    opt.step()
    ckpt.save_optimizer_state(opt, tmp_path)
    fresh = torch.optim.AdamW([{"params": [param], "name": "decay", "param_names": ["w"]}], lr=0.1)
    ckpt.load_optimizer_state(fresh, tmp_path)
    assert torch.equal(fresh.state[param]["exp_avg_sq"], opt.state[param]["exp_avg_sq"])
    other = torch.optim.AdamW([{"params": [param], "name": "decay", "param_names": ["v"]}], lr=0.1)
    with pytest.raises(ValueError, match=r"no longer match the model"):
        ckpt.load_optimizer_state(other, tmp_path)
    assert other.state == {}  # left as it was
