"""Checkpoint layout, atomic saves, rotation, tied weights, RNG and param-group checks."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from optsched import Trainer
from optsched.trainer import checkpoint as ckpt
from optsched.trainer import integrity
from optsched.trainer.distributed import DistributedContext

LAYOUT = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
          "training_args.json"}


def test_hf_layout_and_rotation(model_factory, regression_data, make_args):
    t = Trainer(model_factory(), make_args(max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=2),
                train_dataset=regression_data(16))
    t.train()
    out = t.args.output_dir
    assert sorted(p.name for p in ckpt.list_checkpoints(out)) == ["checkpoint-6", "checkpoint-8"]
    assert LAYOUT <= set(os.listdir(f"{out}/checkpoint-8"))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    from optsched.trainer.state import TrainerState

    state = TrainerState.load_from_json(f"{out}/checkpoint-8/trainer_state.json")
    assert state.global_step == 8 and state.max_steps == 8 and state.log_history


def test_trainer_state_json_is_readable_by_transformers(model_factory, regression_data, make_args):
    from transformers import TrainerState as HFState

    t = Trainer(model_factory(), make_args(max_steps=2, save_strategy="steps", save_steps=2),
                train_dataset=regression_data(8))
    t.train()
    hf = HFState.load_from_json(f"{t.args.output_dir}/checkpoint-2/trainer_state.json")
    assert hf.global_step == 2 and hf.log_history == t.state.log_history[: len(hf.log_history)]


def test_save_only_model(model_factory, regression_data, make_args):
    t = Trainer(model_factory(), make_args(max_steps=2, save_strategy="steps", save_steps=2, save_only_model=True),
                train_dataset=regression_data(8))
    t.train()
    files = set(os.listdir(f"{t.args.output_dir}/checkpoint-2"))
    # no optimizer / scheduler / RNG state; the plan file (lr_resume_policy) is small and stays
    assert {"model.safetensors", "trainer_state.json", "training_args.json", "optsched_plan.json"} <= files
    assert not files & {"optimizer.pt", "scheduler.pt", "rng_state.pth"}


def test_interrupted_save_leaves_no_checkpoint(tmp_path):
    final = tmp_path / "checkpoint-5"
    with pytest.raises(RuntimeError, match="disk full"):
        with ckpt.staged_checkpoint(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert not final.exists() and os.listdir(tmp_path) == []


def test_interrupted_trainer_save_keeps_previous_checkpoints(model_factory, regression_data, make_args, monkeypatch):
    t = Trainer(model_factory(), make_args(max_steps=4, save_strategy="steps", save_steps=2),
                train_dataset=regression_data(8))
    calls = {"n": 0}
    real = ckpt.save_rng_state

    def failing(directory, ctx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("killed mid-save")
        return real(directory, ctx)

    monkeypatch.setattr(ckpt, "save_rng_state", failing)
    with pytest.raises(OSError, match="killed mid-save"):
        t.train()
    out = t.args.output_dir
    assert sorted(os.listdir(out)) == ["checkpoint-2", "log_history.jsonl"]
    assert ckpt.get_last_checkpoint(out).name == "checkpoint-2"


def test_staged_checkpoint_replaces_an_existing_checkpoint_of_checkpoint_files(tmp_path):
    final = tmp_path / "checkpoint-1"
    for content in (b"old", b"new"):
        with ckpt.staged_checkpoint(final) as tmp:
            (tmp / ckpt.WEIGHTS_NAME).write_bytes(content)
            (tmp / ckpt.TRAINER_STATE_NAME).write_bytes(content)  # complete and intact: replaced
            (tmp / "rng_state_1.pth").write_bytes(content)  # a rank's RNG file, one of transformers' names
            (tmp / "training_args.bin").write_bytes(content)
    assert (final / ckpt.WEIGHTS_NAME).read_bytes() == b"new" and os.listdir(tmp_path) == ["checkpoint-1"]


def _checkpoint_with(final, **files):
    final.mkdir()
    for name, text in {ckpt.WEIGHTS_NAME: "old", ckpt.TRAINER_STATE_NAME: "{}", **files}.items():
        (final / name).parent.mkdir(parents=True, exist_ok=True)
        (final / name).write_text(text)


@pytest.mark.parametrize("extra", ["my_important_file", "notes/run.txt"])
def test_staged_checkpoint_renames_a_folder_with_other_files_aside(tmp_path, caplog, extra):
    """transformers overwrites its own file names only; optsched deleted the whole folder."""
    final = tmp_path / "checkpoint-4"
    _checkpoint_with(final, **{extra: "precious"})
    with caplog.at_level("WARNING", logger=ckpt.__name__):
        with ckpt.staged_checkpoint(final) as tmp:
            (tmp / ckpt.WEIGHTS_NAME).write_text("new")
            (tmp / ckpt.TRAINER_STATE_NAME).write_text("{}")
    aside = tmp_path / "checkpoint-4.replaced-1"
    assert (aside / extra).read_text() == "precious" and (aside / ckpt.WEIGHTS_NAME).read_text() == "old"
    assert (final / ckpt.WEIGHTS_NAME).read_text() == "new" and not (final / extra).exists()
    message = caplog.records[-1].getMessage()
    assert str(final) in message and str(aside) in message and extra.split("/")[0] in message, message
    # neither resumed from nor rotated away, not even with a limit of 1
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert ckpt.rotate_checkpoints(tmp_path, 1, current=final) == [] and (aside / extra).is_file()


def test_staged_checkpoint_never_overwrites_an_earlier_aside_folder(tmp_path):
    final = tmp_path / "checkpoint-2"
    for k in (1, 2, 3):
        _checkpoint_with(final, mine=f"take {k}")
        with ckpt.staged_checkpoint(final) as tmp:
            (tmp / ckpt.WEIGHTS_NAME).write_text("new")
        shutil.rmtree(final)
    assert [(tmp_path / f"checkpoint-2.replaced-{k}" / "mine").read_text() for k in (1, 2, 3)] == [
        "take 1", "take 2", "take 3"]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_staged_checkpoint_renames_a_file_or_link_in_its_place_aside(tmp_path, kind):
    final, target = tmp_path / "checkpoint-3", tmp_path / "elsewhere"
    target.mkdir()
    (target / ckpt.WEIGHTS_NAME).write_text("kept")
    if kind == "file":
        final.write_text("precious")
    else:
        final.symlink_to(target, target_is_directory=True)
    with ckpt.staged_checkpoint(final) as tmp:
        (tmp / ckpt.WEIGHTS_NAME).write_text("new")
    aside = tmp_path / "checkpoint-3.replaced-1"
    assert (aside.read_text() == "precious") if kind == "file" else aside.resolve() == target.resolve()
    assert (target / ckpt.WEIGHTS_NAME).read_text() == "kept" and (final / ckpt.WEIGHTS_NAME).read_text() == "new"


def test_a_save_at_an_existing_step_keeps_the_users_file(model_factory, regression_data, make_args):
    """The audit's case: out/checkpoint-4/my_important_file was gone after a run that saved at step 4."""
    args = make_args(max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    Trainer(model_factory(), args, train_dataset=regression_data(16)).train()
    out = args.output_dir
    (Path(out) / "checkpoint-4" / "my_important_file").write_text("precious")
    Trainer(model_factory(), args, train_dataset=regression_data(16)).train()
    assert (Path(out) / "checkpoint-4.replaced-1" / "my_important_file").read_text() == "precious"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4"]
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-4.replaced-1", "log_history.jsonl"]


def _save_files(final, **files):
    """A checkpoint-N as staged_checkpoint publishes it (checksums.json listing every file)."""
    with ckpt.staged_checkpoint(final) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# what a save finds at its step, left by another run: (damage done to a good checkpoint, words of the warning)
DAMAGE = {
    "lost-optimizer": (lambda d: (d / ckpt.OPTIMIZER_NAME).unlink(), "is incomplete (no optimizer.pt)"),
    "lost-trainer-state": (lambda d: (d / ckpt.TRAINER_STATE_NAME).unlink(), "is incomplete (no trainer_state.json)"),
    "truncated-optimizer": (lambda d: (d / ckpt.OPTIMIZER_NAME).write_bytes(b"opt"), "optimizer.pt is damaged: 3 bytes"),
    "unreadable-checksums": (lambda d: (d / ckpt.CHECKSUMS_NAME).write_text("{"), "checksums.json is damaged"),
    "lost-checksums": (lambda d: (d / ckpt.CHECKSUMS_NAME).unlink(), "is incomplete (no checksums.json"),
    "partial-copy": (lambda d: [(d / n).unlink() for n in (ckpt.CHECKSUMS_NAME, ckpt.PLAN_NAME, ckpt.TRAINER_STATE_NAME)],
                     "is incomplete (no trainer_state.json)"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_another_run_left_is_renamed_aside_not_replaced(tmp_path, caplog, damage):
    """It was deleted: its intact files (the weights, say) may be the only copy left of them."""
    final = tmp_path / "checkpoint-5"
    _save_files(final, **{ckpt.WEIGHTS_NAME: b"weights", ckpt.OPTIMIZER_NAME: b"optimizer",
                          ckpt.TRAINER_STATE_NAME: b"{}", ckpt.PLAN_NAME: b"{}"})
    hurt, words = DAMAGE[damage]
    hurt(final)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    with caplog.at_level("WARNING", logger=ckpt.__name__):
        _save_files(final, **{ckpt.WEIGHTS_NAME: b"new", ckpt.TRAINER_STATE_NAME: b"{}"})
    aside = tmp_path / "checkpoint-5.replaced-1"
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before  # every byte kept, as it was
    assert (final / ckpt.WEIGHTS_NAME).read_bytes() == b"new"
    message = caplog.records[-1].getMessage()
    for part in (str(final), str(aside), words, "this run did not write it", *before):
        assert part in message, (part, message)
    # the aside folder is never resumed from, passed over (a warning) or rotated away
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-5"]
    assert ckpt.incomplete_checkpoints(tmp_path) == [] and ckpt.get_last_checkpoint(tmp_path) == final
    assert ckpt.rotate_checkpoints(tmp_path, 1, current=final) == [] and aside.is_dir()


@pytest.mark.parametrize("damage", ["lost-optimizer", "truncated-optimizer"])
def test_a_damaged_checkpoint_the_same_run_wrote_is_replaced(tmp_path, damage):
    final = tmp_path / "checkpoint-5"
    _save_files(final, **{ckpt.WEIGHTS_NAME: b"weights", ckpt.OPTIMIZER_NAME: b"optimizer",
                          ckpt.TRAINER_STATE_NAME: b"{}"})
    DAMAGE[damage][0](final)
    with ckpt.staged_checkpoint(final, own=True) as tmp:
        (tmp / ckpt.WEIGHTS_NAME).write_bytes(b"new")
        (tmp / ckpt.TRAINER_STATE_NAME).write_bytes(b"{}")
    assert os.listdir(tmp_path) == ["checkpoint-5"] and (final / ckpt.WEIGHTS_NAME).read_bytes() == b"new"


def test_another_runs_checkpoint_of_the_right_sizes_is_replaced_without_reading_its_bytes(tmp_path, caplog,
                                                                                          monkeypatch):
    """The save checks sizes only: another run's checkpoint may be hundreds of GB, and a flipped byte in it
    is no reason to keep it (the new checkpoint supersedes it)."""
    final = tmp_path / "checkpoint-5"
    _save_files(final, **{ckpt.WEIGHTS_NAME: b"weights", ckpt.OPTIMIZER_NAME: b"optimizer",
                          ckpt.TRAINER_STATE_NAME: b"{}"})
    _flip_last_byte(final / ckpt.WEIGHTS_NAME)
    for name in ("file_checksum", "_check_zip_crcs"):  # the CRC of a file in the old folder reads its bytes
        monkeypatch.setattr(integrity, name, _not_in(final, getattr(integrity, name)))
    with caplog.at_level("WARNING", logger=ckpt.__name__):
        _save_files(final, **{ckpt.WEIGHTS_NAME: b"new", ckpt.TRAINER_STATE_NAME: b"{}"})
    assert os.listdir(tmp_path) == ["checkpoint-5"] and (final / ckpt.WEIGHTS_NAME).read_bytes() == b"new"
    assert not caplog.records


def _not_in(folder, check):
    def guarded(path, *args, **kwargs):
        assert Path(path).parent != folder, f"a save read the bytes of {path}, in the checkpoint it replaces"
        return check(path, *args, **kwargs)

    return guarded


def test_an_empty_checkpoint_folder_is_replaced_without_a_word(tmp_path, caplog):
    (tmp_path / "checkpoint-5").mkdir()
    with caplog.at_level("WARNING", logger=ckpt.__name__):
        _save_files(tmp_path / "checkpoint-5", **{ckpt.WEIGHTS_NAME: b"new"})
    assert os.listdir(tmp_path) == ["checkpoint-5"] and not caplog.records  # nothing in it to keep


def test_a_foreign_file_beside_the_runs_own_checkpoint_is_still_kept(tmp_path):
    final = tmp_path / "checkpoint-5"
    _checkpoint_with(final, mine="precious")
    with ckpt.staged_checkpoint(final, own=True) as tmp:
        (tmp / ckpt.WEIGHTS_NAME).write_text("new")
    assert (tmp_path / "checkpoint-5.replaced-1" / "mine").read_text() == "precious"


@pytest.mark.parametrize("auto", [False, True], ids=["explicit", "newest"])
def test_a_resume_from_an_older_checkpoint_keeps_the_damaged_newer_one(model_factory, regression_data, make_args,
                                                                        caplog, auto):
    """The audit's case: checkpoint-4 lost optimizer.pt (or is a partial copy, passed over by
    resume_from_checkpoint=True); a resume from checkpoint-2 deleted it when it saved at step 4, its
    intact model.safetensors with it."""
    args = make_args(max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    Trainer(model_factory(), make_args(max_steps=4, save_strategy="steps", save_steps=2),
            train_dataset=regression_data(16)).train()
    out = Path(args.output_dir)
    damaged = out / "checkpoint-4"
    (damaged / ckpt.OPTIMIZER_NAME).unlink()
    if auto:  # a partial copy: nothing records what was written, so a resume passes over it with a warning
        (damaged / ckpt.TRAINER_STATE_NAME).unlink()
        (damaged / ckpt.CHECKSUMS_NAME).unlink()
    weights = (damaged / ckpt.WEIGHTS_NAME).read_bytes()
    with caplog.at_level("WARNING", logger="optsched"):
        Trainer(model_factory(), args, train_dataset=regression_data(16)).train(
            resume_from_checkpoint=True if auto else str(out / "checkpoint-2"))
    aside = out / "checkpoint-4.replaced-1"
    assert (aside / ckpt.WEIGHTS_NAME).read_bytes() == weights
    assert f"{damaged} already existed and is incomplete" in caplog.text and str(aside) in caplog.text
    # save_total_limit=1 rotated checkpoint-2 away, not the aside folder; a resume takes the new checkpoint-4
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-4.replaced-1", "log_history.jsonl"]
    assert ckpt.get_last_checkpoint(out) == damaged and not ckpt.incomplete_checkpoints(out)
    ckpt.check_checkpoint_files(damaged)
    caplog.clear()
    with caplog.at_level("WARNING", logger="optsched"):
        Trainer(model_factory(), make_args(max_steps=6), train_dataset=regression_data(16)).train(
            resume_from_checkpoint=True)
    assert "replaced-1" not in caplog.text and "passed over" not in caplog.text


def test_the_same_step_saved_twice_replaces_the_runs_own_damaged_checkpoint(model_factory, regression_data,
                                                                           make_args):
    t = Trainer(model_factory(), make_args(max_steps=4, save_strategy="steps", save_steps=4),
                train_dataset=regression_data(16))
    t.train()
    saved = Path(t.args.output_dir) / "checkpoint-4"
    (saved / ckpt.OPTIMIZER_NAME).unlink()
    assert t._save_checkpoint() == saved  # what a signal at the step of the last save does when it is incomplete
    t._finish_saves()
    assert sorted(os.listdir(t.args.output_dir)) == ["checkpoint-4", "log_history.jsonl"]
    ckpt.check_checkpoint_files(saved)


@pytest.mark.parametrize(
    "limit, best, kept",
    [
        (None, None, [1, 2, 3, 4]),
        (2, None, [3, 4]),
        (1, None, [4]),
        (2, 1, [1, 4]),
        (1, 2, [2, 4]),  # transformers keeps 2 when the best is not the newest
    ],
)
def test_rotation_table(tmp_path, limit, best, kept):
    for step in (1, 2, 3, 4):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in ("trainer_state.json", "model.safetensors"):
            (d / f).write_text("{}")
    best_path = str(tmp_path / f"checkpoint-{best}") if best else None
    ckpt.rotate_checkpoints(tmp_path, limit, best_path)
    assert [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(tmp_path)] == kept


def _fake_checkpoints(root, steps):
    for step in steps:
        d = root / f"checkpoint-{step}"
        d.mkdir()
        for f in ("trainer_state.json", "model.safetensors"):
            (d / f).write_text("{}")


@pytest.mark.parametrize(
    "limit, best, kept",
    [
        (1, None, [6, 20]),
        (2, None, [4, 6, 20]),
        (1, 2, [2, 6, 20]),  # the best rule as without a newer run's checkpoint
    ],
)
def test_rotation_keeps_the_current_checkpoint_and_those_numbered_above_it(tmp_path, limit, best, kept):
    """checkpoint-20 is another run's: not older than the checkpoint just written (6), so neither counted
    nor deleted; transformers would sort it in as the newest and delete checkpoint-6 itself."""
    _fake_checkpoints(tmp_path, (2, 4, 6, 20))
    best_path = str(tmp_path / f"checkpoint-{best}") if best else None
    deleted = ckpt.rotate_checkpoints(tmp_path, limit, best_path, current=tmp_path / "checkpoint-6")
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == kept
    assert sorted(ckpt.checkpoint_step(p) for p in deleted) == sorted({2, 4, 6, 20} - set(kept))


def test_rotation_refuses_a_current_path_that_is_no_checkpoint(tmp_path):
    _fake_checkpoints(tmp_path, (2, 4))
    with pytest.raises(ValueError, match=r"current='.*checkpoint-4.replaced-1' is not a checkpoint directory"):
        ckpt.rotate_checkpoints(tmp_path, 1, current=tmp_path / "checkpoint-4.replaced-1")
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_a_limited_run_beside_a_longer_ones_checkpoint_keeps_its_own(model_factory, regression_data, make_args,
                                                                      caplog):
    """The audit's case: a run of 20 steps left checkpoint-20; a new run of 6 steps with save_total_limit=1
    in the same output_dir deleted checkpoint-2, -4 and -6 right after writing each."""
    Trainer(model_factory(), make_args(max_steps=20, save_strategy="steps", save_steps=20),
            train_dataset=regression_data(16)).train()
    t = Trainer(model_factory(), make_args(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1),
                train_dataset=regression_data(16))
    with caplog.at_level("WARNING", logger="optsched.trainer.checkpointing"):
        t.train()
    out = t.args.output_dir
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-6", "checkpoint-20"]
    warnings = [r.getMessage() for r in caplog.records if "numbered above" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per Trainer, not at every save
    assert "checkpoint-20" in warnings[0] and "resume_from_checkpoint=True" in warnings[0]
    assert "(2)" in warnings[0]  # the first save, step 2, saw it


def test_checkpoints_sorted_by_step_not_name(tmp_path):
    for step in (10, 9, 100):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in ("trainer_state.json", "model.safetensors"):
            (d / f).write_text("{}")
    (tmp_path / "checkpoint-200").mkdir()  # incomplete
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]


def test_tied_weights_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    a, b = Tied(), Tied()
    ckpt.save_model_weights(a, tmp_path)
    ckpt.load_model_weights(b, tmp_path)
    assert torch.equal(a.emb.weight, b.emb.weight) and b.head.weight is b.emb.weight
    with pytest.raises(ValueError, match="do not match the model"):
        ckpt.load_model_weights(nn.Linear(2, 2), tmp_path)


def test_rng_state_round_trip(tmp_path):
    ctx = DistributedContext()
    ckpt.save_rng_state(tmp_path, ctx)
    expected = (random.random(), torch.rand(3))
    ckpt.load_rng_state(tmp_path, ctx)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
    assert not ckpt.load_rng_state(tmp_path, DistributedContext(rank=1, world_size=2))  # rng_state_1.pth absent


def test_a_lost_rng_state_file_is_an_error_and_restores_nothing(tmp_path):
    ctx = DistributedContext()
    path = ckpt.save_rng_state(tmp_path, ctx)
    ckpt.write_checksums(tmp_path)
    path.unlink()
    random.random()
    state = random.getstate(), torch.random.get_rng_state()
    with pytest.raises(ckpt.CheckpointError, match=rf"{path} is missing, but checksums.json records it"):
        ckpt.load_rng_state(tmp_path, ctx)
    assert random.getstate() == state[0] and torch.equal(torch.random.get_rng_state(), state[1])


def test_rng_state_loads_on_a_torch_without_scoped_safe_globals(tmp_path, monkeypatch):
    """torch 2.4 (the oldest supported) has no ``torch.serialization.safe_globals`` context manager and
    does not allow ``_codecs.encode`` (how numpy's RNG state array is pickled) by default: a resume
    used to report the RNG file as damaged there."""
    np = pytest.importorskip("numpy")
    ctx = DistributedContext()
    np.random.seed(3)
    ckpt.save_rng_state(tmp_path, ctx)
    expected = np.random.rand()
    before = torch.serialization.get_safe_globals()
    monkeypatch.delattr(torch.serialization, "safe_globals", raising=False)  # absent on torch 2.4 itself
    added: list = []  # torch 2.4 keeps the allow-list as a list (2.13 as a set): appended to as 2.4 does
    real_add = torch.serialization.add_safe_globals
    monkeypatch.setattr(torch.serialization, "add_safe_globals", lambda g: (added.extend(g), real_add(g)))
    monkeypatch.setattr(torch.serialization, "get_safe_globals", lambda: [*before, *added])
    try:
        assert ckpt.load_rng_state(tmp_path, ctx)
        first = len(added)
        assert ckpt.load_rng_state(tmp_path, ctx)
        assert len(added) == first > 0  # the process-wide list does not grow with every load
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    assert np.random.rand() == expected


def test_param_group_mismatch_messages():
    p = [nn.Parameter(torch.zeros(1)) for _ in range(3)]
    now = [{"name": "decay", "param_names": ["a", "c"], "params": [p[0], p[2]]},
           {"name": "no_decay", "param_names": ["b"], "params": [p[1]]}]
    saved = [{"name": "decay", "param_names": ["a", "x"], "params": [0, 1]},
             {"name": "no_decay", "param_names": ["b"], "params": [2]}]
    with pytest.raises(ValueError) as err:
        ckpt.check_param_groups_match(now, saved, "ck/optimizer.pt")
    msg = str(err.value)
    assert "ck/optimizer.pt" in msg and "group 0 ('decay')" in msg and "['x']" in msg and "['c']" in msg
    assert "group 1" not in msg  # the unchanged group is not reported
    with pytest.raises(ValueError, match=r"the checkpoint has 1 groups \['decay'\], the optimizer has 2"):
        ckpt.check_param_groups_match(now, saved[:1], "ck")
    # unnamed groups (a user's optimizer) are compared by size
    with pytest.raises(ValueError, match="group 0 has 2 parameters now but 3 in the checkpoint"):
        ckpt.check_param_groups_match([{"params": p[:2]}], [{"params": [0, 1, 2]}], "ck")
    ckpt.check_param_groups_match(now, [dict(g) for g in now], "ck")  # identical: no error
