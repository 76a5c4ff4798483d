"""``optsched`` dispatcher: flags spelled as transformers spells them, and what an unknown flag is told."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import warnings

import pytest

from optsched import cli, commands
from optsched.commands import demo as demo_cmd
from optsched.commands import schedule as schedule_cmd


def test_spellings_doctest():
    assert doctest.testmod(commands, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


@pytest.mark.parametrize(
    "names, flags",
    [
        (("lr",), ["--lr"]),
        (("max_steps",), ["--max-steps", "--max_steps"]),
        (("steps", "num_training_steps"), ["--steps", "--num-training-steps", "--num_training_steps"]),
        (("a_b", "a_b"), ["--a-b", "--a_b"]),  # no flag twice
    ],
)
def test_spellings_table(names, flags):
    assert commands.spellings(*names) == flags


@pytest.mark.parametrize(
    "argv",
    [
        ["cosine", "--steps", "20", "--warmup-steps", "2", "--lr", "0.001"],
        ["cosine", "--num_training_steps", "20", "--num_warmup_steps", "2", "--learning_rate", "0.001"],
        ["cosine", "--max_steps", "20", "--warmup_steps", "2", "--learning-rate", "0.001"],
        ["cosine", "--num-training-steps", "20", "--num-warmup-steps", "2", "--lr", "1e-3"],
    ],
)
def test_schedule_answers_to_transformers_names(argv):
    cfg = schedule_cmd.build_parser().parse_args(argv)
    assert (cfg.steps, cfg.warmup_steps, cfg.lr) == (20, 2, 0.001)


def test_demo_answers_to_training_arguments_names():
    argv = ["--output_dir", "d", "--max_steps", "7", "--per_device_train_batch_size", "4", "--learning_rate", "0.01",
            "--save_steps", "2", "--logging_steps", "3", "--num_train_epochs", "1.5", "--no_progress"]  # fmt: skip
    cfg = demo_cmd.build_parser().parse_args(argv)
    assert (cfg.output_dir, cfg.max_steps, cfg.batch_size, cfg.learning_rate) == ("d", 7, 4, 0.01)
    assert (cfg.save_steps, cfg.logging_steps, cfg.epochs, cfg.no_progress) == (2, 3, 1.5, True)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["schedule", "cosine", "--stepz", "10"], ["unrecognized arguments: --stepz 10", "did you mean --steps?"]),
        # an abbreviation is refused (jsonargparse 5 refuses them; 4 accepted them with a warning)
        (["schedule", "cosine", "--step", "10"], ["--step: did you mean --steps?"]),
        (["plan", "--warmup_step", "5"], ["--warmup_step: did you mean --warmup_steps?", "optsched plan --help"]),
        (["demo", "--max_step", "3", "--foo=2"], ["--max_step: did you mean --max-steps?", "optsched demo --help"]),
        (["plan", "--warmup", "2"], ["--warmup: did you mean --warmup_steps or --warmup_ratio?"]),
        (["schedule", "cosine", "--steps", "10", "--xyzzy"], ["--xyzzy; accepted flags: optsched schedule --help"]),
    ],
)
def test_an_unknown_flag_gets_the_closest_one_and_where_to_look(argv, fragments, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning on the way either
        assert cli.main(argv) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and captured.out == ""
    for fragment in fragments:
        assert fragment in err


def test_hint_is_empty_for_other_errors():
    assert cli.unrecognized_hint("argument --steps: expected one argument", "schedule") == ""
    assert cli.unrecognized_hint("unrecognized arguments: --x", None) == ""


@pytest.mark.parametrize("command", ["plan", "demo", "schedule"])
def test_help_is_never_the_suggestion(command, capsys):
    # "--hel" is closest to --help: an unknown flag is never told to ask for help by its own name
    argv = [command, "cosine", "--steps", "3", "--hel", "1"] if command == "schedule" else [command, "--hel", "1"]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "did you mean --help" not in capsys.readouterr().err


def test_lr_is_learning_rate_in_every_command():
    from optsched.commands import plan as plan_cmd

    assert plan_cmd.build_parser().parse_args(["--lr", "0.003"]).learning_rate == 0.003
    assert demo_cmd.build_parser().parse_args(["--lr", "0.003"]).learning_rate == 0.003
    assert schedule_cmd.build_parser().parse_args(["cosine", "--steps", "3", "--lr", "0.003"]).lr == 0.003


# --------------------------------------------------------------------------------------------------
# warnings: one line each, no source line
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["schedule", "linear", "--steps", "10", "--warmup-steps", "20"],
        ["plan", "--steps", "10", "--warmup_steps", "20"],
    ],
)
def test_a_warning_is_one_line_without_source(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # shown even if an earlier test triggered it already
        assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err == (
        f"optsched {argv[0]}: warning: num_warmup_steps=20 is longer than num_training_steps=10: "
        "the 'linear' schedule never reaches its peak learning rate.\n"
    )


def test_the_warning_printer_is_the_callers_again_afterwards(capsys):
    before = warnings.showwarning
    assert cli.main(["schedule", "linear", "--steps", "10"]) == 0
    assert warnings.showwarning is before


# --------------------------------------------------------------------------------------------------
# a closed pipe (`optsched plan | head -1`): quiet, as Unix tools are
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["schedule", "linear", "--steps", "10"],
        ["plan", "--steps", "10"],
    ],
)
def test_a_closed_stdout_pipe_ends_quietly(argv):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "optsched", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == cli.EXIT_BROKEN_PIPE


# --------------------------------------------------------------------------------------------------
# a value of the wrong type: the flag as typed, the value as typed, what is accepted
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["schedule", "linear", "--steps", "1e12"], "--steps: expected an integer, got '1e12'"),
        (["schedule", "linear", "--steps", "10", "--num_training_steps", "1e12"],
         "--num_training_steps: expected an integer, got '1e12'"),
        (["schedule", "linear", "--steps", "10", "--lr", "nan"], "--lr: expected a finite number, got 'nan'"),
        (["schedule", "linear", "--steps", "10", "--learning-rate=inf"],
         "--learning-rate: expected a finite number, got 'inf'"),
        (["plan", "--steps", "1e12"], "--steps: expected an integer, got '1e12'"),
        (["plan", "--steps", "5", "--warmup_steps", "abc"], "--warmup_steps: expected a finite number, got 'abc'"),
        (["plan", "--steps", "5", "--fp16", "maybe"], "--fp16: expected true or false, got 'maybe'"),
        (["demo", "--epochs", "0"], "--epochs: expected a number > 0, got '0'"),
        (["demo", "--max-steps", "-1"], "--max-steps: expected an integer > 0, got '-1'"),
        (["demo", "--seed", "x"], "--seed: expected an integer >= 0, got 'x'"),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_reads_like_the_other_errors(argv, expected, capsys):
    assert cli.main(argv) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err == f"optsched {argv[0]}: error: {expected}\n" and captured.out == ""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["schedule", "linear"], "missing --steps"),  # argparse: "required: schedule.steps"
        (["schedule"], "missing name, --steps"),  # the positional as the usage line names it, not schedule.name
        (["schedule", "linear", "--max_steps"], "--max_steps: expected a value after it"),
        (["schedule", "linear", "--steps", "10", "--warmup-steps"], "--warmup-steps: expected a value after it"),
        (["plan", "--steps"], "--steps: expected a value after it"),  # not the five spellings of the flag
    ],
)  # fmt: skip
def test_a_missing_flag_or_value_is_named_as_typed(argv, expected, capsys):
    assert cli.main(argv) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err == f"optsched {argv[0]}: error: {expected}\n" and captured.out == ""


def test_a_wrong_type_in_the_config_file_says_so(tmp_path, capsys):
    config = tmp_path / "args.yaml"
    config.write_text("learning_rate: abc\n")
    assert cli.main(["plan", "--steps", "5", "--config", str(config)]) == cli.EXIT_USAGE
    assert capsys.readouterr().err == (
        "optsched plan: error: --learning_rate: expected a finite number, got 'abc' (in the --config file)\n"
    )


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["schedule", "cosine", "--stepz", "10"], "schedule"),  # refused by the parser
        (["schedule", "nope", "--steps", "10"], "schedule"),  # refused by the command
        (["plan", "--steps", "abc"], "plan"),
        (["plan", "--steps", "-1"], "plan"),
        (["demo", "--nope"], "demo"),
        (["demo", "--task", "nope"], "demo"),
    ],
)  # fmt: skip
def test_every_error_of_a_command_starts_with_its_name(argv, command, capsys):
    # argparse's convention for a subcommand's errors, whichever of the parser or the command refused
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"optsched {command}: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [[], ["foo"], ["--nope"]])
def test_an_error_without_a_known_command_starts_with_optsched(argv, capsys):
    assert cli.main(argv) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("optsched: error: ")


def test_an_interrupted_command_says_which(monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(schedule_cmd, "run", interrupted)
    assert cli.main(["schedule", "cosine", "--steps", "10"]) == 130
    assert capsys.readouterr().err == "optsched schedule: interrupted\n"


def test_describe_type_doctest():
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(cli.describe_type, globs=dict(vars(cli))):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 2
