"""How long does building the param groups and the optimizer take at 2k / 10k / 40k parameter tensors?

transformers' ``Trainer.create_optimizer`` tests ``n in decay_parameters`` against a *list* for every
parameter, so its cost grows with the square of the number of tensors. optsched classifies each tensor
once with set and dict look-ups. Both sides here build the same two groups and a
``torch.optim.AdamW`` over them (transformers with ``optim="adamw_torch"``).

Run: ``python -m benchmarks.build_optimizer [--sizes 2000 10000 40000] [--rounds 5]``

Prints, per size, ``name: ours X s, reference Y s, ratio Z`` (ratio > 1: optsched is faster):

* ``groups+AdamW Nk``: ``build_param_groups`` + ``AdamW`` vs ``Trainer.create_optimizer``;
* ``groups only Nk``: ``build_param_groups`` vs transformers' grouping alone (no optimizer);
* ``create_optimizer Nk``: ``optsched.optim.create_optimizer`` vs ``Trainer.create_optimizer``, when
  ``optsched.optim`` provides it.

At the largest size transformers runs once (about 9 s); optsched takes the median of ``--rounds``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings

import torch
from torch import nn

from benchmarks._timing import Comparison, compare, report
from optsched.params import build_param_groups


def block_model(num_tensors: int) -> nn.Module:
    """A ModuleList of tiny blocks (Linear 4x4 + LayerNorm 4: four tensors each)."""
    blocks = num_tensors // 4
    return nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(blocks))


def hf_grouping(trainer, model: nn.Module) -> list[dict]:
    """transformers' own grouping, as in ``Trainer.create_optimizer`` (the part that is quadratic)."""
    decay_parameters = trainer.get_decay_parameter_names(model)
    return [
        {
            "params": [p for n, p in model.named_parameters() if (n in decay_parameters and p.requires_grad)],
            "weight_decay": trainer.args.weight_decay,
        },
        {
            "params": [
                p for n, p in model.named_parameters() if (n not in decay_parameters and p.requires_grad)
            ],
            "weight_decay": 0.0,
        },
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 40000])
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args(argv)

    from transformers import Trainer, TrainingArguments  # reference only; optsched never imports it

    try:
        from optsched.optim import create_optimizer
    except ImportError:  # optsched.optim is being written in parallel
        create_optimizer = None
        print("optsched.optim.create_optimizer: not available yet, skipped")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, rounds={opts.rounds}")
    largest = max(opts.sizes)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to="none", optim="adamw_torch", weight_decay=0.01)
        for size in opts.sizes:
            model = block_model(size)
            trainer = Trainer(model=model, args=args)
            label = f"{size // 1000}k" if size % 1000 == 0 else str(size)
            slow = size == largest and size >= 20000
            ref_rounds = 1 if slow else opts.rounds
            warmup = 0 if slow else 1

            def reference() -> torch.optim.Optimizer:
                trainer.optimizer = None
                return trainer.create_optimizer()

            def ours() -> torch.optim.Optimizer:
                return torch.optim.AdamW(
                    build_param_groups(model, args), lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8
                )

            n_ours = sum(len(g["params"]) for g in ours().param_groups)
            n_ref = sum(len(g["params"]) for g in reference().param_groups) if not slow else n_ours
            if n_ours != n_ref or n_ours != len(list(model.parameters())):
                raise RuntimeError(f"groups differ: ours {n_ours} tensors, reference {n_ref}")

            full = compare(ours, reference, rounds=opts.rounds, reference_rounds=ref_rounds, warmup=warmup)
            report(f"groups+AdamW {label}", full)
            if not slow:  # at the largest size the grouping is the 9 s above; not run twice
                report(
                    f"groups only {label}",
                    compare(lambda: build_param_groups(model, args), lambda: hf_grouping(trainer, model),
                            rounds=opts.rounds, warmup=1),
                )
            if create_optimizer is not None:
                result = compare(lambda: create_optimizer(model, args), None if slow else reference,
                                 rounds=opts.rounds, warmup=warmup)
                if slow:  # reuse the single transformers run timed above
                    result = Comparison(result.ours, full.reference, result.ours_all, full.reference_all)
                report(f"create_optimizer {label}", result)


if __name__ == "__main__":
    # Process-wide settings, for a script run only (tests call main() and must keep their own).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    main()
