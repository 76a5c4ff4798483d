"""Question 2: how fast is one optimizer step on a 50M-parameter fp32 model, against torch and the memory roofline?

The model is 12 transformer-like blocks (Linear 1024x1024, 1024x1536, 1536x1024 with biases, two
LayerNorms): 50.4M parameters in 120 tensors, 99.8% of them in matrices. Gradients are fixed random
tensors (no backward pass is timed). optsched's optimizers are built the way a user builds them,
``create_optimizer(model, TrainingArguments(optim=...))``; the references are built directly.

Each step of a memory-bound optimizer must at least read and write every tensor it updates once.
With ``N_m`` parameters in matrices, ``N_v`` in vectors and 4 bytes per fp32 value:

====================  ============================================  =====================
optimizer             each element: reads + writes                  bytes per step
====================  ============================================  =====================
AdamW                 read p, g, m, v; write p, m, v                28 (N_m + N_v)
SGD, momentum         read p, g, buf; write p, buf                  20 (N_m + N_v)
Adafactor (factored)  matrices: read g twice (row/col statistics,   16 N_m + 20 N_v
                      then the update), read p, write p; vectors:
                      read p, g, v; write p, v
Muon                  matrices: read p, g, buf; write p, buf        20 N_m + 28 N_v
                      (+ Newton-Schulz: compute-bound, below);
                      vectors: AdamW
====================  ============================================  =====================

``roofline time = bytes / bandwidth``, where the bandwidth is measured by two streaming kernels on
256 MiB tensors, a copy and an in-place ``a += b`` (``benchmarks._machine.bandwidth_kernels``; the
copy under-states it by the uncounted write-allocate reads), run *interleaved with the optimizer
steps* (so they see the same machine load, round by round); the faster kernel's median rate is the
limit, and ``fraction of roofline = roofline time / median step time``.

Muon's five Newton-Schulz iterations on an ``m x n`` matrix (``m <= n``) cost ``5 (4 m^2 n + 2 m^3)``
FLOPs, about 1.4 TFLOP per step here: it is compute-bound, so its limit is those FLOPs divided by the
measured matmul rate in bf16, the precision torch's Newton-Schulz runs in
(``benchmarks._machine.measure_matmul_flops``).

Contestants (ours, the references, the bandwidth kernels) each run once per round, in a fresh random
order every round, in one process; medians over rounds. Prints ``name: ours X ms, reference Y ms, ratio Z`` (ratio = reference / ours, > 1: ours faster).

On a GPU (``--device cuda``, run by ``benchmarks.cuda``) the steps and the bandwidth kernels are timed
with CUDA events (``benchmarks._timing.CudaTimer``) and Muon's limit is the GPU's bf16 matmul rate.

Run: ``python -m benchmarks.optimizer_step [--quick] [--rounds 15] [--params 50e6] [--device cuda]``
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks._machine import MiB, Row, bandwidth_kernels, measure_matmul_flops, quiet
from benchmarks._timing import round_robin, timer_for

__all__ = [
    "TRAFFIC",
    "StepModel",
    "Traffic",
    "adamw_contestants",
    "build_model",
    "muon_flops",
    "run",
    "step_bytes",
    "main",
]

BLOCK_PARAMS = 1024 * 1024 + 2 * 1024 * 1536 + 1024 + 1536 + 1024 + 4 * 1024  # hidden 1024, inner 1536


class Block(nn.Module):
    """Three Linear layers and two LayerNorms: the matrix/vector mix of a transformer block."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.attn = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)


class StepModel(nn.Module):
    """``blocks`` :class:`Block` s; never run forward (the benchmark only steps optimizers)."""

    def __init__(self, blocks: int, hidden: int = 1024, inner: int = 1536) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden, inner) for _ in range(blocks))


def build_model(num_params: float, *, seed: int = 0, device: str | torch.device = "cpu") -> StepModel:
    """A :class:`StepModel` of about ``num_params`` parameters on ``device``, with a fixed random gradient on each.

    Sizes of 4.2M and more use blocks of hidden 1024 / inner 1536 (``round(num_params / 4.19M)`` of
    them); smaller sizes (the quick mode) shrink the width instead, keeping two blocks.
    """
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it lives: 800M parameters initialise in seconds on a GPU
        if num_params >= BLOCK_PARAMS:
            model = StepModel(max(1, round(num_params / BLOCK_PARAMS)))
        else:
            hidden = max(8, int((num_params / 8) ** 0.5))  # 2 blocks of ~4 hidden^2 (h^2 + 2 * 1.5 h^2)
            model = StepModel(2, hidden, hidden * 3 // 2)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


@dataclass(frozen=True)
class Traffic:
    """Bytes one step moves per parameter, for parameters in matrices and in vectors."""

    formula: str
    matrix: int
    vector: int


TRAFFIC: dict[str, Traffic] = {
    "adamw": Traffic("28 N (read p,g,m,v; write p,m,v; fp32)", 28, 28),
    "sgd": Traffic("20 N (read p,g,buf; write p,buf)", 20, 20),
    "adafactor": Traffic("16 N_matrix + 20 N_vector (g read twice, p read+write; vectors: p,g,v read, p,v write)", 16, 20),
    "muon": Traffic("20 N_matrix + 28 N_vector (Muon: p,g,buf read, p,buf write; vectors AdamW)", 20, 28),
}


def step_bytes(kind: str, model: nn.Module) -> int:
    """Bytes one step of optimizer ``kind`` (a :data:`TRAFFIC` key) must read + write for ``model``."""
    traffic = TRAFFIC[kind]
    total = 0
    for p in model.parameters():
        total += p.numel() * (traffic.matrix if p.ndim >= 2 else traffic.vector)
    return total


def muon_flops(model: nn.Module, ns_steps: int = 5) -> int:
    """FLOPs of Muon's Newton-Schulz iterations: ``ns_steps * (4 m^2 n + 2 m^3)`` per ``m x n`` matrix, m <= n."""
    flops = 0
    for p in model.parameters():
        if p.ndim == 2:
            m, n = sorted(p.shape)
            flops += ns_steps * (4 * m * m * n + 2 * m**3)
    return flops


def _args(**kwargs):
    from optsched import TrainingArguments

    return TrainingArguments(output_dir="unused", **kwargs)


def ours_optimizer(model: nn.Module, **training_args) -> torch.optim.Optimizer:
    """``optsched.optim.create_optimizer(model, TrainingArguments(**training_args))``."""
    from optsched.optim import create_optimizer

    return create_optimizer(model, _args(**training_args))


def adamw_contestants(model: nn.Module) -> dict[str, torch.optim.Optimizer]:
    """optsched's default optimizer and torch's three AdamW implementations with the same settings."""
    ours = ours_optimizer(model)
    group = ours.param_groups[0]
    settings = {"lr": group["lr"], "betas": group["betas"], "eps": group["eps"], "weight_decay": 0.0}
    params = [p for g in ours.param_groups for p in g["params"]]
    return {
        "optsched default": ours,
        "torch for-loop": torch.optim.AdamW(params, foreach=False, **settings),
        "torch foreach": torch.optim.AdamW(params, foreach=True, **settings),
        "torch fused": torch.optim.AdamW(params, fused=True, **settings),
    }


def kernel_of(optimizer: torch.optim.Optimizer) -> str:
    """Which of torch's AdamW implementations ``optimizer`` runs (``fused``, ``foreach`` or ``for-loop``)."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    if group.get("foreach"):
        return "foreach"
    if group.get("foreach") is None and group["params"] and group["params"][0].is_cuda:
        return "foreach (torch default on CUDA)"
    return "for-loop"


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def _line(name: str, ours_ms: float, ref_ms: float) -> None:
    print(f"{name}: ours {ours_ms:.4g} ms, reference {ref_ms:.4g} ms, ratio {ref_ms / ours_ms:.3g}", flush=True)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _round_robin_with_kernels(contestants: dict[str, Callable[[], object]], model: nn.Module, *, rounds: int,
                              nbytes: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """:func:`round_robin` of ``contestants`` and the bandwidth kernels (as ``bw:copy`` ...) on ``model``'s
    device, timed by that device's timer; returns the times and each kernel's bytes moved."""
    device = _device(model)
    moved = {}
    for name, (fn, nb) in bandwidth_kernels(nbytes, device).items():
        contestants[f"bw:{name}"] = fn
        moved[f"bw:{name}"] = nb
    return round_robin(contestants, rounds=rounds, timer=timer_for(device)), moved


def _bandwidth(times: dict[str, list[float]], moved: dict[str, int]) -> tuple[float, str]:
    """The best kernel's median rate over the rounds (the statistic the steps get), and a note with
    every kernel's median and fastest-round rate."""
    rates = {name: nb / statistics.median(times[name]) for name, nb in moved.items()}
    peaks = {name: nb / min(times[name]) for name, nb in moved.items()}
    note = ", ".join(f"{name[3:]} {rates[name] / 1e9:.2f} GB/s (best round {peaks[name] / 1e9:.2f})" for name in rates)
    return max(rates.values()), note


def bench_adamw(model: nn.Module, *, rounds: int, copy_bytes: int, label: str) -> tuple[list[Row], dict]:
    """optsched's default vs torch's for-loop / foreach / fused AdamW, with the bandwidth kernels in the rotation."""
    opts = adamw_contestants(model)
    contestants: dict[str, Callable[[], object]] = {name: opt.step for name, opt in opts.items()}
    times, moved = _round_robin_with_kernels(contestants, model, rounds=rounds, nbytes=copy_bytes)
    bandwidth, bw_note = _bandwidth(times, moved)
    need = step_bytes("adamw", model)
    limit_ms = need / bandwidth * 1e3
    ours_ms = _median_ms(times["optsched default"])
    kernel = kernel_of(opts["optsched default"])
    rows = []
    for ref in ("torch for-loop", "torch foreach", "torch fused"):
        ref_ms = _median_ms(times[ref])
        _line(f"AdamW step {label} (optsched default [{kernel}] vs {ref})", ours_ms, ref_ms)
        rows.append(Row(2, f"AdamW step {label}: optsched default ({kernel}) vs {ref}", "ms", ours_ms, ref_ms,
                        f"{ref} AdamW", limit_ms, ref_ms / ours_ms, "ratio >= 0.95", ref_ms / ours_ms >= 0.95,
                        "same kernel as optsched's: the difference is noise" if kernel == ref.split()[-1] else ""))
    fraction = limit_ms / ours_ms
    on_cpu = _device(model).type == "cpu"  # the 70% target is the CPU's; on a GPU the fraction is reported
    print(f"AdamW step {label} roofline: {need / 1e6:.0f} MB moved, bandwidth {bandwidth / 1e9:.2f} GB/s, "
          f"limit {limit_ms:.4g} ms, ours {ours_ms:.4g} ms, fraction {fraction:.2f}", flush=True)
    best_ref = min(("torch for-loop", "torch foreach", "torch fused"), key=lambda r: _median_ms(times[r]))
    rows.append(Row(2, f"AdamW step {label}: fraction of the memory roofline", "ms", ours_ms,
                    _median_ms(times[best_ref]), f"fastest torch ({best_ref})", limit_ms, fraction,
                    "fraction >= 0.70 (CPU)" if on_cpu else "", fraction >= 0.70 if on_cpu else None,
                    f"{TRAFFIC['adamw'].formula} = {need / 1e6:.0f} MB; bandwidth {bw_note} (best used)"))
    medians = {name: _median_ms(ts) for name, ts in times.items() if not name.startswith("bw:")}
    return rows, {"bandwidth": bandwidth, "medians_ms": medians, "limit_ms": limit_ms, "kernel": kernel}


def bench_sgd(model: nn.Module, *, rounds: int, copy_bytes: int, label: str) -> tuple[list[Row], dict]:
    """optsched's ``optim="sgd"`` with momentum 0.9 vs torch's SGD for-loop and foreach."""
    ours = ours_optimizer(model, optim="sgd", optim_args="momentum=0.9")
    params = [p for g in ours.param_groups for p in g["params"]]
    lr = ours.param_groups[0]["lr"]
    contestants: dict[str, Callable[[], object]] = {
        "optsched sgd": ours.step,
        "torch for-loop": torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=False).step,
        "torch foreach": torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True).step,
    }
    times, moved = _round_robin_with_kernels(contestants, model, rounds=rounds, nbytes=copy_bytes)
    bandwidth, _ = _bandwidth(times, moved)
    need = step_bytes("sgd", model)
    limit_ms = need / bandwidth * 1e3
    ours_ms = _median_ms(times["optsched sgd"])
    rows = []
    for ref in ("torch for-loop", "torch foreach"):
        ref_ms = _median_ms(times[ref])
        _line(f"SGD-momentum step {label} (optsched vs {ref})", ours_ms, ref_ms)
        rows.append(Row(2, f"SGD momentum step {label}: optsched vs {ref}", "ms", ours_ms, ref_ms, f"{ref} SGD",
                        limit_ms, ref_ms / ours_ms, "", None,
                        f"roofline fraction {limit_ms / ours_ms:.2f}; {TRAFFIC['sgd'].formula}"))
    return rows, {"bandwidth": bandwidth, "limit_ms": limit_ms, "ours_ms": ours_ms}


def bench_adafactor(model: nn.Module, *, rounds: int, copy_bytes: int, label: str) -> tuple[list[Row], dict]:
    """optsched's ``optim="adafactor"`` vs transformers' Adafactor with the kwargs its Trainer passes."""
    from transformers.optimization import Adafactor as HFAdafactor

    ours = ours_optimizer(model, optim="adafactor")
    params = [p for g in ours.param_groups for p in g["params"]]
    lr = ours.param_groups[0]["lr"]
    reference = HFAdafactor(params, lr=lr, scale_parameter=False, relative_step=False)
    contestants: dict[str, Callable[[], object]] = {"ours": ours.step, "reference": reference.step}
    times, moved = _round_robin_with_kernels(contestants, model, rounds=rounds, nbytes=copy_bytes)
    bandwidth, _ = _bandwidth(times, moved)
    need = step_bytes("adafactor", model)
    limit_ms = need / bandwidth * 1e3
    ours_ms, ref_ms = _median_ms(times["ours"]), _median_ms(times["reference"])
    _line(f"Adafactor step {label} (optsched native vs transformers)", ours_ms, ref_ms)
    ratio = ref_ms / ours_ms
    row = Row(2, f"Adafactor step {label}: optsched native vs transformers", "ms", ours_ms, ref_ms,
              "transformers Adafactor", limit_ms, ratio, "ratio >= 2", ratio >= 2.0,
              f"roofline fraction {limit_ms / ours_ms:.2f}; {TRAFFIC['adafactor'].formula}")
    return [row], {"bandwidth": bandwidth, "limit_ms": limit_ms, "ours_ms": ours_ms, "ref_ms": ref_ms}


def _muon_available() -> bool:
    from optsched.optim import list_optimizers

    return "muon" in list_optimizers()


def bench_muon(model: nn.Module, *, rounds: int, label: str, matmul_n: int) -> tuple[list[Row], dict]:
    """optsched's ``optim="muon"`` (Muon on hidden matrices, AdamW on the rest); compute-bound limit."""
    if not _muon_available():
        print("Muon: optsched.optim.muon is not available; skipped")
        return [], {}
    ours = ours_optimizer(model, optim="muon")
    # torch's Newton-Schulz runs in bfloat16 (``grad.bfloat16()``): its limit is the bf16 matmul rate.
    device = _device(model)
    flop_rate = measure_matmul_flops(matmul_n, rounds=3, dtype=torch.bfloat16, device=device)
    # no warm-up on the CPU (about a minute per step on 2 cores); on a GPU one, for the kernels' first-call set-up
    times = round_robin({"muon": ours.step}, rounds=rounds, warmup=int(device.type != "cpu"), timer=timer_for(device))
    ours_ms = _median_ms(times["muon"])
    flop_rate = max(flop_rate, measure_matmul_flops(matmul_n, rounds=3, dtype=torch.bfloat16, device=device))
    flops = muon_flops(model)
    limit_ms = flops / flop_rate * 1e3
    print(f"Muon step {label}: ours {ours_ms:.4g} ms, compute limit {limit_ms:.4g} ms "
          f"({flops / 1e9:.0f} GFLOP at {flop_rate / 1e9:.1f} GFLOP/s bf16 matmul), fraction {limit_ms / ours_ms:.2f}",
          flush=True)
    row = Row(2, f"Muon step {label}: optsched (Newton-Schulz, compute-bound)", "ms", ours_ms, None, "",
              limit_ms, limit_ms / ours_ms, "", None,
              f"limit = {flops / 1e9:.0f} GFLOP / {flop_rate / 1e9:.1f} GFLOP/s measured bf16 matmul (torch's "
              "Newton-Schulz runs in bf16); "
              f"memory part {TRAFFIC['muon'].formula} = {step_bytes('muon', model) / 1e6:.0f} MB; {rounds} round(s)")
    return [row], {"ours_ms": ours_ms, "limit_ms": limit_ms}


def _run(quick: bool = False, *, num_params: float | None = None, rounds: int | None = None,
        muon: bool = True, device: str = "cpu") -> list[Row]:
    """Question 2 at one model size; returns the report rows.

    Args:
        quick: tiny sizes (200k parameters, 2 rounds, 8 MiB bandwidth kernels): for the smoke test.
        num_params: model size (default 50M, quick 200k).
        rounds: timed rounds (default 15, quick 2).
        muon: also time Muon (about a minute per step at 50M on a 2-core CPU).
        device: where the model, its gradients and the bandwidth kernels live (``"cuda"``: 1 GiB kernels,
            far above a GPU's L2, and Muon timed over as many rounds as the others).
    """
    num_params = num_params or (2e5 if quick else 50e6)
    rounds = rounds or (2 if quick else 15)
    on_gpu = torch.device(device).type != "cpu"
    copy_bytes = 8 * MiB if quick else (1024 if on_gpu else 256) * MiB
    model = build_model(num_params, device=device)
    n = sum(p.numel() for p in model.parameters())
    n_matrix = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    label = f"{n / 1e6:.1f}M"
    print(f"model: {n / 1e6:.2f}M parameters ({n_matrix / n:.1%} in matrices) in "
          f"{len(list(model.parameters()))} tensors, fp32; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {device}", flush=True)
    rows: list[Row] = []
    rows += bench_adamw(model, rounds=rounds, copy_bytes=copy_bytes, label=label)[0]
    rows += bench_sgd(model, rounds=rounds, copy_bytes=copy_bytes, label=label)[0]
    rows += bench_adafactor(model, rounds=rounds, copy_bytes=copy_bytes, label=label)[0]
    if muon:
        muon_rounds = 2 if quick else (rounds if on_gpu else 1)
        rows += bench_muon(model, rounds=muon_rounds, label=label, matmul_n=128 if quick else 1024)[0]
    return rows


def run(quick: bool = False, *, num_params: float | None = None, rounds: int | None = None,
        muon: bool = True, device: str = "cpu") -> list[Row]:
    """Question 2 (see :func:`_run`), with log records and warnings silenced while it runs."""
    with quiet():
        return _run(quick, num_params=num_params, rounds=rounds, muon=muon, device=device)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--params", type=float, default=None, help="model parameters (default 50e6)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-muon", action="store_true", help="skip Muon (compute-bound, slow on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    opts = parser.parse_args(argv)
    return run(opts.quick, num_params=opts.params, rounds=opts.rounds, muon=not opts.no_muon, device=opts.device)


if __name__ == "__main__":
    main()
