"""Run every benchmark question and write ``BENCHMARKS.md``.

Run: ``python -m benchmarks [--quick] [--only 1 2 3 4 5] [--output BENCHMARKS.md] [--threads 1]``

Each question has its own function below; each prints ``name: ours X, reference Y, ratio Z`` lines as
it goes and returns :class:`benchmarks._machine.Row` s, from which the report is written:

1. building the optimizer (``benchmarks.build_optimizer``);
2. optimizer step throughput and the memory roofline (``benchmarks.optimizer_step``, and
   ``benchmarks.adafactor_step`` for transformers' default Adafactor configuration);
3. Trainer overhead (``benchmarks.trainer_overhead``);
4. checkpoint save / load / size (``benchmarks.checkpoint_io``; the load of a resume in a new process,
   ``benchmarks.resume_process``);
5. growth of 1 and 2 with the model size (``benchmarks.growth``, also writes ``benchmarks/growth.png``).

The scripts of questions 1, 3 and the Adafactor script print their figures; their lines are read back
(:func:`parse_lines`). A question that raises is reported as failed in the output (with the error)
and the command exits with status 1 after writing the report.

``--quick`` runs every question at tiny sizes (seconds each): it checks that the scripts still run,
its figures mean nothing. Timings use one torch thread by default (``--threads``): on a shared
machine a parallel region waits for its slowest thread, which multiplies the noise.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks._machine import (
    MiB,
    Row,
    describe_machine,
    freeze_heap,
    in_new_process,
    measure_bandwidth,
    measure_matmul_flops,
)
from benchmarks._report import captured, kept_analysis, machine_and_targets
from benchmarks._report import table as _table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "BENCHMARKS.md"

_LINE = re.compile(
    r"^(?P<name>[^:\n]+): ours (?P<ours>[-+.\deE]+|nan|inf) ?(?P<unit>[a-zA-Z/]+)?, "
    r"reference (?P<ref>[-+.\deE]+|nan|inf) ?[a-zA-Z/]*, ratio (?P<ratio>[-+.\deE]+|nan|inf)"
)


def parse_lines(text: str, question: int) -> list[Row]:
    """Rows from ``name: ours X unit, reference Y unit, ratio Z`` lines (other lines are ignored)."""
    rows = []
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match:
            ref = float(match["ref"])
            rows.append(Row(question, match["name"].strip(), match["unit"] or "", float(match["ours"]),
                            None if math.isnan(ref) else ref, "", None, float(match["ratio"])))
    return rows


# ---- the questions --------------------------------------------------------------------------------


def question_1(quick: bool) -> list[Row]:
    """Building the optimizer at 2k / 10k / 40k tensors (``benchmarks.build_optimizer``)."""
    from benchmarks import build_optimizer

    argv = ["--sizes", "200", "400", "--rounds", "2"] if quick else []
    _, text = captured(lambda: build_optimizer.main(argv))
    rows = parse_lines(text, 1)
    for row in rows:
        row.reference_name = "transformers Trainer.create_optimizer"
        if row.name.startswith("create_optimizer 40k"):
            row.target, row.met = "ours < 0.2 s at 40k", row.ours < 0.2
    return rows


def question_2(quick: bool) -> list[Row]:
    """Optimizer step throughput and roofline (``benchmarks.optimizer_step``, ``benchmarks.adafactor_step``)."""
    from benchmarks import optimizer_step

    rows = optimizer_step.run(quick)
    if not quick:  # adafactor_step has no small size; quick mode covers Adafactor in optimizer_step
        # transformers' Adafactor allocates four matrix-sized temporaries per matrix per step: its speed
        # follows glibc's allocator (fresh pages or reused ones, benchmarks._allocator), so it is timed
        # as glibc leaves it, then with freed memory reused (its best case), then inside a training loop
        # (forward, backward, step, zero_grad), where a user meets it; ours allocates none. Each in a new
        # process: glibc as a training process starts, and no pin carried from one to the next.
        # Then the same with fused=True (optsched.optim.adafactor_fused) where a C++ compiler is present.
        runs = [["--memory", "default"], ["--memory", "reused"], ["--loop"]]
        from optsched.optim.adafactor_fused import missing_build_tool

        if missing_build_tool() is None:
            runs += [["--memory", "reused", "--fused"], ["--loop", "--fused"]]
        # Also on every core (torch's default thread count, what a user's loop gets): the eager step
        # spreads its GEMM over the threads (optim.adafactor._weighted_column_sums), MKL's GEMVs did not.
        all_cores = os.cpu_count() or 1
        if all_cores > torch.get_num_threads():
            runs.append(["--memory", "reused", "--threads", str(all_cores)])
        for extra in runs:
            argv = ["--rounds", "5", "--config", "default", "trainer", "--threads", str(torch.get_num_threads()),
                    *extra]  # a later --threads wins
            text = in_new_process("adafactor_step", argv)
            threads = f", {extra[extra.index('--threads') + 1]} threads" if "--threads" in extra else ""
            for row in parse_lines(text, 2):
                row.name = f"{row.name}{threads} [adafactor_step.py, 50.4M]"
                row.reference_name = "transformers Adafactor"
                row.target, row.met = "ratio >= 2", row.ratio >= 2.0
                rows.append(row)
    return rows


def question_3(quick: bool) -> list[Row]:
    """Trainer steps per second vs a hand-written loop and transformers (``benchmarks.trainer_overhead``)."""
    from benchmarks import trainer_overhead

    argv = ["--steps", "10", "--rounds", "1", "--threads", str(torch.get_num_threads())] if quick else [
        "--threads", str(torch.get_num_threads())]
    rate, _ = captured(lambda: trainer_overhead.main(argv))
    ours, hand = rate["optsched"], rate["hand"]
    rows = [Row(3, "Trainer steps/s vs hand-written loop", "steps/s", ours, hand, "hand-written loop", None,
                ours / hand, "ratio >= 0.90", ours / hand >= 0.90)]
    if "transformers" in rate:
        rows.append(Row(3, "Trainer steps/s vs transformers Trainer", "steps/s", ours, rate["transformers"],
                        "transformers Trainer", None, ours / rate["transformers"], "", None,
                        f"transformers / hand loop = {rate['transformers'] / hand:.2f}"))
    return rows


#: Where question 4 also runs in RAM, and the free bytes it needs there (a checkpoint per side, x3).
RAM_DIR = Path("/dev/shm")
RAM_NEEDED = 3 << 30


def question_4(quick: bool) -> list[Row]:
    """Checkpoint save / load time and size (``benchmarks.checkpoint_io``): in the temp dir (a disk's
    page cache, where saves are bound by the kernel's writeback), then a resume's load in new processes
    (``benchmarks.resume_process``), then in RAM (tmpfs: what the software costs, without the disk)
    where there is room."""
    from benchmarks import checkpoint_io, resume_process

    rows = checkpoint_io.run(quick)
    rows += resume_process.run(quick)  # the load as a resume pays it: once, in a new process
    if RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK) and shutil.disk_usage(RAM_DIR).free >= RAM_NEEDED:
        rows += [r for r in checkpoint_io.run(quick, directory=str(RAM_DIR))
                 if not r.name.startswith("checkpoint size")]  # the bytes are the same wherever they are
    return rows


def question_5(quick: bool, plot_path: Path | None) -> list[Row]:
    """Growth of 1 and 2 with the model size (``benchmarks.growth``)."""
    from benchmarks import growth

    return growth.run(quick, plot_path=plot_path)


# ---- the report -----------------------------------------------------------------------------------

TITLES = {
    1: "1. Building the optimizer (grouping + construction)",
    2: "2. Optimizer step throughput (50M parameters, fp32, CPU)",
    3: "3. Trainer overhead",
    4: "4. Checkpoints (50M parameters + AdamW state)",
    5: "5. Growth with the model size",
}


def render_report(machine: dict[str, str], rows: list[Row], failures: dict[int, str], *, quick: bool,
                  seconds: float, argv: list[str], analysis: str = "") -> str:
    """The text of ``BENCHMARKS.md``; ``analysis`` (see :func:`kept_analysis`) is appended unchanged."""
    from benchmarks.optimizer_step import TRAFFIC

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# optsched benchmarks",
        "",
        f"Written by `{' '.join(['python -m benchmarks', *argv])}` on {when}, in {seconds / 60:.1f} min."
        + (" **Quick mode: tiny sizes, the figures mean nothing.**" if quick else ""),
        "",
        "Every figure compares optsched with a reference measured **in the same process, alternating** "
        "(A B A B ..., medians over rounds; `benchmarks/_timing.py`). Ratios are reference / optsched for times "
        "and sizes (above 1: optsched is better) and optsched / reference for rates (steps/s). The machine is "
        "**shared and was noisy** during the run (other engineers ran test suites on the same 2 cores), so single "
        "figures can be off by tens of percent; the ratios, taken from interleaved rounds, are steadier than the "
        "absolute times.",
        "",
        "**CUDA figures** (fused AdamW against the GPU's bandwidth, bf16 autocast in the Trainer) come from "
        "another machine, a GPU lent to one session: [BENCHMARKS-cuda.md](BENCHMARKS-cuda.md), written by "
        "`python -m benchmarks.cuda`. Every figure below is this CPU machine's.",
        "",
        "## Reproduce",
        "",
        "```",
        ". .venv/bin/activate",
        "python -m benchmarks                  # everything, writes BENCHMARKS.md and benchmarks/growth.png",
        "python -m benchmarks --only 2 4       # some questions",
        "python -m benchmarks --quick          # tiny sizes: checks the scripts run (tests/test_benchmarks_smoke.py)",
        "python -m benchmarks.optimizer_step   # one question; also build_optimizer, adafactor_step,",
        "                                      # trainer_overhead, checkpoint_io, resume_process, growth",
        "python -m benchmarks.adafactor_step --memory reused   # the reference's best case (benchmarks/_allocator.py)",
        "python -m benchmarks.adafactor_step --loop           # the step inside a training loop (forward, backward, zero_grad)",
        "python -m benchmarks.adafactor_step --loop --fused   # the same with Adafactor(fused=True), the C++ kernel",
        "python -m benchmarks.resume_process --cold            # a resume from the disk (files dropped from the cache)",
        "```",
        "",
    ]
    lines += machine_and_targets(machine, rows)
    fastest = [(r.name.split(": ")[0], r.reference_name[len("fastest torch ("):-1]) for r in rows
               if r.reference_name.startswith("fastest torch (")]
    if fastest:
        lines += ["", "Fastest of torch's three AdamW kernels on this machine, by size: "
                  + "; ".join(f"{name}: **{kernel}**" for name, kernel in fastest)
                  + ". optsched's default runs torch's fused kernel on CPU (it resolves `adamw_torch_fused`)."]
    if failures:
        lines += ["", "## Failed", ""]
        lines += [f"- question {q}: `{err}`" for q, err in failures.items()]
    for q, title in TITLES.items():
        q_rows = [r for r in rows if r.question == q]
        if not q_rows and q not in failures:
            continue
        lines += ["", f"## {title}", ""]
        if q == 2:
            lines += [
                "Bytes each step must move (fp32, 4 bytes per value, `N` parameters; `limit` = bytes / bandwidth, "
                "the faster (median rate) of a copy and an in-place `a += b` on 256 MiB tensors run in the same "
                "rounds as the steps; `ratio` of the roofline row = limit / optsched median):",
                "",
                "| optimizer | bytes per step |",
                "|---|---|",
            ]
            lines += [f"| {name} | {t.formula} |" for name, t in TRAFFIC.items()]
            lines += ["", "Muon is compute-bound (Newton-Schulz matmuls, in bf16 in torch); its limit is its FLOPs / the "
                      "measured bf16 matmul rate.", ""]
        if q == 5:
            lines += ["![growth](benchmarks/growth.png)", "",
                      "Exponent `k` of a least-squares fit `t ~ n^k` over the sizes: 1 is linear, 2 quadratic.", ""]
        if q in failures:
            lines.append(f"Failed: `{failures[q]}`")
        lines += _table(q_rows)
    text = "\n".join(lines) + "\n"
    return text + ("\n" + analysis.rstrip("\n") + "\n" if analysis else "")


def machine_limits(quick: bool) -> dict[str, str]:
    """Bandwidth (best of copy / in-place update, with the threads in use and with all cores) and matmul rate."""
    threads = torch.get_num_threads()
    nbytes = 8 * MiB if quick else 256 * MiB
    limits = {f"memory bandwidth, {threads} thread(s)": f"{measure_bandwidth(nbytes) / 1e9:.2f} GB/s"}
    all_cores = os.cpu_count() or 1
    if all_cores != threads:
        torch.set_num_threads(all_cores)
        try:
            limits[f"memory bandwidth, {all_cores} threads"] = f"{measure_bandwidth(nbytes) / 1e9:.2f} GB/s"
        finally:
            torch.set_num_threads(threads)
    n = 128 if quick else 1024
    for dtype in (torch.float32, torch.bfloat16):
        rate = measure_matmul_flops(n, dtype=dtype)
        limits[f"{str(dtype)[6:]} matmul {n}x{n}, {threads} thread(s)"] = f"{rate / 1e9:.1f} GFLOP/s"
    return limits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the scripts run")
    parser.add_argument("--only", type=int, nargs="+", choices=sorted(TITLES), default=sorted(TITLES))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="report path (default BENCHMARKS.md)")
    parser.add_argument("--plot", type=Path, default=None, help="growth plot (default benchmarks/growth.png)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parser.parse_args(argv)
    if opts.threads < 1:
        parser.error(f"--threads={opts.threads} must be >= 1")
    torch.set_num_threads(opts.threads)

    start = time.perf_counter()
    freeze_heap()
    machine = describe_machine()
    machine.update(machine_limits(opts.quick))
    print("\n".join(f"{k}: {v}" for k, v in machine.items()), flush=True)

    from benchmarks.growth import DEFAULT_PLOT

    plot_path = opts.plot or DEFAULT_PLOT
    questions: dict[int, Callable[[], list[Row]]] = {
        1: lambda: question_1(opts.quick),
        2: lambda: question_2(opts.quick),
        3: lambda: question_3(opts.quick),
        4: lambda: question_4(opts.quick),
        5: lambda: question_5(opts.quick, plot_path),
    }
    rows: list[Row] = []
    failures: dict[int, str] = {}
    # Question 4 pins glibc's allocator in this process (benchmarks._allocator), and a pin lasts: it runs
    # last, so that no other question is measured in the regime it leaves. The report keeps 1-5's order.
    for q in sorted(opts.only, key=lambda q: q == 4):
        print(f"\n== question {TITLES[q]} ==", flush=True)
        try:
            rows += questions[q]()
        except Exception as exc:  # reported in BENCHMARKS.md and by the exit status, never hidden
            traceback.print_exc()
            failures[q] = f"{type(exc).__name__}: {exc}"
        torch.set_num_threads(opts.threads)  # a script may have changed it
    rows.sort(key=lambda row: row.question)  # stable: each question's rows keep their order
    report = render_report(machine, rows, failures, quick=opts.quick, seconds=time.perf_counter() - start,
                           argv=argv, analysis=kept_analysis(opts.output))
    opts.output.write_text(report, encoding="utf-8")
    print(f"\nwrote {opts.output}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
