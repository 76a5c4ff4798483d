"""``fp16_full_eval`` / ``bf16_full_eval``: an evaluation outside ``train()`` runs the model cast to float16 /
bfloat16 (its weights, not an autocast), and the model's own tensors are put back afterwards.

transformers' rule (``Trainer.evaluation_loop``): when the Trainer is not training (``is_in_train``), the
model is cast with ``model.to(dtype)`` before ``evaluate()`` / ``predict()`` run it; an evaluation during
``train()`` runs at the training precision. transformers then leaves the model cast: a ``train()`` after such
an ``evaluate()`` trains bfloat16 / float16 weights, the float32 ones lost to rounding. Here, on purpose,
every parameter (the same ``Parameter`` object, so the optimizer's references hold), its gradient and every
buffer is given back its own tensor when the evaluation ends: the float32 weights are those before it, bit
for bit. The cost is memory: the cast copies live beside the float32 tensors during the evaluation (half
their size more for float16 / bfloat16), where transformers' cast replaced them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["cast_for_evaluation", "full_eval_dtype"]


def full_eval_dtype(args: Any) -> torch.dtype | None:
    """``torch.float16`` for ``args.fp16_full_eval``, ``torch.bfloat16`` for ``args.bf16_full_eval`` (the
    arguments refuse both), else ``None``."""
    if getattr(args, "fp16_full_eval", False):
        return torch.float16
    if getattr(args, "bf16_full_eval", False):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def cast_for_evaluation(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Run the body with ``model.to(dtype=dtype)`` (its floating-point parameters, gradients and buffers),
    then put each of them back as it was: the same tensors, so nothing is rounded. ``dtype=None``: no cast.

    ``model.to`` is the model's own (a transformers model refuses to cast a quantized model there). A
    module that caches a cast tensor in an attribute of its own (not a parameter or buffer) keeps that
    cached copy.
    """
    if dtype is None:
        yield
        return
    modules = list(model.modules())
    params = [(m, name, p, p.data, p.grad) for m in modules for name, p in m._parameters.items() if p is not None]
    buffers = [(m, name, b) for m in modules for name, b in m._buffers.items() if b is not None]
    try:
        model.to(dtype=dtype)
        yield
    finally:
        # The data first: a gradient must match its parameter's dtype when it is assigned.
        for module, name, param, data, grad in params:
            module._parameters[name] = param  # torch's overwrite-on-conversion mode makes new Parameters
            param.data = data
            param.grad = grad
        for module, name, buffer in buffers:
            module._buffers[name] = buffer
