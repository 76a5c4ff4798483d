"""Terminal chart and PNG rendering of lr curves."""

from __future__ import annotations

import builtins

import pytest

from optsched.schedules import build_schedule
from optsched.schedules.render import ascii_chart, format_key_points, key_points, sample, save_png


def test_chart_shape_axes_and_extremes():
    values = sample(build_schedule("linear", 10, 200), 200, scale=3e-4)
    chart = ascii_chart(values, width=60, height=15)
    lines = chart.splitlines()
    assert len(lines) == 15 + 2
    assert lines[0].startswith("3.000e-04 |") and lines[14].startswith("0.000e+00 |")
    assert lines[-1].rstrip().endswith("199") and lines[-1].strip().startswith("0")
    grid = [line.split("|", 1)[1] for line in lines[:15]]
    assert all(len(row) <= 60 for row in grid)
    assert grid[0].index("*") < 10  # the peak right after a 10/200 warmup
    assert grid[14][0] == "*" and chart.isascii()


def test_chart_draws_restarts_as_vertical_lines():
    values = sample(build_schedule("cosine_with_restarts", 0, 90, {"num_cycles": 3}), 90)
    grid = [line.split("|", 1)[1] for line in ascii_chart(values, width=90, height=10).splitlines()[:10]]
    column = 30  # the first restart: every row is filled in that column
    assert all(len(row) > column and row[column] == "*" for row in grid)


def test_multi_series_legend_and_markers():
    a = sample(build_schedule("linear", 0, 50), 50)
    chart = ascii_chart({"decay": a, "no_decay": [0.5 * v for v in a]}, width=40, height=8)
    assert "* decay" in chart and "o no_decay" in chart and "o" in chart.splitlines()[4]


@pytest.mark.parametrize(
    ("series", "error"), [([], ValueError), ([float("nan")], ValueError), ({"a": []}, ValueError)]
)
def test_chart_bad_input(series, error):
    with pytest.raises(error):
        ascii_chart(series)


def test_key_points():
    assert key_points(100, 10) == [("start", 0), ("end of warmup", 10), ("middle", 50), ("last", 99)]
    assert key_points(100, 0) == [("start", 0), ("middle", 50), ("last", 99)]
    assert key_points(1, 5) == [("start", 0)]
    text = format_key_points([0.0, 1.0, 0.5, 0.25], 1)
    assert "end of warmup (step 1)" in text and "1.000000e+00" in text and "last (step 3)" in text


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = save_png({"lr": [0.0, 1.0, 0.5]}, tmp_path / "curve.png", "t", num_warmup_steps=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_png([1.0], tmp_path / "missing" / "x.png")


@pytest.mark.parametrize(("warmup", "lines"), [(2, [2]), (5, []), (9, []), (0, [])])
def test_png_marks_the_end_of_warmup_only_inside_the_run(tmp_path, monkeypatch, warmup, lines):
    # a 5-step run with 9 warmup steps has no end of warmup: its line made the x axis run to step 9
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    drawn = []
    real_axvline = Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda self, x, *a, **kw: drawn.append(x) or real_axvline(self, x, *a, **kw))
    save_png({"lr": [0.0, 0.25, 0.5, 0.75, 1.0]}, tmp_path / "warmup.png", num_warmup_steps=warmup)
    assert drawn == lines


def test_png_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'optsched\[plot\]'"):
        save_png([1.0, 0.5], tmp_path / "x.png")


def test_a_chart_of_every_step_given_as_steps_is_the_same_chart():
    values = sample(build_schedule("cosine_with_restarts", 5, 97, {"num_cycles": 3}), 97)
    assert ascii_chart(values, width=24, height=6, steps=range(97)) == ascii_chart(values, width=24, height=6)
    assert ascii_chart(values, width=24, height=6, steps=list(range(97))) == ascii_chart(values, width=24, height=6)


def test_a_sampled_chart_spans_the_whole_run():
    # three values of a 1001-step run: the x axis ends at step 1000; the jump at step 500 is a vertical
    # line, a column without a sampled step holds the last value before it, the last one goes to 0.5
    chart = ascii_chart([0.0, 1.0, 0.5], width=10, height=3, steps=[0, 500, 1000]).splitlines()
    assert chart[:3] == ["1.000e+00 |     *****", "5.000e-01 |     *   *", "0.000e+00 |******"]
    assert chart[-1].split() == ["0", "1000"]


@pytest.mark.parametrize(
    ("steps", "match"),
    [([0, 1], "3 values for 2 steps"), ([1, 2, 3], "ascend strictly from step 0"), ([0, 2, 2], "ascend strictly")],
)
def test_chart_bad_steps(steps, match):
    with pytest.raises(ValueError, match=match):
        ascii_chart([1.0, 2.0, 3.0], steps=steps)


def test_key_points_of_a_sampled_run():
    text = format_key_points({0: 0.0, 10: 1.0, 500: 0.5, 999: 0.001}, 10, num_steps=1000)
    assert "end of warmup (step 10)" in text and "middle (step 500)" in text and "lr = 1.000000e-03" in text
    with pytest.raises(ValueError, match="num_steps is required"):
        format_key_points({0: 1.0}, 0)
    with pytest.raises(KeyError):
        format_key_points({0: 1.0}, 0, num_steps=1000)  # the middle and last steps were not sampled


def test_png_of_a_sampled_run(tmp_path):
    pytest.importorskip("matplotlib")
    path = save_png([0.0, 1.0, 0.5], tmp_path / "sampled.png", num_warmup_steps=500, steps=[0, 500, 1000])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
