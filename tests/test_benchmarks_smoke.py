"""The benchmark suite still runs (tiny ``--quick`` sizes) and its arithmetic is right.

No timing is asserted: the machine is shared, and the figures belong in BENCHMARKS.md, not in tests.
What is asserted: the byte and FLOP formulas (reference tables), the growth exponent fit (exact on
power laws, a hypothesis property), the line parser against the scripts' own output format, the
report's structure, and that every question's script runs end to end and returns well-formed rows.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from benchmarks import __main__ as runner  # noqa: E402
from benchmarks import (  # noqa: E402
    _machine,
    _report,
    _timing,
    adafactor_step,
    checkpoint_io,
    cuda,
    growth,
    optimizer_step,
    resume_process,
)
from benchmarks._machine import Row  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    # time_once() collects garbage before every call; with transformers loaded that walks ~370k
    # objects. Freezing them (as `python -m benchmarks` does) keeps the quick runs quick.
    import gc

    import transformers.trainer  # noqa: F401

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()



# ---- formulas ---------------------------------------------------------------------------------------

# nn.Linear(4, 3): a 3x4 matrix (12 values) and a bias of 3.
STEP_BYTES = {
    "adamw": 28 * 15,
    "sgd": 20 * 15,
    "adafactor": 16 * 12 + 20 * 3,
    "muon": 20 * 12 + 28 * 3,
}


@pytest.mark.parametrize("kind", sorted(optimizer_step.TRAFFIC))
def test_step_bytes_reference_table(kind):
    assert optimizer_step.step_bytes(kind, nn.Linear(4, 3)) == STEP_BYTES[kind]


def test_every_traffic_entry_has_a_reference_value():
    assert set(optimizer_step.TRAFFIC) == set(STEP_BYTES)


def test_muon_flops_reference_value():
    # weight 8x4 -> m=4, n=8: 5 * (4*4*4*8 + 2*4**3) = 3200; the bias is not a matrix.
    assert optimizer_step.muon_flops(nn.Linear(4, 8)) == 3200
    assert optimizer_step.muon_flops(nn.Linear(4, 8), ns_steps=1) == 640


@pytest.mark.parametrize("num_params", [5e4, 2e5, 4.2e6])
def test_build_model_size_and_gradients(num_params):
    model = optimizer_step.build_model(num_params)
    n = sum(p.numel() for p in model.parameters())
    assert 0.5 * num_params <= n <= 1.5 * num_params
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert any(p.ndim == 1 for p in model.parameters()) and any(p.ndim == 2 for p in model.parameters())


def test_build_model_50m_block_count():
    assert round(50e6 / optimizer_step.BLOCK_PARAMS) == 12
    assert optimizer_step.BLOCK_PARAMS == sum(p.numel() for p in optimizer_step.Block(1024, 1536).parameters())


@pytest.mark.parametrize(
    "kwargs, kernel",
    [({"fused": True}, "fused"), ({"foreach": True}, "foreach"), ({"foreach": False}, "for-loop")],
)
def test_kernel_of(kwargs, kernel):
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), **kwargs)
    assert optimizer_step.kernel_of(opt) == kernel


def test_default_optimizer_runs_the_fused_kernel_on_cpu():
    # fused is the fastest of torch's three AdamW kernels on CPU (BENCHMARKS.md, question 2); it is the
    # default from torch 2.8 on, as in transformers.
    from optsched.arguments import DEFAULT_OPTIM

    kernel = optimizer_step.kernel_of(optimizer_step.ours_optimizer(nn.Linear(4, 4)))
    assert (kernel == "fused") == (DEFAULT_OPTIM == "adamw_torch_fused")


def test_adafactor_make_model_has_model_shapes():
    shapes = adafactor_step.model_shapes(blocks=2, hidden=8, inner=12)
    model = adafactor_step.make_model(shapes)
    assert sorted(tuple(p.shape) for p in model.parameters()) == sorted(shapes)
    with pytest.raises(ValueError, match="blocks of 8"):
        adafactor_step.make_model(shapes[:-1])


def test_adafactor_compare_in_loop_times_each_side_and_frees_gradients():
    from transformers.optimization import Adafactor as HFAdafactor

    from optsched.optim.adafactor import Adafactor

    shapes = adafactor_step.model_shapes(blocks=1, hidden=8, inner=12)
    models = (adafactor_step.make_model(shapes), adafactor_step.make_model(shapes))
    models[1].load_state_dict(models[0].state_dict())
    before = [p.detach().clone() for p in models[0].parameters()]
    ours, reference = Adafactor(models[0].parameters()), HFAdafactor(models[1].parameters())
    result = adafactor_step.compare_in_loop(ours, reference, models, torch.randn(4, 8), rounds=3, warmup=1)
    assert len(result.ours_all) == len(result.reference_all) == 3
    assert result.ours > 0 and result.reference > 0
    # Both trained the same model through 4 steps: changed weights, the same up to rounding (the two
    # implementations round differently, and the gradients then differ slightly: 4e-6 seen, updates ~1e-3).
    for p, q, p0 in zip(models[0].parameters(), models[1].parameters(), before):
        assert p.grad is None and q.grad is None
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)


def test_round_robin_runs_each_once_per_round_in_varying_order():
    calls: list[str] = []
    times = _timing.round_robin({name: (lambda n=name: calls.append(n)) for name in "abcd"},
                                rounds=8, warmup=1)
    assert "".join(calls[:4]) == "abcd"  # the warm-up, in the given order
    rounds = ["".join(calls[i:i + 4]) for i in range(4, len(calls), 4)]
    assert len(rounds) == 8 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({r[0] for r in rounds}) > 1 and len(set(rounds)) > 1  # neither the first nor the order is fixed
    assert {k: len(v) for k, v in times.items()} == {k: 8 for k in "abcd"}


# ---- growth fit -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0])
def test_fit_exponent_exact_on_power_laws(k):
    sizes = [1000, 2000, 5000, 10000, 40000]
    assert growth.fit_exponent(sizes, [3e-6 * n**k for n in sizes]) == pytest.approx(k)


@settings(max_examples=30, deadline=None)
@given(k=st.floats(0.1, 3.0), c=st.floats(1e-9, 1e3),
       sizes=st.lists(st.integers(1, 10**6), min_size=2, max_size=6, unique=True))
def test_fit_exponent_recovers_any_power_law(k, c, sizes):
    assert growth.fit_exponent(sizes, [c * n**k for n in sizes]) == pytest.approx(k, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("sizes, times", [([1], [1.0]), ([1, 2], [1.0]), ([0, 2], [1.0, 2.0]),
                                          ([2, 2], [1.0, 2.0]), ([1, 2], [1.0, -1.0])])
def test_fit_exponent_rejects_bad_input(sizes, times):
    with pytest.raises(ValueError, match="accepted"):
        growth.fit_exponent(sizes, times)


# ---- machine ----------------------------------------------------------------------------------------


def test_machine_description_and_limits():
    machine = _machine.describe_machine()
    assert {"CPU", "cores (os.cpu_count)", "memory", "torch", "GPU"} <= set(machine)
    assert torch.__version__ in machine["torch"]
    assert _machine.measure_bandwidth(1 << 20, rounds=2) > 0
    kernels = _machine.bandwidth_kernels(1 << 20)
    assert {name: nb for name, (_, nb) in kernels.items()} == {"copy": 2 << 20, "update": 3 << 20}
    assert _machine.measure_matmul_flops(32, rounds=2) > 0


def test_quiet_restores_logging_and_warnings():
    import logging
    import warnings

    import transformers

    before = (logging.root.manager.disable, transformers.logging.get_verbosity())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _machine.quiet():
            logging.disable(logging.CRITICAL)  # what the scripts do, globally
            transformers.logging.set_verbosity_error()
            warnings.warn("hidden")
            assert logging.getLogger("optsched").isEnabledFor(logging.WARNING) is False
        warnings.warn("shown")
    assert [str(w.message) for w in caught] == ["shown"]
    assert (logging.root.manager.disable, transformers.logging.get_verbosity()) == before


@pytest.mark.parametrize("call", [lambda: _machine.measure_bandwidth(2), lambda: _machine.measure_bandwidth(64, 0),
                                  lambda: _machine.bandwidth_kernels(0),
                                  lambda: _machine.measure_matmul_flops(0)])
def test_machine_limits_reject_bad_sizes(call):
    with pytest.raises(ValueError, match="accepted"):
        call()


# ---- the runner: parsing and the report ---------------------------------------------------------------

SCRIPT_LINES = """\
model: 50.4M parameters in 96 tensors (fp32); torch 2.13.0, 1 threads
groups+AdamW 2k: ours 0.0123 s, reference 0.456 s, ratio 37.1
adafactor step (trainer): ours 120.3 ms, reference 400.1 ms, ratio 3.33
create_optimizer 40k: ours 0.1 s, reference nan s, ratio nan
trainer overhead: optsched 900 steps/s, hand loop 1000 steps/s, transformers 550 steps/s, ratio optsched/hand 0.90
"""


def test_parse_lines_reads_the_scripts_format():
    rows = runner.parse_lines(SCRIPT_LINES, 1)
    assert [(r.name, r.unit, r.ours, r.reference) for r in rows] == [
        ("groups+AdamW 2k", "s", 0.0123, 0.456),
        ("adafactor step (trainer)", "ms", 120.3, 400.1),
        ("create_optimizer 40k", "s", 0.1, None),
    ]
    assert rows[1].ratio == pytest.approx(3.33) and math.isnan(rows[2].ratio)
    assert all(r.question == 1 for r in rows)


def test_render_report_structure():
    rows = [
        Row(2, "AdamW step", "ms", 10.0, 11.0, "torch fused", 8.0, 1.1, "ratio >= 0.95", True, "28 N"),
        Row(4, "checkpoint save", "s", 2.0, 1.0, "transformers", None, 0.5, "no slower", False),
        Row(5, "growth", "k", 1.0),
    ]
    text = runner.render_report({"CPU": "test cpu"}, rows, {3: "RuntimeError: boom"}, quick=True, seconds=60,
                                argv=["--quick"])
    for piece in ("## Machine", "| CPU | test cpu |", "## Targets", "**met**", "**missed**", "BENCHMARKS-cuda.md",
                  "Quick mode", "RuntimeError: boom", "28 N (read p,g,m,v", "growth.png", "noisy"):
        assert piece in text
    targets = text.split("## Targets")[1].split("##")[0]
    assert "AdamW step" in targets and "checkpoint save" in targets and "| growth |" not in targets


def test_report_keeps_the_analysis_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    assert _report.kept_analysis(path) == ""
    analysis = _report.ANALYSIS_MARKER + "\n\n## Analysis\n\nwhy the figures are what they are\n"
    path.write_text("# old figures\n\n" + analysis)
    assert _report.kept_analysis(path) == analysis
    text = runner.render_report({}, [Row(4, "x", "s", 1.0)], {}, quick=False, seconds=1, argv=[],
                                analysis=_report.kept_analysis(path))
    assert text.endswith(analysis) and "# old figures" not in text


def test_report_names_the_fastest_kernel():
    rows = [Row(5, "AdamW step, 5M parameters", "ms", 2.0, 1.9, "fastest torch (torch fused)")]
    text = runner.render_report({}, rows, {}, quick=False, seconds=1, argv=[])
    assert "AdamW step, 5M parameters: **torch fused**" in text


# ---- each benchmark end to end at tiny sizes -----------------------------------------------------------


def _check_rows(rows: list[Row], question: int) -> None:
    assert rows, "a benchmark returned no figure"
    for row in rows:
        assert row.question == question
        assert math.isfinite(row.ours), row
        if "exponent" not in row.name:  # a fitted exponent may be <= 0 at tiny, noisy sizes
            assert row.ours > 0, row
        if row.reference is not None:
            assert row.reference > 0, row
        if row.target:
            assert row.met in (True, False), row


def test_optimizer_step_quick():
    rows = optimizer_step.run(quick=True, muon=True)
    _check_rows(rows, 2)
    names = " ".join(r.name for r in rows)
    for piece in ("for-loop", "foreach", "fused", "roofline", "SGD", "Adafactor", "Muon"):
        assert piece in names
    roofline = next(r for r in rows if "roofline" in r.name)
    assert roofline.ratio == pytest.approx(roofline.limit / roofline.ours)


def test_checkpoint_io_quick():
    rows = checkpoint_io.run(quick=True)
    _check_rows(rows, 4)
    # save; load, load (verification 'size') with fresh memory (targets), then with memory reused; bytes
    assert [r.unit for r in rows] == ["s", "s", "s", "s", "s", "MB"]
    assert "checkpoint_verification='size'" in rows[2].name and "checkpoint_verification='size'" in rows[4].name
    assert all("memory reused" in r.name and r.met is None and not r.target for r in rows[3:5])
    assert all(r.target for r in rows[:3])
    assert rows[5].met, rows[5].note  # bytes, unlike times, are exact: no larger than transformers' checkpoint


def test_resume_process_quick():
    rows = resume_process.run(quick=True)  # one load per side, each in a new Python process
    _check_rows(rows, 4)
    assert [r.unit for r in rows] == ["s", "s"] and "checkpoint_verification='size'" in rows[1].name
    assert all("new process" in r.name and r.reference > 0 and r.ours > 0 for r in rows)


def test_growth_quick_writes_the_plot(tmp_path):
    png = tmp_path / "growth.png"
    rows = growth.run(quick=True, plot_path=png)
    _check_rows(rows, 5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum("exponent" in r.name for r in rows) == 2
    assert any("50 tensors x 64" in r.name for r in rows)


def test_many_tensors_model():
    model = growth.many_tensors_model(5, 64)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(8, 8)] * 5
    assert all(p.grad is not None for p in model.parameters())


def test_runner_quick_writes_the_report(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    status = runner.main(["--quick", "--only", "1", "3", "--output", str(out), "--plot", str(tmp_path / "g.png")])
    assert status == 0
    text = out.read_text()
    assert "## 1. Building the optimizer" in text and "## 3. Trainer overhead" in text
    assert "Failed" not in text
    printed = capsys.readouterr().out
    assert "groups+AdamW" in printed and "trainer overhead:" in printed


def test_question_4_runs_last_and_the_report_keeps_the_order(tmp_path, monkeypatch):
    # Question 4 pins glibc's allocator for the rest of the process (benchmarks._allocator): it must run
    # after the others, while its rows stay in their place in the report.
    ran: list[int] = []

    def fake(q):
        def question(*_):
            ran.append(q)
            return [Row(q, f"figure {q}", "s", 1.0, 2.0, "ref", None, 2.0, "ratio >= 1", True)]
        return question

    for q in range(1, 6):
        monkeypatch.setattr(runner, f"question_{q}", fake(q))
    monkeypatch.setattr(runner, "machine_limits", lambda quick: {})
    out = tmp_path / "BENCHMARKS.md"
    assert runner.main(["--quick", "--output", str(out), "--plot", str(tmp_path / "g.png")]) == 0
    assert ran == [1, 2, 3, 5, 4]
    text = out.read_text()
    positions = [text.index(f"| figure {q} |") for q in range(1, 6)]
    assert positions == sorted(positions)


def test_cuda_script_runs_its_questions_and_writes_its_report(tmp_path, capsys):
    # On the CPU (--device cpu): the same code a GPU runs, minus the CUDA timer; the figures mean nothing.
    out = tmp_path / "BENCHMARKS-cuda.md"
    out.write_text("# old\n\n" + _report.ANALYSIS_MARKER + "\n\nkept\n")
    assert cuda.main(["--quick", "--device", "cpu", "--output", str(out)]) == 0
    text = out.read_text()
    for piece in ("# optsched benchmarks on a CUDA GPU", "## Machine", "## Targets", "AdamW step 0.2M: fraction",
                  "Muon step", "Trainer steps/s vs hand-written loop (fp32)",
                  "Trainer steps/s vs hand-written loop (bf16 autocast)", "Quick mode",
                  "Trainer without its non-finite guard vs hand-written loop (bf16 autocast)"):
        assert piece in text, piece
    note = next(line for line in text.splitlines() if line.startswith("- *Trainer steps/s vs hand-written loop (fp32)"))
    assert "hand loop:" in note and "ops per step" in note  # --sync-profile's counts
    assert "Failed" not in text and text.endswith("kept\n") and "# old" not in text
    roofline = next(line for line in text.splitlines() if "fraction of the memory roofline" in line)
    assert "(CPU)" in roofline  # the 70% target is the CPU's; a GPU's fraction is reported without one
    assert "bf16 autocast" in capsys.readouterr().out


def test_cuda_script_refuses_a_machine_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        cuda.main(["--quick"])
    assert "torch sees no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_timer_for_a_cpu_is_the_wall_clock(device):
    assert _timing.timer_for(device) is _timing.time_once


def test_cuda_timer_sizes_its_spin_once_from_an_idle_gpu(monkeypatch):
    # No GPU here: torch.cuda's events, synchronize and spin kernel are stand-ins. The timed function
    # waits as long as the spin before it (an optimizer that reads a value back inside step()): a spin
    # sized from that wait grew every call (seen on an H100: 20 ms to 14 s in 15 rounds).
    spins: list[int] = []

    class Event:
        def __init__(self, enable_timing=False):
            self.at = 0.0

        def record(self):
            self.at = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: spins.append(cycles))
    timer = _timing.CudaTimer()
    assert timer.cycles_per_second > 0
    spins.clear()
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.002 + (spins[-1] / timer.cycles_per_second if spins else 0.0) / 1000)

    seconds = [timer(step) for _ in range(5)]
    assert len(calls) == 6  # one extra call, on an idle GPU, measures the host time
    assert len(set(spins)) == 1  # sized once: no growth
    assert spins[0] == int((1.5 * timer.host[step] + 2e-4) * timer.cycles_per_second)
    assert all(s >= 0.002 for s in seconds)


def test_in_new_process_returns_the_output_and_raises_on_failure(capsys):
    text = runner.in_new_process("adafactor_step", ["--help"])
    assert "--loop" in text and "--loop" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match=r"(?s)adafactor_step --config nope exited with 2: .*invalid choice"):
        runner.in_new_process("adafactor_step", ["--config", "nope"])
