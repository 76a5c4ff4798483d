"""The model's outputs in float32 under ``bf16`` / ``fp16`` autocast, as transformers' Trainer sees them.

transformers' Trainer runs mixed precision through accelerate, which wraps the model's ``forward`` in the
autocast and converts every float16 / bfloat16 tensor of its outputs to float32 (accelerate's
``convert_outputs_to_fp32``): what comes after the forward (label smoothing, ``compute_loss_func``,
``preprocess_logits_for_metrics``, ``compute_metrics``, per batch with ``batch_eval_metrics``) works on
float32 logits. optsched's Trainer puts the autocast around its whole loss computation (so that an
overridden ``compute_loss`` that calls ``model(...)`` keeps it), so :func:`float32_outputs` converts the
outputs where accelerate does, right after the forward, and ``compute_loss_func`` and label smoothing run
with the autocast switched off, as they run outside accelerate's. Without the conversion a
smoothed loss was summed and divided in bfloat16 (a tiny Llama's training losses 2e-3 off transformers'
Trainer's) and ``batch_eval_metrics`` got bfloat16 logits where transformers passes float32 ones. A model
cast by ``bf16_full_eval`` / ``fp16_full_eval`` alone runs without autocast and keeps its half-precision
outputs, as in transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["float32_outputs"]

_HALF = (torch.float16, torch.bfloat16)


def float32_outputs(outputs: Any) -> Any:
    """``outputs`` with each float16 / bfloat16 tensor made float32, inside tuples, lists, namedtuples and
    mappings (a transformers ``ModelOutput`` is rebuilt as its own class, as accelerate rebuilds it); any
    other value (a float32 tensor, a cache object) is left as it is."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.dtype in _HALF else outputs
    if isinstance(outputs, (list, tuple)):
        values = [float32_outputs(v) for v in outputs]
        return type(outputs)(*values) if hasattr(outputs, "_fields") else type(outputs)(values)
    if isinstance(outputs, Mapping):
        return type(outputs)({k: float32_outputs(v) for k, v in outputs.items()})
    return outputs
