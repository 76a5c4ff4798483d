"""``optsched schedule``: output, PNG, and one-line errors with exit code 2 (also via python -m)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from optsched.cli import main
from optsched.commands.schedule import parse_kw


def test_prints_chart_and_key_points(capsys):
    assert main(["schedule", "linear", "--warmup-steps", "2", "--steps", "10", "--lr", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("linear: warmup 2 steps, 10 steps, lr 10")
    assert "1.000e+01 |" in out and "0.000e+00 |" in out
    assert "start (step 0)" in out and "lr = 0.000000e+00" in out
    assert "end of warmup (step 2)" in out and "lr = 1.000000e+01" in out
    assert "middle (step 5)" in out and "lr = 6.250000e+00" in out
    assert "last (step 9)" in out and "lr = 1.250000e+00" in out


def test_kwargs_alias_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "wsd.png"
    argv = ["schedule", "wsd", "--warmup-steps", "5", "--steps", "50", "--kw", "num_decay_steps=10",
            "--kw", "decay_type=linear", "--kw", "min_lr_ratio=0.1", "--png", str(png)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warmup_stable_decay" in out and "num_decay_steps=10" in out and "decay_type='linear'" in out
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["schedule", "cosin", "--steps", "10"], "Did you mean 'cosine'"),
        (["schedule", "linear"], "steps"),
        (["schedule", "linear", "--steps", "0"], "num_training_steps=0"),
        (["schedule", "linear", "--steps", "10", "--warmup-steps", "-1"], "num_warmup_steps=-1"),
        (["schedule", "linear", "--steps", "10", "--kw", "num_cycles=2"], "does not accept"),
        (["schedule", "cosine", "--steps", "10", "--kw", "num_cycles"], "not key=value"),
        (["schedule", "polynomial", "--steps", "10", "--kw", "lr_end=1"], "must be smaller than the initial lr"),
        (["schedule", "greedy", "--steps", "10"], "metric-driven"),
        (["schedule", "linear", "--steps", "abc"], "steps"),
        (["schedule", "linear", "--steps", "10", "--lr", "0"], "--lr=0.0"),
        (["schedule", "linear", "--steps", "10", "--width", "1"], "--width=1"),
        (["schedule", "linear", "--steps", "10", "--height", "0"], "--height=0"),
    ],
)
def test_bad_input_one_line_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err
    assert captured.out == ""


def test_python_dash_m_bad_name_exits_2():
    # the bad-name path fails before torch is imported, so this subprocess is cheap
    bad = subprocess.run(
        [sys.executable, "-m", "optsched", "schedule", "nope", "--steps", "20"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a known schedule" in bad.stderr


@pytest.mark.slow
def test_python_dash_m_end_to_end():
    ok = subprocess.run(
        [sys.executable, "-m", "optsched", "schedule", "cosine", "--warmup-steps", "1", "--steps", "20"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0 and "end of warmup (step 1)" in ok.stdout


def test_parse_kw_values():
    assert parse_kw(["a=2", "b=0.5", "c=true", "d=null", "e=linear", "f=[1, 2]", "g=1e-7"]) == {
        "a": 2, "b": 0.5, "c": True, "d": None, "e": "linear", "f": [1, 2], "g": 1e-7,
    }  # fmt: skip
    assert parse_kw(None) == {}
    with pytest.raises(ValueError, match="given twice"):
        parse_kw(["a=1", "a=2"])
    with pytest.raises(ValueError, match="not key=value"):
        parse_kw(["=1"])


# --------------------------------------------------------------------------------------------------
# --png: the file named is the file written; a folder, an empty name or another format is refused
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["schedule", "linear"], ["plan"]])
def test_png_without_suffix_gets_png_and_says_so(command, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main([*command, "--steps", "10", "--png", str(tmp_path / "curve")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'curve.png'}"
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]


@pytest.mark.parametrize("command", [["schedule", "linear"], ["plan"]])
@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "--png='': an empty file name; accepted: a PNG file name"),
        (".", "is a folder; accepted: a PNG file name, e.g. "),
        ("new_folder/", "is a folder"),
        ("curve.jpg", "ends in '.jpg', but the file is a PNG; accepted: a name ending in .png"),
        ("missing/curve.png", "the folder"),
    ],
)
def test_png_names_that_are_refused(command, name, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--steps", "10", "--png", name]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert fragment in err and "\n" not in err and captured.out == ""
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / f"{tmp_path.name}.png").exists()


@pytest.mark.parametrize("command", [["schedule", "linear"], ["plan"]])
def test_png_that_cannot_be_written_is_one_line_naming_it(command, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / ("x" * 300 + ".png")  # longer than any file system's name limit: open() fails
    assert main([*command, "--steps", "10", "--png", str(png)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err == (f"optsched {command[0]}: error: --png={str(png)!r}: cannot write it (File name too long); "
                   "accepted: a PNG file in a folder you can write to.")  # fmt: skip
    assert captured.out == ""  # the PNG is written before anything is printed


@pytest.mark.parametrize(
    ("name", "warmup", "steps"),
    [("polynomial", "10", "10"), ("linear", "20", "10"), ("cosine", "9", "10")],
)
def test_end_of_warmup_is_shown_only_where_the_peak_is(name, warmup, steps, capsys):
    # the end of warmup is step num_warmup_steps, at the peak lr; a run of `steps` steps may end first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warmup longer than the run
        assert main(["schedule", name, "--steps", steps, "--warmup-steps", warmup, "--lr", "5e-5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " lr = " in line]
    marked = [line for line in lines if line.startswith("end of warmup")]
    if int(warmup) < int(steps):
        assert marked == [f"{f'end of warmup (step {warmup})':<26} lr = 5.000000e-05"]  # the peak
    else:
        assert marked == [] and lines[-1].startswith(f"last (step {int(steps) - 1})")


# Outputs of short runs, taken before the lr was sampled: a run of at most FULL_STEPS steps is still
# evaluated at every step, so its output is the same to the byte.
SNAPSHOTS = {
    ("cosine_with_restarts", "--steps", "97", "--warmup-steps", "5", "--kw", "num_cycles=3", "--width", "24",
     "--height", "6"): """\
cosine_with_restarts: warmup 5 steps, 97 steps, lr 5e-05, num_cycles=3
5.000e-05 | ***     **     ***
          | * **    ***    * **
2.500e-05 |**  **   * **   *  **
          |*    **  *  *** *   **
          |*     ** *    ***    **
0.000e+00 |*      ***     **     **
          +------------------------
           0                     96
start (step 0)             lr = 0.000000e+00
end of warmup (step 5)     lr = 5.000000e-05
middle (step 48)           lr = 3.256286e-05
last (step 96)             lr = 1.310680e-07
""",
    ("warmup_stable_decay", "--steps", "40", "--warmup-steps", "4", "--kw", "num_decay_steps=10", "--width", "30",
     "--height", "5"): """\
warmup_stable_decay: warmup 4 steps, 40 steps, lr 5e-05, num_decay_steps=10
5.000e-05 |   ***********************
          |  **                     **
2.500e-05 |  *                       **
          | **                        ***
0.000e+00 |**                           *
          +------------------------------
           0                           39
start (step 0)             lr = 0.000000e+00
end of warmup (step 4)     lr = 5.000000e-05
middle (step 20)           lr = 5.000000e-05
last (step 39)             lr = 1.223587e-06
""",
}  # fmt: skip


@pytest.mark.parametrize("argv", list(SNAPSHOTS))
def test_a_short_run_prints_what_it_printed_before_sampling(argv, capsys):
    assert main(["schedule", *argv]) == 0
    assert capsys.readouterr().out == SNAPSHOTS[argv]


@pytest.mark.parametrize("steps", [10**6, 10**9])
def test_a_long_run_evaluates_a_bounded_number_of_steps(steps, lr_evaluations, capsys, tmp_path):
    from optsched.schedules.sampling import GRID_STEPS

    pytest.importorskip("matplotlib")
    calls = lr_evaluations
    argv = ["schedule", "cosine_with_restarts", "--steps", str(steps), "--warmup-steps", "1000", "--kw",
            "num_cycles=3", "--png", str(tmp_path / "lr.png")]  # fmt: skip
    assert main(argv) == 0
    # the grid, each of the 60 columns' first and last step, three steps around each of the key steps
    # and the critical steps (the end of warmup, two restarts)
    assert 0 < calls[0] <= GRID_STEPS + 2 * 60 + 3 * 7 + 2
    out = capsys.readouterr().out
    assert f"last (step {steps - 1})" in out and (tmp_path / "lr.png").exists()


def test_the_chart_of_a_billion_steps_shows_the_restarts_and_exact_key_lrs(capsys):
    import torch

    from optsched.schedules import get_scheduler

    steps, warmup = 10**9, 3
    assert main(["schedule", "cosine_with_restarts", "--steps", str(steps), "--warmup-steps", str(warmup), "--kw",
                 "num_cycles=3", "--lr", "1", "--height", "8"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    grid = [line.split("|", 1)[1].ljust(60) for line in lines[1:9]]
    assert lines[1].startswith("1.000e+00 |") and lines[8].startswith("0.000e+00 |")
    for column in (0, 20, 40):  # the warmup's rise, then each restart: a vertical line over every row
        assert all(row[column] == "*" for row in grid), column
    assert grid[-1][19] == "*" and grid[-1][59] == "*"  # each cycle reaches 0 before its restart
    # the key steps' lrs are evaluated at exactly those steps
    scheduler = get_scheduler("cosine_with_restarts", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                              warmup, steps, {"num_cycles": 3})  # fmt: skip
    for label, step in (("end of warmup", warmup), ("middle", steps // 2), ("last", steps - 1)):
        assert f"{label + ' (step ' + str(step) + ')':<26} lr = {scheduler.lr_at(step)[0]:.6e}" in lines
