"""Questions 2 and 3 on a CUDA GPU, written to ``BENCHMARKS-cuda.md`` (``BENCHMARKS.md`` is the CPU's).

Run on a machine with a GPU::

    python -m benchmarks.cuda                 # writes BENCHMARKS-cuda.md
    python -m benchmarks.cuda --quick --device cpu   # tiny sizes on the CPU: checks the script runs

What it measures, every time with CUDA events, the kernels queued behind a spin kernel so that the host's
launches overlap them (``benchmarks._timing.CudaTimer``), contestants interleaved in a fresh random order
each round, medians over rounds:

* the GPU's limits: memory bandwidth (a device-to-device copy and an in-place ``a += b`` on 1 GiB
  tensors, bytes read + written), bf16 and fp32 matmul rates (random data, 8192^3 and 1024^3);
* question 2 at the issue's size (50.4M fp32 parameters, ``benchmarks.optimizer_step``): optsched's
  default AdamW against torch's for-loop / foreach / fused AdamW and against the bandwidth (the fraction
  of the roofline), SGD with momentum, Adafactor against transformers', Muon against the bf16 matmul
  rate. A 50M step moves 1.4 GB, about half a millisecond at 3 TB/s, where launches and the tail of
  each kernel weigh; AdamW alone is timed again at about 200M and 800M parameters, where they do not;
* question 3 (``benchmarks.trainer_overhead``): optimizer steps per second of optsched's Trainer, a
  hand-written loop and transformers' Trainer training the demo model on the GPU, in fp32 and under
  bf16 autocast (``bf16=True``; ``torch.autocast`` in the hand loop); optsched's Trainer also without its
  non-finite guard, and the kernels launched and waits for the GPU per step of it and of the hand loop.
"""

from __future__ import annotations

import argparse
import gc
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
    measure_bandwidth,
    measure_matmul_flops,
    quiet,
)
from benchmarks._report import captured, kept_analysis, machine_and_targets, table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "BENCHMARKS-cuda.md"
#: AdamW alone at these sizes besides the issue's 50M (blocks of 4.19M: 48 and 192 of them).
LARGER_SIZES = (200e6, 800e6)


def describe_gpu(device: str) -> dict[str, str]:
    """The machine (``describe_machine``) and, on a GPU, its name, memory, multiprocessors, compute capability
    and the CUDA version torch was built with."""
    machine = describe_machine()
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine["GPU"] = (f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, "
                          f"compute capability {props.major}.{props.minor}")
        machine["CUDA (torch built with)"] = str(torch.version.cuda)
    return machine


def gpu_limits(device: str, quick: bool) -> dict[str, str]:
    """Bandwidth (the better of copy and in-place update, fastest of 20 rounds) and matmul rates (fastest of 10)."""
    nbytes = 8 * MiB if quick else 1024 * MiB
    limits = {f"memory bandwidth ({nbytes // MiB} MiB copy / a += b)":
              f"{measure_bandwidth(nbytes, rounds=20, device=device) / 1e9:.0f} GB/s"}
    for n in (128,) if quick else (8192, 1024):
        for dtype in (torch.bfloat16, torch.float32):
            rate = measure_matmul_flops(n, rounds=10, dtype=dtype, device=device)
            limits[f"{str(dtype)[6:]} matmul {n}x{n}x{n}"] = f"{rate / 1e12:.1f} TFLOP/s"
    return limits


def question_2(device: str, quick: bool, rounds: int) -> list[Row]:
    """``benchmarks.optimizer_step`` on ``device`` at 50M."""
    from benchmarks import optimizer_step

    return optimizer_step.run(quick, rounds=rounds, device=device)


def question_2_larger(device: str, quick: bool, rounds: int) -> list[Row]:
    """AdamW alone at :data:`LARGER_SIZES` (none in quick mode)."""
    from benchmarks import optimizer_step

    rows: list[Row] = []
    if not quick:
        for size in LARGER_SIZES:
            gc.collect()
            torch.cuda.empty_cache()
            model = optimizer_step.build_model(size, device=device)
            label = f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M"
            with quiet():
                rows += optimizer_step.bench_adamw(model, rounds=rounds, copy_bytes=1024 * MiB, label=label)[0]
            del model
    return rows


def question_3(device: str, quick: bool) -> list[Row]:
    """``benchmarks.trainer_overhead`` on ``device``, fp32 then bf16 autocast (9 rounds: its first GPU run, 5
    rounds, was bimodal), with optsched's Trainer also timed without its non-finite guard and the per-step
    counts of launches and waits for the GPU (``--without-guard --sync-profile``)."""
    from benchmarks import trainer_overhead

    rows = []
    for bf16 in (False, True):
        size = ["--steps", "10", "--rounds", "1"] if quick else ["--steps", "200", "--rounds", "9" if bf16 else "5"]
        argv = ["--device", device, *(["--bf16"] if bf16 else []), *size, "--without-guard", "--sync-profile"]
        rate, text = captured(lambda argv=argv: trainer_overhead.main(argv))
        ours, hand = rate["optsched"], rate["hand"]
        mode = "bf16 autocast" if bf16 else "fp32"
        counts = "; ".join(line.strip() for line in str(text).splitlines() if line.endswith(" per step"))
        rows.append(Row(3, f"Trainer steps/s vs hand-written loop ({mode})", "steps/s", ours, hand,
                        "hand-written loop", None, ours / hand, "ratio >= 0.90", ours / hand >= 0.90, counts))
        unguarded = rate["optsched without guard"]
        rows.append(Row(3, f"Trainer without its non-finite guard vs hand-written loop ({mode})", "steps/s",
                        unguarded, hand, "hand-written loop", None, unguarded / hand, "", None,
                        "a diagnostic: what the guard's read-back each step costs"))
        if "transformers" in rate:
            rows.append(Row(3, f"Trainer steps/s vs transformers Trainer ({mode})", "steps/s", ours,
                            rate["transformers"], "transformers Trainer", None, ours / rate["transformers"], "", None,
                            f"transformers / hand loop = {rate['transformers'] / hand:.2f}"))
    return rows


def render(machine: dict[str, str], rows: list[Row], failures: dict[int, str], *, quick: bool, seconds: float,
           argv: list[str], analysis: str = "") -> str:
    """The text of ``BENCHMARKS-cuda.md``; ``analysis`` (``_report.kept_analysis``) is appended unchanged."""
    from benchmarks.optimizer_step import TRAFFIC

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# optsched benchmarks on a CUDA GPU",
        "",
        f"Written by `{' '.join(['python -m benchmarks.cuda', *argv])}` on {when}, in {seconds / 60:.1f} min, on "
        f"**{machine.get('GPU', 'no GPU')}**." + (" **Quick mode: tiny sizes, the figures mean nothing.**" if quick else ""),
        "",
        "These figures come from a GPU machine lent to one session (table below), not from the 2-core CPU machine "
        "of [BENCHMARKS.md](BENCHMARKS.md). Times are CUDA-event spans of each call, its kernels queued behind a "
        "spin kernel so that the host's launches overlap the GPU's work as in a training loop (where the host is "
        "the slower, its time is the span: `benchmarks._timing.CudaTimer`); contestants interleaved in a fresh "
        "random order each round, medians over rounds. The Trainer's figures are wall-clock `train()` times.",
        "",
        "## Reproduce",
        "",
        "```",
        "python -m benchmarks.cuda                      # on a machine with a CUDA GPU: writes BENCHMARKS-cuda.md",
        "python -m benchmarks.optimizer_step --device cuda",
        "python -m benchmarks.trainer_overhead --device cuda --bf16 --without-guard --sync-profile",
        "```",
        "",
    ]
    lines += machine_and_targets(machine, rows)
    if failures:
        lines += ["", "## Failed", ""]
        lines += [f"- question {q}: `{err}`" for q, err in failures.items()]
    titles = {2: "2. Optimizer step throughput (fp32, on the GPU)", 3: "3. Trainer overhead (on the GPU)"}
    for q, title in titles.items():
        lines += ["", f"## {title}", ""]
        if q == 2:
            lines += ["Bytes each step must move: " + "; ".join(f"{name} {t.formula}" for name, t in TRAFFIC.items())
                      + ". `limit` = bytes / the bandwidth measured in the same rounds (the faster kernel's median); "
                      "the roofline row's ratio = limit / optsched's median. Muon's limit: its Newton-Schulz FLOPs / "
                      "the bf16 matmul rate at 1024^3.", ""]
        if q in failures:
            lines.append(f"Failed: `{failures[q]}`")
        lines += table([r for r in rows if r.question == q])
    text = "\n".join(lines) + "\n"
    return text + ("\n" + analysis.rstrip("\n") + "\n" if analysis else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to check the script runs")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of question 2 (default 15, quick 2)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="report path (default BENCHMARKS-cuda.md)")
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parser.parse_args(argv)
    if torch.device(opts.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    start = time.perf_counter()
    freeze_heap()
    machine = describe_gpu(opts.device)
    machine.update(gpu_limits(opts.device, opts.quick))
    print("\n".join(f"{k}: {v}" for k, v in machine.items()), flush=True)
    rounds = opts.rounds or (2 if opts.quick else 15)
    # The larger AdamW sizes last: the figures come first. The report is rewritten after each part,
    # so a run cut short (a lent machine's time limit) still leaves what it measured.
    parts: list[tuple[int, Callable[[], list[Row]]]] = [
        (2, lambda: question_2(opts.device, opts.quick, rounds)),
        (3, lambda: question_3(opts.device, opts.quick)),
        (2, lambda: question_2_larger(opts.device, opts.quick, rounds)),
    ]
    rows: list[Row] = []
    failures: dict[int, str] = {}
    analysis = kept_analysis(opts.output)
    for q, run in parts:
        print(f"\n== question {q} on {opts.device} ==", flush=True)
        try:
            rows += run()
        except Exception as exc:  # reported in the file and by the exit status, never hidden
            traceback.print_exc()
            failures[q] = f"{type(exc).__name__}: {exc}"
        ordered = sorted(rows, key=lambda row: row.question)  # stable: each question's rows keep their order
        opts.output.write_text(render(machine, ordered, failures, quick=opts.quick,
                                      seconds=time.perf_counter() - start, argv=argv, analysis=analysis),
                               encoding="utf-8")
    print(f"\nwrote {opts.output}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
