"""Tests for optsched.demo (the tiny model and synthetic tasks) and the ``optsched demo`` command."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, default_collate

from optsched import cli
from optsched.commands import demo as demo_cmd
from optsched.demo import (
    TASKS,
    DemoConfig,
    ModelOutput,
    TinyBertForSequenceClassification,
    build_dataset,
    build_model,
    chance_loss,
    evaluate_accuracy,
)



# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


def _batch(n: int = 8, **kwargs) -> dict[str, torch.Tensor]:
    data = build_dataset(n, **kwargs)
    return default_collate([data[i] for i in range(n)])


def test_module_doctest():
    import doctest

    import optsched.demo

    assert doctest.testmod(optsched.demo).failed == 0


def test_build_model_needs_no_arguments_and_has_every_kind_of_parameter():
    model = build_model()
    names = [n for n, _ in model.named_parameters()]
    # embeddings, LayerNorm (HF's name), attention with biases, MLP, pooler, head
    for expected in (
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.LayerNorm.bias",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.attention.self.query.bias",
        "bert.encoder.layer.0.attention.self.key.bias",
        "bert.encoder.layer.0.attention.self.value.bias",
        "bert.encoder.layer.0.attention.output.dense.weight",
        "bert.encoder.layer.0.attention.output.LayerNorm.weight",
        "bert.encoder.layer.1.intermediate.dense.bias",
        "bert.encoder.layer.1.output.dense.weight",
        "bert.encoder.layer.1.output.LayerNorm.bias",
        "bert.pooler.dense.weight",
        "classifier.weight",
        "classifier.bias",
    ):
        assert expected in names
    assert len(names) == 4 + 2 * 16 + 2 + 2
    assert {type(m) for m in model.modules()} >= {torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.Linear}


def test_output_has_loss_only_with_labels_and_both_access_styles():
    model = build_model()
    batch = _batch(8)
    out = model(**batch)
    assert isinstance(out, ModelOutput) and isinstance(out, dict)
    assert out.loss is out["loss"] and out.logits is out["logits"]
    assert out.logits.shape == (8, 2)
    assert out.loss.ndim == 0 and out.loss.requires_grad
    # freshly initialised: close to a uniform guess
    assert abs(out.loss.item() - chance_loss()) < 0.3
    without = model(input_ids=batch["input_ids"])
    assert "loss" not in without and without.loss is None
    torch.testing.assert_close(without.logits, out.logits)
    # HF-style extra keyword arguments are accepted and ignored
    model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]), num_items_in_batch=8)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, ValueError, "hidden_size=30 is not divisible"),
        ({"num_labels": 1}, ValueError, "num_labels=1 is out of range"),
        ({"dropout": 1.0}, ValueError, "dropout=1.0 is out of range"),
        ({"vocab_size": 3.0}, TypeError, "vocab_size must be an integer"),
        ({"hidden_sise": 8}, ValueError, "Did you mean 'hidden_size'"),
    ],
)
def test_build_model_rejects_bad_config(config, error, match):
    with pytest.raises(error, match=match):
        build_model(**config)


def test_too_long_input_is_a_clear_error():
    model = build_model(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(input_ids=torch.zeros(2, 9, dtype=torch.long))


def test_model_is_deterministic_given_the_seed():
    torch.manual_seed(3)
    a = build_model()
    torch.manual_seed(3)
    b = build_model()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert isinstance(a, TinyBertForSequenceClassification) and a.config == DemoConfig()


# --------------------------------------------------------------------------------------------------
# the tasks
# --------------------------------------------------------------------------------------------------

REFERENCE_LABEL = {  # the definition of each task, written independently of the generators
    "majority": lambda ids, vocab: int((ids >= vocab // 2).sum() > len(ids) // 2),
    "marker": lambda ids, vocab: int((ids == 0).any()),
}


def test_every_task_has_a_reference_definition():
    assert set(REFERENCE_LABEL) == set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 64),
    seq_len=st.integers(2, 24).map(lambda x: x | 1),  # odd: majority has no ties
    vocab=st.integers(4, 40),
    seed=st.integers(0, 2**31),
)
def test_task_labels_match_definition_and_are_balanced(task, n, seq_len, vocab, seed):
    data = build_dataset(n, task=task, seq_len=seq_len, vocab_size=vocab, seed=seed)
    assert len(data) == n
    assert data.input_ids.shape == (n, seq_len) and data.input_ids.dtype == torch.long
    assert 0 <= int(data.input_ids.min()) and int(data.input_ids.max()) < vocab
    for i in range(n):
        item = data[i]
        assert set(item) == {"input_ids", "labels"}
        assert int(item["labels"]) == REFERENCE_LABEL[task](item["input_ids"], vocab)
    positives = int(data.labels.sum())
    assert abs(positives - (n - positives)) <= 1


@pytest.mark.parametrize("task", sorted(TASKS))
def test_dataset_is_reproducible_and_leaves_global_rng_alone(task):
    state = torch.get_rng_state()
    a = build_dataset(50, task=task, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_dataset(50, task=task, seed=7)
    c = build_dataset(50, task=task, seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"task": "majorty"}, ValueError, "Did you mean 'majority'"),
        ({"num_examples": 0}, ValueError, "num_examples=0"),
        ({"seq_len": 1}, ValueError, "seq_len=1"),
        ({"vocab_size": 2}, ValueError, "vocab_size=2"),
        ({"task": 3}, TypeError, "task must be a string"),
    ],
)
def test_build_dataset_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_dataset(**kwargs)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_is_learnable_in_a_few_hundred_steps(task):
    torch.manual_seed(0)
    model = build_model()
    train = build_dataset(1024, task=task, seed=0)
    held_out = build_dataset(256, task=task, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    step, losses = 0, []
    while step < 150:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if step == 150:
                break
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert evaluate_accuracy(model, held_out) > 0.9


def test_evaluate_accuracy_restores_mode_and_counts_correctly():
    model = build_model()
    data = build_dataset(40)
    model.train()
    acc = evaluate_accuracy(model, data, batch_size=7)
    assert model.training
    with torch.no_grad():
        expected = (model(input_ids=data.input_ids).logits.argmax(-1) == data.labels).float().mean().item()
    assert acc == pytest.approx(expected)


# --------------------------------------------------------------------------------------------------
# pure helpers of the command
# --------------------------------------------------------------------------------------------------


def test_format_param_groups_from_contract_keys_and_by_identity():
    model = build_model()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "LayerNorm" not in n]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01, "name": "decay"}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
    )
    table = demo_cmd.format_param_groups(optimizer, model).splitlines()
    assert table[0].split()[:6] == ["#", "group", "tensors", "elements", "lr", "weight_decay"]
    row0, row1 = table[1].split(), table[2].split()
    assert row0[:6] == ["0", "decay", str(len(decay)), f"{sum(p.numel() for p in decay):,}", "0.001", "0.01"]
    assert row0[6] == "bert.embeddings.word_embeddings.weight,"
    assert row1[:2] == ["1", "group_1"] and row1[5] == "0"
    assert row1[6] == "bert.embeddings.LayerNorm.weight,"
    # without the model and without param_names: names are unknown, not invented
    assert "?" in demo_cmd.format_param_groups(optimizer).splitlines()[2]
    # param_names (the group contract) wins over the lookup
    optimizer.param_groups[0]["param_names"] = ["x", "y", "z"]
    assert demo_cmd.format_param_groups(optimizer, model).splitlines()[1].endswith("x, y, ...")


def test_logged_losses_and_find_checkpoints(tmp_path):
    history = [{"loss": 0.7, "step": 10}, {"eval_loss": 0.6, "step": 10}, {"loss": 0.2, "step": 20},
               {"train_runtime": 1.0, "step": 20}]
    assert demo_cmd.logged_losses(history) == [(10, 0.7), (20, 0.2)]
    assert demo_cmd.find_checkpoints(tmp_path / "missing") == []
    for step in (5, 100, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-200").mkdir()  # interrupted save: no trainer_state.json
    (tmp_path / "checkpoint-x").mkdir()
    found = demo_cmd.find_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-5", "checkpoint-20", "checkpoint-100"]
    assert demo_cmd.checkpoint_step(found[-1]) == 100


def test_lr_curve_reads_the_closed_form_schedule():
    from optsched import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=6)
    # HF's linear schedule: step / warmup, then (T - step) / (T - warmup)
    assert demo_cmd.lr_curve(scheduler, 6) == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert optimizer.param_groups[0]["lr"] == 0.0  # nothing was stepped


def test_lr_curve_needs_a_closed_form_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(TypeError, match="ScheduleLR"):
        demo_cmd.lr_curve(torch.optim.lr_scheduler.StepLR(optimizer, 1), 3)


# --------------------------------------------------------------------------------------------------
# the command, through the dispatcher
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def run_cli(monkeypatch, capsys):
    # only this command: the dispatcher builds every listed subcommand's parser, and the others are
    # not this test's business
    monkeypatch.setattr(cli, "COMMANDS", {"demo": "optsched.commands.demo"})

    def run(*argv: str) -> tuple[int, str, str]:
        threads = torch.get_num_threads()
        code = cli.main(["demo", *argv])
        assert torch.get_num_threads() == threads  # --threads is restored for the caller
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


FAST = ("--num-examples", "256", "--logging-steps", "5", "--learning-rate", "3e-3", "--no-progress")


def _state(output_dir: Path, step: int) -> dict:
    return json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())


def test_demo_trains_lowers_the_loss_writes_checkpoints_and_resumes(run_cli, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, err = run_cli("--output-dir", str(out_dir), "--max-steps", "40", "--save-steps", "20", *FAST)
    assert code == 0, err
    # the parameter-group table: HF's two groups, seed's weight decay
    assert "AdamW" in out and "lr_scheduler_type='linear'" in out
    assert any(line.split()[:2] == ["0", "decay"] for line in out.splitlines())
    assert any(line.split()[:2] == ["1", "no_decay"] for line in out.splitlines())
    losses = [line for line in out.splitlines() if line.startswith("loss ")]
    assert len(losses) == 1 and losses[0].startswith("loss fell:"), out
    first, last = (float(x) for x in [losses[0].split()[2], losses[0].split()[7]])
    assert last < first
    assert "eval: loss" in out and "accuracy" in out
    assert (out_dir / "checkpoint-20" / "trainer_state.json").is_file()
    assert _state(out_dir, 40)["global_step"] == 40
    if importlib.util.find_spec("matplotlib") is not None:
        assert f"lr curve: {out_dir / 'lr_curve.png'}" in out
        assert (out_dir / "lr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "lr curve: skipped" in out and "optsched[plot]" in out

    # --resume at the end of the plan: nothing to do, says how to go on
    code, out, err = run_cli("--output-dir", str(out_dir), "--max-steps", "40", "--resume", *FAST)
    assert code == 0 and "already at step 40" in out and "--max-steps 80" in out

    # --resume with a longer plan continues from checkpoint-40 (not from scratch)
    code, out, err = run_cli("--output-dir", str(out_dir), "--max-steps", "60", "--save-steps", "20", "--resume",
                             *FAST)
    assert code == 0, err
    assert "resuming from" in out and "checkpoint-40" in out
    state = _state(out_dir, 60)
    assert state["global_step"] == 60
    logged_steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged_steps[0] == 5 and logged_steps[-1] == 60  # history carried over from the first run


def test_one_logged_loss_claims_no_trend(run_cli, tmp_path):
    # 4 steps logged every 4: one value, which neither fell nor "did not fall"
    code, out, err = run_cli("--output-dir", str(tmp_path / "one"), "--max-steps", "4", "--logging-steps", "4",
                             "--num-examples", "64", "--batch-size", "16", "--no-progress")
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("loss ")]
    assert "at step 4, the only one logged (every --logging-steps 4)" in line
    assert "fell" not in line


def test_demo_epochs_flag(run_cli, tmp_path):
    out_dir = tmp_path / "epochs"
    code, out, err = run_cli("--output-dir", str(out_dir), "--epochs", "1", "--num-examples", "64",
                             "--batch-size", "16", "--save-steps", "4", "--logging-steps", "2", "--no-progress",
                             "--threads", "2")  # run_cli checks that the caller's 1 thread is restored
    assert code == 0, err
    assert _state(out_dir, 4)["global_step"] == 4  # 64 / 16 = 4 steps in one epoch


def test_default_save_steps_is_a_quarter_of_an_epochs_run(tmp_path):
    # --epochs 2 over 64 examples in batches of 16: 8 steps, a checkpoint every 2 (not every 100 // 4)
    cfg = demo_cmd.build_parser().parse_args(["--epochs", "2", "--num-examples", "64", "--batch-size", "16"])
    assert demo_cmd._training_arguments(cfg, tmp_path).save_steps == 2
    cfg = demo_cmd.build_parser().parse_args(["--epochs", "0.5", "--num-examples", "70", "--batch-size", "16"])
    assert demo_cmd._training_arguments(cfg, tmp_path).save_steps == 1  # ceil(0.5 * 5) = 3 steps
    cfg = demo_cmd.build_parser().parse_args(["--max-steps", "40"])
    assert demo_cmd._training_arguments(cfg, tmp_path).save_steps == 10


def test_the_continue_command_repeats_the_flags_of_the_run(run_cli, tmp_path):
    # resuming without --task / --num-examples would train on other data from the checkpoint
    out_dir = tmp_path / "marker"
    code, out, err = run_cli("--output-dir", str(out_dir), "--max-steps", "4", "--task", "marker",
                             "--batch-size", "16", "--num-examples", "64", "--logging-steps", "2", "--no-progress")
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("continue with: ")]
    assert line == (f"continue with: optsched demo --output-dir {out_dir} --task marker --num-examples 64 "
                    "--batch-size 16 --logging-steps 2 --resume --max-steps 8")
    code, out, err = run_cli(*line.split()[4:], "--no-progress")  # that command goes on from checkpoint-4
    assert code == 0, err
    assert f"resuming from {out_dir / 'checkpoint-4'}" in out and _state(out_dir, 8)["global_step"] == 8


@pytest.mark.parametrize(("name", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_demo_says_how_to_finish_the_same_run(run_cli, tmp_path, monkeypatch, name, status):
    import signal

    import optsched
    from optsched.trainer import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                signal.raise_signal(signal.Signals[name])

    class Interrupted(optsched.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, callbacks=[CtrlC], **kwargs)

    monkeypatch.setattr(optsched, "Trainer", Interrupted)
    out_dir = tmp_path / "stopped"
    code, out, err = run_cli("--output-dir", str(out_dir), "--max-steps", "10", "--num-examples", "64",
                             "--batch-size", "16", "--no-progress")
    # the shell's status for the signal (128 + its number), not 0: a job scheduler must not take the
    # preempted run for a finished one
    assert code == status, err
    assert (out_dir / "checkpoint-3" / "trainer_state.json").is_file()
    # the same plan (--max-steps 10), not twice the planned length, and not "done"
    assert out.rstrip().splitlines()[-1] == (
        f"stopped by {name} at step 3 of 10; continue with: optsched demo --output-dir {out_dir} "
        "--num-examples 64 --batch-size 16 --resume --max-steps 10"
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--max-steps", "-1"], "--max-steps: expected an integer > 0, got '-1'"),
        (["--max_steps", "ten"], "--max_steps: expected an integer > 0, got 'ten'"),
        (["--learning-rate", "0"], "--learning-rate: expected a number > 0, got '0'"),
        (["--bogus"], "--bogus"),
        (["--task", "majorty"], "Did you mean 'majority'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(run_cli, tmp_path, argv, needle):
    code, out, err = run_cli("--output-dir", str(tmp_path / "bad"), *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("a_file", "is a file, not a folder; accepted: a folder (new or existing) you can write to."),
        ("a_file/sub", "cannot write there (Not a directory)"),
        ("d" * 300, "cannot write there (File name too long)"),
    ],
)
def test_an_output_dir_that_cannot_be_used_is_one_line_before_training(run_cli, tmp_path, where, needle):
    (tmp_path / "a_file").write_text("not a folder")
    output_dir = tmp_path / where
    code, out, err = run_cli("--output-dir", str(output_dir), "--max-steps", "4", *FAST)
    assert code == 2 and out == ""  # refused before the model is built, not at the first checkpoint
    assert err.startswith(f"optsched demo: error: --output-dir={str(output_dir)!r}") and err.count("\n") == 1
    assert needle in err and err.rstrip().endswith("accepted: a folder (new or existing) you can write to.")


def test_resume_without_checkpoint_exits_2(run_cli, tmp_path):
    code, out, err = run_cli("--output-dir", str(tmp_path / "empty"), "--resume")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "no checkpoint" in err


def test_help_line_and_parser_defaults():
    assert isinstance(demo_cmd.HELP, str) and "\n" not in demo_cmd.HELP
    cfg = demo_cmd.build_parser().parse_args([])
    assert cfg.output_dir == "optsched-demo" and cfg.max_steps == demo_cmd.DEFAULT_MAX_STEPS
    assert cfg.resume is False and cfg.epochs is None
    assert math.isclose(cfg.learning_rate, 1e-3)
