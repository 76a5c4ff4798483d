"""Draw learning-rate curves: a plain-text terminal chart and a PNG (matplotlib, optional).

Reusable by every command that shows a schedule (``optsched schedule``, ``plan``, ``demo``): the
inputs are plain ``{label: [lr at step 0, 1, ...]}`` mappings, one curve per param group if wanted.
A long run is drawn from a sample of its steps (``steps=``, chosen by
:func:`optsched.schedules.sampling.sample_steps`), which gives the chart of every step at a bounded cost.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from optsched._validation import check_int, missing_package

__all__ = ["MARKERS", "ascii_chart", "key_points", "png_path", "sample", "save_png", "format_key_points"]

MARKERS = "*o+x#%@&"
"""Characters for the curves of a multi-series chart, in order."""


def sample(schedule: Callable[[int], float], num_steps: int, scale: float = 1.0) -> list[float]:
    """``[scale * schedule(s) for s in range(num_steps)]``: the values a run of ``num_steps`` steps uses."""
    check_int("num_steps", num_steps, low=1)
    return [scale * float(schedule(s)) for s in range(num_steps)]


def _as_series(series: Mapping[str, Sequence[float]] | Sequence[float]) -> dict[str, list[float]]:
    if isinstance(series, Mapping):
        out = {str(k): [float(v) for v in vals] for k, vals in series.items()}
    else:
        out = {"lr": [float(v) for v in series]}
    if not out or any(len(v) == 0 for v in out.values()):
        raise ValueError("series is empty; accepted: at least one curve with at least one value.")
    for label, values in out.items():
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"curve {label!r} has non-finite values; accepted: finite learning rates.")
    return out


def _check_steps(steps: Sequence[int], curves: Mapping[str, list[float]]) -> Sequence[int]:
    """``steps`` of sampled curves: as many as each curve has values, ascending, from step 0."""
    steps = steps if isinstance(steps, range) else [int(s) for s in steps]
    for label, values in curves.items():
        if len(values) != len(steps):
            raise ValueError(
                f"curve {label!r} has {len(values)} values for {len(steps)} steps; accepted: one value per step."
            )
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("steps must ascend strictly from step 0 (the run's first step).")
    return steps


def _columns(values: Sequence[float], width: int, steps: Sequence[int] | None = None) -> list[tuple[float, float]]:
    """(low, high) per column: each column covers a bucket of steps; joined to the previous column
    so steep drops (restarts) are drawn as a vertical line instead of leaving gaps.

    ``values`` are at ``steps`` (default ``0, 1, ...``) of a run of ``steps[-1] + 1`` steps; a bucket is
    the values at the sampled steps in its range, so a sample holding each bucket's first and last step
    and the steps where the curve turns draws the chart of every step. A bucket with no sampled step
    (a sample without them) holds the previous column's last value."""
    if steps is None:
        steps = range(len(values))
    n = steps[-1] + 1
    cols = min(width, n)
    out: list[tuple[float, float]] = []
    previous: float | None = None
    for c in range(cols):
        lo_i = bisect.bisect_left(steps, c * n // cols)
        hi_i = bisect.bisect_left(steps, max(c * n // cols + 1, (c + 1) * n // cols))
        bucket = values[lo_i:hi_i] or [previous if previous is not None else values[0]]
        low, high = min(bucket), max(bucket)
        if previous is not None:
            low, high = min(low, previous), max(high, previous)
        out.append((low, high))
        previous = bucket[-1]
    return out


def ascii_chart(
    series: Mapping[str, Sequence[float]] | Sequence[float],
    width: int = 60,
    height: int = 15,
    *,
    y_min: float | None = None,
    y_max: float | None = None,
    steps: Sequence[int] | None = None,
) -> str:
    """A plain-ASCII line chart of one or more curves sampled at steps ``0..n-1``.

    Each curve is drawn with its marker from :data:`MARKERS` (a legend line is added for more than
    one). The y axis runs from ``y_min`` (default: 0 or the lowest value if negative) to ``y_max``
    (default: the highest value), labelled at the top, middle and bottom; the x axis shows the first
    and last step.

    ``steps`` gives the step of each value when the curves are a sample of a run of ``steps[-1] + 1``
    steps (every curve has one value per step; default ``0, 1, ...`` and curves of other lengths are
    stretched over the longest). The chart is the one of every step when the sample holds each
    column's first and last step and the steps where the curves jump or turn, as
    :func:`optsched.schedules.sampling.sample_steps` does.

    Raises:
        ValueError: ``width`` or ``height`` below 2, an empty or non-finite curve, or ``steps`` not
            ascending from 0 or not one per value.

    Example:
        >>> print(ascii_chart([0, 1, 2, 3], width=4, height=3))  # doctest: +NORMALIZE_WHITESPACE
        3.000e+00 |   *
        1.500e+00 | ***
        0.000e+00 |**
                  +----
                   0  3
    """
    check_int("width", width, low=2)
    check_int("height", height, low=2)
    curves = _as_series(series)
    if steps is not None:
        steps = _check_steps(steps, curves)
    everything = [v for vals in curves.values() for v in vals]
    lo = min(0.0, min(everything)) if y_min is None else float(y_min)
    hi = max(everything) if y_max is None else float(y_max)
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    n = max(len(v) for v in curves.values()) if steps is None else steps[-1] + 1
    cols = min(width, n)
    grid = [[" "] * cols for _ in range(height)]

    def row_of(value: float) -> int:
        frac = (min(max(value, lo), hi) - lo) / (hi - lo)
        return (height - 1) - round(frac * (height - 1))

    for index, (label, values) in enumerate(curves.items()):
        marker = MARKERS[index % len(MARKERS)]
        # stretch shorter curves over the same x range
        m = len(values)
        padded = values if m == n or steps is not None else [values[min(m - 1, i * m // n)] for i in range(n)]
        for c, (low, high) in enumerate(_columns(padded, cols, steps)):
            top, bottom = row_of(high), row_of(low)
            for r in range(top, bottom + 1):
                grid[r][c] = marker
    labels = {0: f"{hi:.3e}", (height - 1) // 2: f"{(lo + hi) / 2:.3e}", height - 1: f"{lo:.3e}"}
    pad = max(len(s) for s in labels.values())
    lines = [f"{labels.get(r, ''):>{pad}} |{''.join(row).rstrip()}" for r, row in enumerate(grid)]
    lines.append(f"{'':>{pad}} +{'-' * cols}")
    first, last = "0", str(n - 1)
    axis = first + " " * max(1, cols - len(first) - len(last)) + last if cols > 1 else first
    lines.append(f"{'':>{pad}}  {axis}")
    if len(curves) > 1:
        legend = "  ".join(f"{MARKERS[i % len(MARKERS)]} {label}" for i, label in enumerate(curves))
        lines.append(f"{'':>{pad}}  {legend}")
    return "\n".join(lines)


def key_points(num_steps: int, num_warmup_steps: int = 0) -> list[tuple[str, int]]:
    """The steps worth printing: start, end of warmup, middle, last (``num_steps - 1``); no duplicates.

    The end of warmup is step ``num_warmup_steps``, the first step at the peak lr. It is left out when
    there is no warmup, and when the run ends before it (``num_warmup_steps >= num_steps``): no step of
    the run has the peak lr then, and the last step is no end of warmup.

    Example:
        >>> key_points(10, 2)
        [('start', 0), ('end of warmup', 2), ('middle', 5), ('last', 9)]
        >>> key_points(10, 10)
        [('start', 0), ('middle', 5), ('last', 9)]
    """
    check_int("num_steps", num_steps, low=1)
    check_int("num_warmup_steps", num_warmup_steps, low=0)
    candidates = [
        ("start", 0),
        ("end of warmup", num_warmup_steps),
        ("middle", num_steps // 2),
        ("last", num_steps - 1),
    ]
    seen: set[int] = set()
    out: list[tuple[str, int]] = []
    for label, step in candidates:
        if label == "end of warmup" and not 0 < num_warmup_steps < num_steps:
            continue
        if step not in seen:
            seen.add(step)
            out.append((label, step))
    return sorted(out, key=lambda item: item[1])


def format_key_points(
    values: Sequence[float] | Mapping[int, float], num_warmup_steps: int = 0, *, num_steps: int | None = None
) -> str:
    """``"end of warmup (step 10)   lr = 5.000000e-05"``-style lines for :func:`key_points` of one curve.

    ``values`` is the lr at every step, or a mapping ``{step: lr}`` of a sampled run of ``num_steps``
    steps that holds the key steps (:func:`optsched.schedules.sampling.sample_steps` of them does).

    Raises:
        ValueError: a mapping without ``num_steps``.
        KeyError: a mapping without one of the key steps.
    """
    if isinstance(values, Mapping) and num_steps is None:
        raise ValueError("num_steps is required with a mapping of sampled lrs; accepted: the run's step count.")
    total = len(values) if num_steps is None else num_steps
    return "\n".join(
        f"{label + ' (step ' + str(step) + ')':<26} lr = {values[step]:.6e}"
        for label, step in key_points(total, num_warmup_steps)
    )


def png_path(path: str | Path, field: str = "png") -> Path:
    """The file :func:`save_png` writes for ``path``: the name as given when it ends in ``.png``, else
    with ``.png`` added when it has no suffix (as matplotlib does); ``field`` names it in errors.

    Example:
        >>> str(png_path("lr")), str(png_path("lr.PNG"))
        ('lr.png', 'lr.PNG')

    Raises:
        ValueError: an empty name, a folder (an existing one or a name ending in ``/``), or a suffix
            other than ``.png`` (the file is always a PNG).
        FileNotFoundError: the folder it would go into does not exist.
    """
    text = os.fspath(path)
    example = "e.g. lr.png"
    if not text:
        raise ValueError(f"{field}='': an empty file name; accepted: a PNG file name, {example}.")
    if text.endswith((os.sep, os.altsep or os.sep)) or os.path.isdir(text):
        raise ValueError(
            f"{field}={text!r} is a folder; accepted: a PNG file name, e.g. {os.path.join(text, 'lr.png')}."
        )
    out = Path(text)
    if out.suffix.lower() not in ("", ".png"):
        raise ValueError(
            f"{field}={text!r} ends in {out.suffix!r}, but the file is a PNG; accepted: a name ending in .png "
            "(a name without a suffix gets .png added)."
        )
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    if not os.path.isdir(out.parent):  # os.path's answer is False, not an OSError, for a bad path
        raise FileNotFoundError(f"{field}={text!r}: the folder {str(out.parent)!r} does not exist.")
    return out


def save_png(
    series: Mapping[str, Sequence[float]] | Sequence[float],
    path: str | Path,
    title: str = "",
    *,
    num_warmup_steps: int | None = None,
    steps: Sequence[int] | None = None,
) -> Path:
    """Write the curves to a PNG with matplotlib (non-interactive backend); returns the path written,
    which is :func:`png_path` of ``path`` (``"lr"`` writes ``lr.png``).

    ``steps`` gives the step of each value of sampled curves, as for :func:`ascii_chart` (default
    ``0, 1, ...``); the line is drawn through the sampled points.

    ``num_warmup_steps`` draws a dotted "end of warmup" line at that step, only where the run reaches it
    (``0 < num_warmup_steps < len(curve)``, as :func:`key_points`): a warmup longer than the run has no
    end of warmup in it, and its line would stretch the x axis past the last step.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'optsched[plot]'``).
        ValueError, FileNotFoundError: ``path`` is refused by :func:`png_path`.
        OSError: the file cannot be written (no permission, read-only file system, disk full, ...).
    """
    curves = _as_series(series)
    if steps is not None:
        steps = _check_steps(steps, curves)
    path = png_path(path)
    num_steps = max(len(values) for values in curves.values()) if steps is None else steps[-1] + 1
    if not (num_warmup_steps and 0 < num_warmup_steps < num_steps):
        num_warmup_steps = None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_package("matplotlib", "plot", "Writing a PNG of the schedule") from None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for label, values in curves.items():
            ax.plot(range(len(values)) if steps is None else steps, values, label=label)
        if num_warmup_steps:
            ax.axvline(num_warmup_steps, color="gray", linestyle=":", linewidth=1, label="end of warmup")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if len(curves) > 1 or num_warmup_steps:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
