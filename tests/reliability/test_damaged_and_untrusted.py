"""Damaged checkpoint files are named and explained; untrusted pickles are refused without running.

Nothing in output_dir is written or removed by a failed resume (every file's bytes and mtime checked).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from _helpers import Tiny, make_args, make_data, weights

from optsched.trainer import Trainer
from optsched.trainer import checkpoint as ckpt
from optsched.trainer.checkpoint import CheckpointError

SRC = Path(__file__).resolve().parents[2] / "src" / "optsched"
FILES = ["optimizer.pt", "scheduler.pt", "model.safetensors", "trainer_state.json", "rng_state.pth"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    Trainer(Tiny(), make_args(str(out), max_steps=4, save_strategy="steps", save_steps=2),
            train_dataset=make_data()).train()
    return out


def _copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble_start(path: Path) -> None:  # header / magic bytes destroyed, same size
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _flip_middle(path: Path) -> None:  # one byte flipped in the middle (tensor data): only a checksum sees it
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": _truncate, "garbled-header": _garble_start, "flipped-byte": _flip_middle}
EXPECT = {"truncated": r"truncated|damaged", "garbled-header": r"damaged", "flipped-byte": r"CRC-32|damaged"}


def _resume(out: Path) -> None:
    Trainer(Tiny(), make_args(str(out), max_steps=6, save_strategy="steps", save_steps=2),
            train_dataset=make_data()).train(resume_from_checkpoint=True)


# a flipped tensor byte is only detectable with checksums.json: not tested without it
CASES = [(n, d, c) for n in FILES for d in DAMAGE for c in (True, False) if c or d != "flipped-byte"]


@pytest.mark.parametrize("name,damage,checksums", CASES,
                         ids=[f"{n}-{d}-{'sums' if c else 'nosums'}" for n, d, c in CASES])
def test_a_damaged_file_is_named_and_nothing_is_touched(trained, tmp_path, name, damage, checksums):
    out = _copy(trained, tmp_path)
    target = out / "checkpoint-4" / name
    if not checksums:
        (out / "checkpoint-4" / ckpt.CHECKSUMS_NAME).unlink()  # as in a transformers checkpoint
    DAMAGE[damage](target)
    before = _snapshot(out)
    with pytest.raises(CheckpointError) as info:
        _resume(out)
    message = str(info.value)
    assert str(target) in message, message
    assert re.search(EXPECT[damage], message), message
    assert _snapshot(out) == before  # nothing written, removed or renamed


# model.safetensors and trainer_state.json make a checkpoint complete: without them it is refused, or
# passed over by resume_from_checkpoint=True, whatever checksums.json says
LISTED = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "optsched_plan.json", "training_args.json"]


@pytest.mark.parametrize("name", LISTED)
@pytest.mark.parametrize("auto", [True, False], ids=["newest", "explicit"])
def test_a_lost_file_that_checksums_json_lists_is_named_and_nothing_changes(trained, tmp_path, name, auto):
    """optimizer.pt gone used to resume with a fresh optimizer (a warning), scheduler.pt gone with the
    new plan (no message), rng_state.pth gone with other dropout masks (a warning)."""
    out = _copy(trained, tmp_path)
    target = out / "checkpoint-4" / name
    target.unlink()
    before = _snapshot(out)
    trainer = Trainer(Tiny(), make_args(str(out), max_steps=6, save_strategy="steps", save_steps=2),
                      train_dataset=make_data())
    model, optimizer = weights(trainer.model), trainer.optimizer.state_dict()
    rng = torch.random.get_rng_state()
    with pytest.raises(CheckpointError) as info:
        trainer.train(resume_from_checkpoint=True if auto else str(out / "checkpoint-4"))
    message = str(info.value)
    assert f"{target} is missing, but checksums.json records it as written" in message, message
    assert ("resume_from_checkpoint='" in message) == auto  # the way back to checkpoint-2, when it took the newest
    # nothing applied: the model, the optimizer (no state, its own settings), the RNG; nothing written
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in model.items())
    assert trainer.optimizer.state_dict() == optimizer and not optimizer["state"]
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.json"])
def test_a_newest_checkpoint_that_lost_what_makes_it_complete_is_not_passed_over_silently(trained, tmp_path, name):
    # Without one of these, resume_from_checkpoint=True used to take checkpoint-2 without a word.
    out = _copy(trained, tmp_path)
    (out / "checkpoint-4" / name).unlink()
    before = _snapshot(out)
    with pytest.raises(CheckpointError) as info:
        _resume(out)
    message = str(info.value)
    assert f"{out / 'checkpoint-4' / name} is missing, but checksums.json records it as written" in message
    assert f"resume_from_checkpoint={str(out / 'checkpoint-2')!r}" in message  # the way to go on
    assert _snapshot(out) == before


def test_a_partial_copy_without_checksums_is_passed_over_with_a_warning(trained, tmp_path, caplog):
    out = _copy(trained, tmp_path)
    partial = out / "checkpoint-9"
    partial.mkdir()
    shutil.copy(out / "checkpoint-4" / "optimizer.pt", partial / "optimizer.pt")
    with caplog.at_level("WARNING", logger="optsched"):
        _resume(out)  # from checkpoint-4, the newest complete one
    assert f"{partial} is passed over: it is not a complete checkpoint (no trainer_state.json or " in caplog.text
    assert "resuming from checkpoint-4" in caplog.text


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "optsched_plan.json"])
def test_each_loader_refuses_a_lost_file_on_its_own(trained, tmp_path, monkeypatch, name):
    """Behind the check before the resume (switched off here), the loader of each file tells a lost file
    from one never written (save_only_model) too."""
    out = _copy(trained, tmp_path)
    (out / "checkpoint-4" / name).unlink()
    monkeypatch.setattr(ckpt, "check_checkpoint_files", lambda checkpoint: None)
    with pytest.raises(CheckpointError, match=rf"{name} is missing, but checksums.json records it as written"):
        _resume(out)


def test_an_optsched_checkpoint_without_checksums_is_resumed_with_a_warning(trained, tmp_path, caplog):
    out = _copy(trained, tmp_path)
    (out / "checkpoint-4" / ckpt.CHECKSUMS_NAME).unlink()
    with caplog.at_level("WARNING", logger=ckpt.__name__):
        _resume(out)
    unverified = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert len(unverified) == 1 and str(out / "checkpoint-4") in unverified[0], unverified


def test_a_transformers_checkpoint_resumes_without_that_warning_and_without_the_files_it_lacks(trained, tmp_path,
                                                                                              caplog):
    """No checksums.json and no optsched_plan.json: nothing records what was written; a missing
    rng_state.pth is taken for one never written, as before (a warning of its own)."""
    out = _copy(trained, tmp_path)
    for name in (ckpt.CHECKSUMS_NAME, "optsched_plan.json", "rng_state.pth"):
        (out / "checkpoint-4" / name).unlink()
    with caplog.at_level("WARNING"):
        _resume(out)
    assert "cannot be verified" not in caplog.text and "No rng_state.pth" in caplog.text


def test_checksums_cover_every_file(trained):
    data = json.loads((trained / "checkpoint-4" / ckpt.CHECKSUMS_NAME).read_text())
    recorded = data["files"]
    on_disk = {p.name for p in (trained / "checkpoint-4").iterdir()} - {ckpt.CHECKSUMS_NAME}
    assert data["algorithm"] == "crc32" and set(recorded) == on_disk
    for name, entry in recorded.items():
        body = (trained / "checkpoint-4" / name).read_bytes()
        assert entry == {"size": len(body), "crc32": f"{zlib.crc32(body):08x}"}, name


def test_a_damaged_checksum_file_is_named(trained, tmp_path):
    out = _copy(trained, tmp_path)
    (out / "checkpoint-4" / ckpt.CHECKSUMS_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="checksums.json is damaged"):
        _resume(out)


@pytest.mark.parametrize("content,words", [
    ({"state": {}}, "param_groups"),
    ([1, 2, 3], "got list"),
])
def test_an_optimizer_file_with_the_wrong_content_is_named(trained, tmp_path, content, words):
    out = _copy(trained, tmp_path)
    target = out / "checkpoint-4" / "optimizer.pt"
    torch.save(content, target)
    ckpt.write_checksums(out / "checkpoint-4")
    with pytest.raises(CheckpointError, match=words) as info:
        _resume(out)
    assert str(target) in str(info.value)


def test_a_trainer_state_with_a_bad_step_is_named(trained, tmp_path):
    out = _copy(trained, tmp_path)
    path = out / "checkpoint-4" / "trainer_state.json"
    data = json.loads(path.read_text())
    data["global_step"] = "four"
    path.write_text(json.dumps(data))
    ckpt.write_checksums(out / "checkpoint-4")
    with pytest.raises(CheckpointError, match="global_step='four'") as info:
        _resume(out)
    assert str(path) in str(info.value)


# ---- untrusted files ------------------------------------------------------------------------------


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_the_payload_really_runs_code_under_a_plain_unpickle(tmp_path):
    # the positive control: without weights_only the planted file does execute
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(str(marker)), "param_groups": []}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_planted_pickle_is_refused_without_running(trained, tmp_path, name):
    out = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    target = out / "checkpoint-4" / name
    torch.save({"state": _Payload(str(marker)), "param_groups": [], "python": 1, "cpu": 1}, target)
    ckpt.write_checksums(out / "checkpoint-4")  # an attacker rewrites the checksums too
    with pytest.raises(CheckpointError, match="refused") as info:
        _resume(out)
    assert str(target) in str(info.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="could run code"):
        ckpt.safe_torch_load(target)
    assert not marker.exists()


_CALL = re.compile(r"(?<![\w.])(eval|exec|compile|__import__)\s*\(")


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, code) for lines holding code tokens: strings and comments removed."""
    import io
    import tokenize

    kept: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NAME, tokenize.OP):
            kept.setdefault(tok.start[0], []).append(tok.string)
    return [(n, " ".join(parts).replace(" . ", ".").replace(" (", "(")) for n, parts in sorted(kept.items())]



def test_no_string_is_ever_evaluated_and_every_torch_load_is_weights_only():
    offenders, loads = [], []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for lineno, code in _code_lines(text):
            if _CALL.search(code) or re.search(r"\bpickle\.loads?\(|\bmarshal\.loads?\(|yaml\.(unsafe_)?load\(", code):
                offenders.append(f"{path}:{lineno}: {code}")
        for match in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            loads.append((path, match.group(0)))
    assert not offenders, offenders
    assert loads, "expected at least one torch.load call in src/"
    for path, call in loads:
        assert "weights_only=True" in call, f"{path}: {call}"


def test_the_grep_would_catch_an_eval():
    assert _CALL.search("x = eval(text)") and _CALL.search("exec (code)")
    assert not _CALL.search("model.eval()") and not _CALL.search("optimizer.eval()")
    sample = "x = eval(s)  # eval(y)\n" + chr(34) * 3 + "doc eval()" + chr(34) * 3 + "\nm.eval()\n"
    assert [code for _, code in _code_lines(sample)] == ["x = eval( s )", "m.eval( )"]


def test_auto_resume_from_a_damaged_newest_checkpoint_names_the_one_before(trained, tmp_path):
    out = _copy(trained, tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(out)][-2:] == ["checkpoint-2", "checkpoint-4"]
    _flip_middle(out / "checkpoint-4" / ckpt.OPTIMIZER_NAME)
    with pytest.raises(CheckpointError) as info:
        _resume(out)
    message = str(info.value)
    assert "optimizer.pt is damaged" in message
    hint = f"resume_from_checkpoint={str(out / 'checkpoint-2')!r}"
    assert "took the newest checkpoint, checkpoint-4" in message and hint in message, message
    # the hint works: the checkpoint before resumes
    Trainer(Tiny(), make_args(str(out), max_steps=6, save_strategy="no"),
            train_dataset=make_data()).train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_an_explicit_or_only_checkpoint_gets_no_hint(trained, tmp_path):
    out = _copy(trained, tmp_path)
    _flip_middle(out / "checkpoint-4" / ckpt.OPTIMIZER_NAME)
    with pytest.raises(CheckpointError) as info:
        Trainer(Tiny(), make_args(str(out), max_steps=6), train_dataset=make_data()).train(
            resume_from_checkpoint=str(out / "checkpoint-4"))
    assert "took the newest" not in str(info.value)
    for older in ckpt.list_checkpoints(out)[:-1]:
        shutil.rmtree(older)
    with pytest.raises(CheckpointError) as info:
        _resume(out)
    assert "optimizer.pt is damaged" in str(info.value) and "took the newest" not in str(info.value)
