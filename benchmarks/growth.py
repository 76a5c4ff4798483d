"""Question 5: how do questions 1 and 2 grow from small to large models?

* **Building the optimizer** (question 1) at 1k, 2k, 5k, 10k, 20k and 40k parameter tensors
  (``benchmarks.build_optimizer.block_model``: Linear 4x4 + LayerNorm 4 blocks): optsched
  ``create_optimizer(model, TrainingArguments(optim="adamw_torch", weight_decay=0.01))`` vs
  transformers ``Trainer.create_optimizer`` with the same arguments. transformers is quadratic in the
  tensor count (a list membership test per tensor), so it runs only up to 20k here, once at 20k;
  question 1 times it at 40k.
* **One AdamW step** (question 2) at 5M, 10M, 20M and 50M parameters (``optimizer_step.build_model``):
  optsched's default against torch's for-loop / foreach / fused, with the bandwidth kernels in the
  same rotation for the roofline; and once on 10k small tensors (64x64, 41M parameters) to see
  whether the fused kernel also wins where the per-tensor overhead dominates.

Growth is summarised by the exponent ``k`` of a least-squares fit ``t = c * n^k`` over the sizes
(``k = 1``: linear, ``k = 2``: quadratic); fixed per-call overheads pull ``k`` below 1 at the small end.
Writes ``benchmarks/growth.png`` (or ``--plot PATH``): build time and step time against size, on
linear axes with the fitted line, and on log-log axes against transformers.

Run: ``python -m benchmarks.growth [--quick] [--plot benchmarks/growth.png]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks._machine import MiB, Row, quiet
from benchmarks._timing import time_once

__all__ = ["DEFAULT_PLOT", "fit_exponent", "main", "run"]

DEFAULT_PLOT = Path(__file__).resolve().parent / "growth.png"
TENSORS = (1000, 2000, 5000, 10000, 20000, 40000)
TENSORS_REFERENCE_MAX = 20000
PARAMS = (5e6, 10e6, 20e6, 50e6)
MANY_TENSORS = (10000, 64 * 64)  # count x numel: does the fused kernel still win with many small tensors?
LINEAR_EXPONENT = 1.2  # above this, growth is called super-linear


def fit_exponent(sizes: list[float], times: list[float]) -> float:
    """Least-squares slope of ``log t`` against ``log n``: the ``k`` in ``t ~ n^k``.

    Raises:
        ValueError: fewer than two sizes, sizes and times of different lengths, or a value <= 0.
    """
    if len(sizes) != len(times) or len(sizes) < 2 or min(sizes) <= 0 or min(times) <= 0:
        raise ValueError(f"sizes={sizes!r}, times={times!r}; accepted: two or more positive pairs.")
    xs = [math.log(s) for s in sizes]
    ys = [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        raise ValueError(f"sizes={sizes!r} are all equal; accepted: two or more different sizes.")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def _label(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1000:
        return f"{n / 1000:.3g}k"
    return str(int(n))


def build_growth(sizes: tuple[int, ...], rounds: int, reference_max: int) -> tuple[list[Row], dict]:
    """Time ``create_optimizer`` (ours) and ``Trainer.create_optimizer`` (transformers) at each size."""
    import transformers

    from benchmarks.build_optimizer import block_model
    from optsched import TrainingArguments
    from optsched.optim import create_optimizer

    transformers.logging.set_verbosity_error()
    rows: list[Row] = []
    data: dict[str, list[float]] = {"n": [], "ours": [], "ref_n": [], "ref": []}
    with tempfile.TemporaryDirectory() as tmp:
        ours_args = TrainingArguments(output_dir=tmp, optim="adamw_torch", weight_decay=0.01)
        ref_args = transformers.TrainingArguments(output_dir=tmp, report_to="none", optim="adamw_torch",
                                                  weight_decay=0.01)
        for size in sizes:
            model = block_model(size)
            create_optimizer(model, ours_args)  # warm-up
            ours = statistics.median(time_once(lambda: create_optimizer(model, ours_args)) for _ in range(rounds))
            ref = None
            if size <= reference_max:
                with contextlib.redirect_stdout(io.StringIO()):
                    trainer = transformers.Trainer(model=model, args=ref_args)

                def reference() -> None:
                    trainer.optimizer = None
                    trainer.create_optimizer()

                ref_rounds = 1 if size >= 20000 else rounds
                ref = statistics.median(time_once(reference) for _ in range(ref_rounds))
                data["ref_n"].append(size)
                data["ref"].append(ref)
                del trainer
            data["n"].append(size)
            data["ours"].append(ours)
            ratio = ref / ours if ref is not None else None
            print(f"create_optimizer {_label(size)} tensors: ours {ours:.4g} s, reference "
                  + (f"{ref:.4g} s, ratio {ratio:.3g}" if ref is not None else "not run (quadratic)"), flush=True)
            rows.append(Row(5, f"create_optimizer, {_label(size)} tensors", "s", ours, ref,
                            "transformers Trainer.create_optimizer" if ref is not None else "", None, ratio, "", None,
                            f"{ours / size * 1e6:.2f} us per tensor (ours)"
                            + (f", {ref / size * 1e6:.1f} us per tensor (reference)" if ref is not None else "")))
    k = fit_exponent(data["n"], data["ours"])
    k_ref = fit_exponent(data["ref_n"], data["ref"]) if len(data["ref_n"]) >= 2 else float("nan")
    print(f"create_optimizer growth exponent: ours {k:.2f}, transformers {k_ref:.2f}", flush=True)
    rows.append(Row(5, f"create_optimizer growth {_label(sizes[0])}..{_label(sizes[-1])} tensors: exponent k "
                       "(t ~ n^k)", "", k, k_ref, "transformers", None, None,
                    f"ours linear (k <= {LINEAR_EXPONENT})", k <= LINEAR_EXPONENT))
    return rows, data


def many_tensors_model(count: int, numel: int, *, seed: int = 0) -> torch.nn.Module:
    """``count`` square-ish matrices of ``numel`` values each (plus their gradients): per-tensor overhead."""
    torch.manual_seed(seed)
    side = max(1, int(numel**0.5))
    model = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(side, numel // side)) for _ in range(count))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def _many_tensors_row(count: int, numel: int, *, rounds: int, copy_bytes: int) -> Row:
    from benchmarks.optimizer_step import bench_adamw

    model = many_tensors_model(count, numel)
    with contextlib.redirect_stdout(io.StringIO()):
        _, info = bench_adamw(model, rounds=rounds, copy_bytes=copy_bytes, label="")
    med = info["medians_ms"]
    ours = med["optsched default"]
    fastest = min((k for k in med if k != "optsched default"), key=med.get)
    line = ", ".join(f"{k} {v:.4g} ms" for k, v in med.items())
    label = f"{_label(count)} tensors x {numel}"
    print(f"AdamW step {label}: ours {ours:.4g} ms, reference {med[fastest]:.4g} ms ({fastest}), "
          f"ratio {med[fastest] / ours:.3g}; {line}", flush=True)
    return Row(5, f"AdamW step, {label} values ({_label(count * numel)} parameters)", "ms", ours, med[fastest],
               f"fastest torch ({fastest})", info["limit_ms"], med[fastest] / ours, "", None,
               f"{line}; roofline fraction {info['limit_ms'] / ours:.2f}")


def step_growth(sizes: tuple[float, ...], rounds: int, copy_bytes: int,
                many: tuple[int, int] | None = None) -> tuple[list[Row], dict]:
    """Time one AdamW step (ours and torch's three) at each size, each in its own rotation with the
    bandwidth kernels; with ``many = (count, numel)`` also on ``count`` small tensors."""
    from benchmarks.optimizer_step import bench_adamw, build_model

    rows: list[Row] = []
    data: dict[str, list[float]] = {"n": [], "limit": []}
    for size in sizes:
        model = build_model(size)
        n = sum(p.numel() for p in model.parameters())
        with contextlib.redirect_stdout(io.StringIO()):
            _, info = bench_adamw(model, rounds=rounds, copy_bytes=copy_bytes, label=_label(n))
        del model
        med = info["medians_ms"]
        data["n"].append(n)
        data["limit"].append(info["limit_ms"])
        for name, ms in med.items():
            data.setdefault(name, []).append(ms)
        ours = med["optsched default"]
        fastest = min((k for k in med if k != "optsched default"), key=med.get)
        line = ", ".join(f"{k} {v:.4g} ms" for k, v in med.items())
        print(f"AdamW step {_label(n)}: ours {ours:.4g} ms, reference {med[fastest]:.4g} ms ({fastest}), "
              f"ratio {med[fastest] / ours:.3g}; {line}; roofline {info['limit_ms']:.4g} ms", flush=True)
        rows.append(Row(5, f"AdamW step, {_label(n)} parameters", "ms", ours, med[fastest], f"fastest torch ({fastest})",
                        info["limit_ms"], med[fastest] / ours, "", None,
                        f"{line}; roofline fraction {info['limit_ms'] / ours:.2f} at "
                        f"{info['bandwidth'] / 1e9:.2f} GB/s"))
    k = fit_exponent(data["n"], data["optsched default"])
    print(f"AdamW step growth exponent: ours {k:.2f}", flush=True)
    if many is not None:
        rows.append(_many_tensors_row(*many, rounds=rounds, copy_bytes=copy_bytes))
    rows.append(Row(5, f"AdamW step growth {_label(data['n'][0])}..{_label(data['n'][-1])} parameters: exponent k",
                    "", k, None, "", None, None, f"linear (k <= {LINEAR_EXPONENT})", k <= LINEAR_EXPONENT))
    return rows, data


def plot(build: dict, step: dict, path: str | os.PathLike) -> Path:
    """Three panels: build time vs tensors (linear axes), the same on log-log axes against transformers,
    AdamW step time vs parameters (linear axes) with the memory roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    n, t = build["n"], build["ours"]
    slope = sum(a * b for a, b in zip(n, t)) / sum(a * a for a in n)  # least squares through 0
    ax.plot(n, [x * 1e3 for x in t], "o", label="optsched create_optimizer")
    ax.plot([0, max(n)], [0, slope * max(n) * 1e3], "--", color="gray", label="linear fit t = c n")
    ax.set(xlabel="parameter tensors", ylabel="ms", title="Building the optimizer (optsched)")
    ax.legend()
    ax = axes[1]
    ax.loglog(n, t, "o-", label=f"optsched (k={fit_exponent(n, t):.2f})")
    if len(build["ref_n"]) >= 2:
        ax.loglog(build["ref_n"], build["ref"], "s-",
                  label=f"transformers (k={fit_exponent(build['ref_n'], build['ref']):.2f})")
    ax.set(xlabel="parameter tensors", ylabel="seconds", title="Building the optimizer: t ~ n^k")
    ax.legend()
    ax = axes[2]
    m = [x / 1e6 for x in step["n"]]
    for name, marker in (("optsched default", "o-"), ("torch fused", "^--"), ("torch foreach", "s--"),
                         ("torch for-loop", "x--")):
        if name in step:
            ax.plot(m, step[name], marker, label=name)
    ax.plot(m, step["limit"], ":", color="black", label="memory roofline (measured bandwidth)")
    ax.set(xlabel="parameters (millions)", ylabel="ms per step", title="One AdamW step (fp32, CPU)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _run(quick: bool = False, *, plot_path: str | os.PathLike | None = DEFAULT_PLOT,
        rounds: int | None = None) -> list[Row]:
    """Question 5; returns the report rows and writes the plot (``plot_path=None``: no plot).

    Args:
        quick: tensor counts 100..400 and parameter counts 50k..200k, 2 rounds (smoke test).
        plot_path: where the PNG goes.
        rounds: timed rounds per size (default 5).
    """
    if quick:
        tensors, params, copy_bytes, many = (100, 200, 400), (5e4, 2e5), 8 * MiB, (50, 64)
    else:
        tensors, params, copy_bytes, many = TENSORS, PARAMS, 256 * MiB, MANY_TENSORS
    build_rows, build = build_growth(tensors, rounds or (2 if quick else 5), TENSORS_REFERENCE_MAX)
    step_rows, step = step_growth(params, rounds or (2 if quick else 5), copy_bytes, many)
    if plot_path is not None:
        print(f"plot: {plot(build, step, plot_path)}", flush=True)
    return build_rows + step_rows


def run(quick: bool = False, *, plot_path: str | os.PathLike | None = DEFAULT_PLOT,
        rounds: int | None = None) -> list[Row]:
    """Question 5 (see :func:`_run`), with log records and warnings silenced while it runs."""
    with quiet():
        return _run(quick, plot_path=plot_path, rounds=rounds)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="PNG path ('' for none)")
    parser.add_argument("--rounds", type=int, default=None)
    opts = parser.parse_args(argv)
    return run(opts.quick, plot_path=opts.plot or None, rounds=opts.rounds)


if __name__ == "__main__":
    main()
