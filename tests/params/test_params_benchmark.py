"""benchmarks/_timing.py (shared by every benchmark) and a smoke run of benchmarks/build_optimizer.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks._timing import Comparison, compare, report  # noqa: E402


def test_compare_alternates_and_takes_medians(monkeypatch):
    calls: list[str] = []
    clock = iter([0.0, 1.0, 1.0, 4.0, 4.0, 7.0, 7.0, 9.0, 9.0, 10.0, 10.0, 20.0, 20.0, 23.0])
    monkeypatch.setattr("benchmarks._timing.time.perf_counter", lambda: next(clock))
    result = compare(lambda: calls.append("a"), lambda: calls.append("b"), rounds=3, warmup=1,
                     reference_rounds=4)
    assert calls == ["a", "b"] + ["a", "b"] * 3 + ["b"]  # warm-up, alternating rounds, the extra b
    assert result.ours_all == [1.0, 3.0, 1.0] and result.reference_all == [3.0, 2.0, 10.0, 3.0]
    assert result.ours == 1.0 and result.reference == 3.0 and result.ratio == 3.0


def test_compare_without_reference():
    result = compare(lambda: None, None, rounds=2, warmup=0)
    assert len(result.ours_all) == 2 and result.reference_all == []
    assert result.reference != result.reference  # nan


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"warmup": -1}, {"reference_rounds": 0}])
def test_compare_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError, match="accepted: rounds >= 1"):
        compare(lambda: None, lambda: None, **kwargs)


def test_report_line_format(capsys):
    line = report("groups 2k", Comparison(ours=0.01, reference=0.05))
    assert line == "groups 2k: ours 0.01 s, reference 0.05 s, ratio 5"
    assert capsys.readouterr().out == line + "\n"


def test_build_optimizer_benchmark_runs(capsys):
    pytest.importorskip("transformers")
    from benchmarks import build_optimizer

    build_optimizer.main(["--sizes", "64", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "groups+AdamW 64: ours " in out and "groups only 64: ours " in out
