"""What ``BENCHMARKS.md`` and ``BENCHMARKS-cuda.md`` share: the scripts' output shown and captured, the
hand-written analysis kept across rewrites, and the markdown table of :class:`benchmarks._machine.Row` s."""

from __future__ import annotations

import contextlib
import io
import math
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks._machine import Row, quiet

__all__ = ["ANALYSIS_MARKER", "captured", "kept_analysis", "machine_and_targets", "table"]


class _Tee(io.TextIOBase):
    """Write to the real stdout and keep a copy (the scripts' lines are both shown and parsed)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.buffer_ = io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.buffer_.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def getvalue(self) -> str:
        return self.buffer_.getvalue()


def captured(fn: Callable[[], object]) -> tuple[object, str]:
    """Call ``fn`` with stdout shown and captured; return its result and the text."""
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee), quiet():  # the scripts silence logging globally: restored after
        result = fn()
    return result, tee.getvalue()


ANALYSIS_MARKER = "<!-- analysis: everything below this line is kept when python -m benchmarks rewrites the file -->"


def kept_analysis(path: Path) -> str:
    """The hand-written part of an existing report: from :data:`ANALYSIS_MARKER` to the end, or ``""``."""
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8")
    at = text.find(ANALYSIS_MARKER)
    return text[at:] if at >= 0 else ""


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.4g}"
    return f"{text} {unit}".strip() if unit else text


def _met(met: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: ""}[met]


def table(rows: list[Row], notes: bool = True) -> list[str]:
    head = "| figure | optsched | reference | limit | ratio | target | |"
    out = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = _fmt(r.reference, r.unit) + (f" ({r.reference_name})" if r.reference_name and r.reference is not None else "")
        out.append(f"| {r.name} | {_fmt(r.ours, r.unit)} | {ref} | {_fmt(r.limit, r.unit)} | {_fmt(r.ratio)} | "
                   f"{r.target} | {_met(r.met)} |")
    if notes:
        noted = [r for r in rows if r.note]
        if noted:
            out.append("")
            out += [f"- *{r.name}*: {r.note}" for r in noted]
    return out


def machine_and_targets(machine: dict[str, str], rows: list[Row]) -> list[str]:
    """A report's ``## Machine`` table, then ``## Targets``: the rows that have one."""
    lines = ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    lines += ["", "## Targets", ""]
    targeted = [r for r in rows if r.target]
    return lines + (table(targeted, notes=False) if targeted else ["(no target figure was measured)"])
