"""How long does one Adafactor step take on a 50M-parameter fp32 model on CPU, ours vs transformers'?

transformers' ``Adafactor.step`` loops over parameters in Python and, per matrix, makes about 21
passes over matrix-sized memory, mostly over four freshly allocated temporaries;
``optsched.optim.Adafactor`` reads the gradient twice and the parameter once or twice, writes the
parameter once, keeps its one temporary in a cache-resident workspace (``g**2``, reduced by a row sum
and one GEMM, then ``g`` times the column factor), and updates the vectors with
``torch._foreach_*``. The work is memory-bound, so the ratio follows the memory traffic.

The model is 12 blocks of three matrices (1024x1024, 1024x1536, 1536x1024) with their biases and
two LayerNorm-like vectors: 50.4M parameters, 96 tensors. Gradients are fixed random tensors shared by
both optimizers (neither modifies them). Steps alternate ours / reference (``benchmarks._timing``),
median over rounds.

Roofline: the bytes a step must move, divided by the memory bandwidth measured in the same run (the
faster median of a copy and an ``a += b`` kernel on 256 MiB tensors, ``benchmarks._machine``, timed
right after each configuration's steps). Per parameter in a matrix: ``g`` read twice (its statistics
are needed before any element is updated), ``p`` read and written: 16 bytes; per vector element:
``p``, ``g``, ``v`` read, ``p``, ``v`` written: 20 bytes; ``scale_parameter`` adds a read of ``p``
(its RMS, +4) and ``beta1`` the first moment (read and written, +8).

transformers' speed depends on glibc's allocator: its temporaries are either fresh pages from the
kernel, faulted in each step, or freed memory reused (``benchmarks._allocator``); glibc drifts between
the two by itself, which is why the reference took 125-160 ms in some runs and 73-83 ms in others.
``--memory reused`` pins its best case, ``--memory fresh`` its worst; ours allocates no temporaries
and takes the same time in all three.

``--loop`` times the step where a user meets it: inside a training loop. Each side has its own model
of the same shapes (``nn.Linear`` and ``nn.LayerNorm`` modules, same initial weights), and each round
runs a forward and backward pass (untimed), the step (timed) and ``zero_grad()``, which frees the
gradients as torch's default ``set_to_none=True`` does; the sides alternate round by round, so
glibc's allocator is in whatever state a real run leaves it.

``--fused`` runs ours with ``fused=True``: the C++ kernel of ``optsched.optim.adafactor_fused`` (one
pass over ``g`` and ``p`` for the statistics, one for the update; built on first use, untimed).

Run: ``python -m benchmarks.adafactor_step [--rounds 7] [--config default trainer] [--memory reused]
[--loop] [--fused] [--torch] [--threads N]``

Prints ``adafactor step[ (<config>)][, memory reused][, in a training loop][, fused=True]: ours X ms, reference Y ms, ratio Z`` (ratio > 1: ours is
faster) for each config, then ``  roofline: L ms (B MB at W GB/s), ours at F of it``. Configs:
``default`` (relative_step, scale_parameter: transformers' defaults) and
``trainer`` (``relative_step=False, scale_parameter=False, lr=1e-3``: what transformers' Trainer
builds for ``optim="adafactor"``); ``beta1+wd`` (on request) adds a first moment and weight decay.
``--torch`` also times ``torch.optim.Adafactor`` (different
semantics: for information only).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from typing import Any

import torch

from benchmarks._allocator import REGIMES, large_allocations
from benchmarks._machine import bandwidth_kernels
from benchmarks._timing import Comparison, compare, time_once
from optsched.optim.adafactor import Adafactor

CONFIGS = {
    "default": {},
    "trainer": {"relative_step": False, "scale_parameter": False, "lr": 1e-3},
    "beta1+wd": {
        "relative_step": False, "scale_parameter": False, "lr": 1e-3, "beta1": 0.9, "weight_decay": 0.01,
    },
}


def model_shapes(blocks: int = 12, hidden: int = 1024, inner: int = 1536) -> list[tuple[int, ...]]:
    """Shapes of a transformer-like stack: per block three matrices, their biases, two norm vectors."""
    shapes: list[tuple[int, ...]] = []
    for _ in range(blocks):
        shapes += [(hidden, hidden), (inner, hidden), (hidden, inner)]
        shapes += [(hidden,), (inner,), (hidden,), (hidden,), (hidden,)]
    return shapes


def step_bytes(shapes: list[tuple[int, ...]], kwargs: dict) -> int:
    """Bytes one step must read + write at least (the roofline's numerator; see the module docstring)."""
    extra = 4 * bool(kwargs.get("scale_parameter", True)) + 8 * (kwargs.get("beta1") is not None)
    total = 0
    for shape in shapes:
        numel = 1
        for size in shape:
            numel *= size
        total += numel * ((16 if len(shape) >= 2 else 20) + extra)
    return total


def measure_bandwidth(rounds: int) -> float:
    """Bytes/s: the faster median of the copy and ``a += b`` kernels over ``rounds`` alternating rounds."""
    kernels = bandwidth_kernels()
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(rounds):
        for name, (fn, _) in kernels.items():
            times[name].append(time_once(fn))
    return max(kernels[name][1] / statistics.median(t) for name, t in times.items())


def make_params(shapes: list[tuple[int, ...]], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    return params


def make_model(shapes: list[tuple[int, ...]]) -> torch.nn.Sequential:
    """The modules behind :func:`model_shapes`: per block Linear(h, h), Linear(h, i), Linear(i, h), LayerNorm(h).

    Raises:
        ValueError: shapes that are not :func:`model_shapes`' pattern of blocks.
    """
    if len(shapes) % 8:
        raise ValueError(f"shapes must be blocks of 8 tensors as model_shapes() makes them, got {len(shapes)}")
    layers: list[torch.nn.Module] = []
    for block in range(len(shapes) // 8):
        (hidden, _), (inner, _) = shapes[8 * block], shapes[8 * block + 1]
        layers += [
            torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, inner), torch.nn.GELU(),
            torch.nn.Linear(inner, hidden), torch.nn.LayerNorm(hidden),
        ]
    model = torch.nn.Sequential(*layers)
    found = sorted(tuple(p.shape) for p in model.parameters())
    if found != sorted(shapes):
        raise ValueError("make_model(shapes): the modules' parameter shapes differ from model_shapes()")
    return model


def compare_in_loop(ours: Any, reference: Any, models: tuple[torch.nn.Module, torch.nn.Module],
                    inputs: torch.Tensor, rounds: int, warmup: int = 2) -> Comparison:
    """Median step times of two optimizers, each training its own model, alternating round by round.

    A round of a side: forward and backward (untimed), ``step()`` (timed by ``time_once``),
    ``zero_grad()`` (gradients freed, torch's default). The side that goes first alternates.
    """
    times: tuple[list[float], list[float]] = ([], [])
    sides = [(0, ours, models[0]), (1, reference, models[1])]
    for index in range(warmup + rounds):
        for side, optimizer, model in sides if index % 2 == 0 else sides[::-1]:  # who goes first alternates
            model(inputs).square().mean().backward()
            seconds = time_once(optimizer.step)
            optimizer.zero_grad()
            if index >= warmup:
                times[side].append(seconds)
    return Comparison(statistics.median(times[0]), statistics.median(times[1]), times[0], times[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=["default", "trainer"])
    parser.add_argument("--torch", action="store_true", help="also time torch.optim.Adafactor")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--memory", choices=("default", *REGIMES), default="default",
                        help="glibc's large allocations: as glibc leaves them (default), or pinned fresh / "
                             "reused (benchmarks._allocator)")
    parser.add_argument("--loop", action="store_true",
                        help="time the step inside a training loop (forward, backward, step, zero_grad)")
    parser.add_argument("--fused", action="store_true",
                        help="ours with fused=True (the C++ kernel, built on first use: optsched.optim.adafactor_fused)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from transformers.optimization import Adafactor as HFAdafactor

    torch.manual_seed(0)
    shapes = model_shapes()
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    total = sum(g.numel() for g in grads)
    print(f"model: {total / 1e6:.1f}M parameters in {len(shapes)} tensors (fp32); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    ours_extra = {"fused": True} if args.fused else {}
    for name in args.config:
        kwargs = CONFIGS[name]
        memory = contextlib.nullcontext() if args.memory == "default" else large_allocations(args.memory)
        if args.loop:
            torch.manual_seed(0)
            models = (make_model(shapes), make_model(shapes))
            models[1].load_state_dict(models[0].state_dict())
            ours = Adafactor(models[0].parameters(), **kwargs, **ours_extra)
            reference = HFAdafactor(models[1].parameters(), **kwargs)
            inputs = torch.randn(16, shapes[0][0])
            with memory:
                result = compare_in_loop(ours, reference, models, inputs, rounds=3 * args.rounds)
            del models
        else:
            ours = Adafactor(make_params(shapes, grads), **kwargs, **ours_extra)
            reference = HFAdafactor(make_params(shapes, grads), **kwargs)
            with memory:
                result = compare(ours.step, reference.step, rounds=args.rounds, warmup=1)
        config = "" if name == "default" else f" ({name})"
        where = ("" if args.memory == "default" else f", memory {args.memory}") + (
            ", in a training loop" if args.loop else "") + (", fused=True" if args.fused else "")
        print(
            f"adafactor step{config}{where}: ours {result.ours * 1e3:.1f} ms, "
            f"reference {result.reference * 1e3:.1f} ms, "
            f"ratio {result.ratio:.2f}",
            flush=True,
        )
        del ours, reference
        need = step_bytes(shapes, kwargs)
        bandwidth = measure_bandwidth(max(3, args.rounds // 2))
        limit = need / bandwidth
        print(f"  roofline: {limit * 1e3:.1f} ms ({need / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s), "
              f"ours at {limit / result.ours:.2f} of it", flush=True)
        if args.torch:
            lr = kwargs.get("lr") or 1e-2
            torch_opt = torch.optim.Adafactor(make_params(shapes, grads), lr=lr)
            torch_opt.step()
            seconds = statistics.median(time_once(torch_opt.step) for _ in range(args.rounds))
            print(f"  torch.optim.Adafactor step (for information; other semantics): {seconds * 1e3:.1f} ms")
            del torch_opt


if __name__ == "__main__":
    main()
