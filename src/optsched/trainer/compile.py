"""``torch_compile``: the Trainer compiles the model it trains, as transformers' Trainer does.

transformers 5.23 hands ``torch_compile_backend`` / ``torch_compile_mode`` to accelerate's
``TorchDynamoPlugin``, whose ``prepare_model`` wraps the model in DDP first (under several processes)
and calls ``torch.compile`` last, on the wrapper: ``torch.compile(DDP(model), backend=..., mode=...)``.
The Trainer does the same with :func:`compile_model`. The fields' rules (``TrainingArguments``): setting
the backend or the mode turns ``torch_compile`` on, and ``torch_compile=True`` without a backend means
``"inductor"`` (``optsched.arguments.torch_compile_settings``).

What is compiled is a wrapper around the Trainer's model, never the model itself: ``trainer.model``
stays the module the user passed (as in transformers), so checkpoints are written under its own
parameter names (no ``_orig_mod.`` prefix) and a checkpoint moves between compiled and uncompiled
runs both ways. Evaluation runs a compiled wrapper of ``trainer.model`` too (without DDP), where
transformers' Trainer evaluates the uncompiled model once training has started (its first ``evaluate()``
before ``train()`` compiles): the speed asked for is kept for evaluation. With the eager backends a tiny
Llama's ``eval_loss`` is the uncompiled one exactly; a model whose code branches on compilation (Llama
without its KV cache picks another attention path when compiled) may differ in the last bits, as its
training does.

Unlike transformers, optsched does not switch on TF32 matmuls when ``torch_compile=True`` (transformers'
``TrainingArguments`` does so process-wide on an Ampere GPU when ``tf32`` is unset): that changes the
float32 precision of everything the process computes and is a choice of its own (``tf32=True``,
:mod:`optsched.trainer.tf32`).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from optsched._validation import check_choice

__all__ = [
    "check_backend",
    "check_mode",
    "compile_backends",
    "compile_model",
    "compile_modes",
]

logger = logging.getLogger(__name__)

def compile_backends() -> list[str]:
    """The backend names ``torch.compile`` accepts here, as torch lists them (its debugging backends
    ``eager`` and ``aot_eager`` included: ``list_backends()`` leaves them out by default)."""
    import torch._dynamo  # ~0.7 s: only imported once a backend is named

    return list(torch._dynamo.list_backends(exclude_tags=None))


def compile_modes() -> list[str]:
    """The ``mode`` names ``torch.compile`` accepts (``default``, ``reduce-overhead``, ``max-autotune``, ...)."""
    import torch._inductor

    return list(torch._inductor.list_mode_options())


def check_backend(name: str, value: Any) -> str | None:
    """``None``, or a backend name from :func:`compile_backends` (a ``ValueError`` naming the field, the
    value and the accepted names otherwise). accelerate accepts only the names of its ``DynamoBackend``
    enum, a subset; optsched takes any backend torch has."""
    return None if value is None else check_choice(name, value, compile_backends(), what="torch.compile backend")


def check_mode(name: str, value: Any) -> str | None:
    """``None``, or a mode from :func:`compile_modes`. torch checks the mode only for inductor (other
    backends ignore it, with a warning); a misspelt mode is refused here whatever the backend."""
    return None if value is None else check_choice(name, value, compile_modes(), what="torch.compile mode")


def compile_model(model: nn.Module, backend: str, mode: str | None) -> nn.Module:
    """``torch.compile(model, backend=backend, mode=mode)`` with accelerate's keywords: ``mode`` is passed
    only when it is not ``"default"`` (the same thing), ``dynamic`` and ``fullgraph`` are left to torch.

    A model that is compiled already (an ``OptimizedModule``: the user compiled it), or DDP around one, is
    returned as it is: accelerate does not compile a compiled model again either.
    """
    import torch

    from optsched.params.classify import unwrap_compiled

    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if unwrap_compiled(inner) is not inner:
        logger.info("The model is compiled already; torch_compile does not compile it again.")
        return model
    kwargs: dict[str, Any] = {"backend": backend}
    if mode is not None and mode != "default":
        kwargs["mode"] = mode
    logger.info("Compiling %s with torch.compile(%s)", type(model).__name__,
                ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    return torch.compile(model, **kwargs)
