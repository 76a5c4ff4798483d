"""Which models normalise their own loss by the step's token count, and that count (transformers' rule).

With gradient accumulation, averaging each micro-batch's mean loss weights a token of a short
micro-batch more than a token of a long one. transformers' Trainer (4.46 on) fixes this for models that
*accept loss kwargs*: it counts the labels of the whole optimizer step (``labels != -100``, over every
micro-batch and, with ``average_tokens_across_devices``, every process) and passes that count to the
model as ``num_items_in_batch``; the model's loss is then ``sum over the micro-batch / count`` and the
Trainer does not divide by the accumulation steps. The step's gradient is the mean over its tokens,
whatever the padding. optsched's Trainer does the same:

* :func:`model_accepts_loss_kwargs`: the model's ``accepts_loss_kwargs`` attribute where it has one
  (transformers' opt-out), else whether its ``forward`` takes ``**kwargs``: every transformers model
  with a loss does, and so gets ``num_items_in_batch``, as under transformers' Trainer;
* :func:`loss_shifts_labels`: a causal LM's loss predicts ``labels[..., 1:]``, so the count skips each
  row's first label. Decided from the loss the model runs (its ``loss_function`` is transformers'
  ``ForCausalLMLoss`` and it is not an encoder-decoder). transformers 5.23 decides from ``loss_type``,
  which GPT-2 leaves ``None``: it counts GPT-2's first labels too and trains on ``(L - 1) / L`` of the
  mean loss; optsched counts what the loss uses;
* :func:`count_label_items`: the count over a step's batches.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["IGNORE_INDEX", "count_label_items", "loss_shifts_labels", "model_accepts_loss_kwargs"]

#: The label value losses ignore (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``).
IGNORE_INDEX = -100


def _inner_model(model: nn.Module) -> nn.Module:
    """The model itself inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether the Trainer passes ``num_items_in_batch`` to ``model`` and leaves the accumulation
    scaling to its loss (transformers' ``Trainer.model_accepts_loss_kwargs``).

    ``model.accepts_loss_kwargs`` where the model defines it (set it to False for a model whose
    ``forward(**kwargs)`` ignores the count: its loss would otherwise not be divided by the
    accumulation steps); else True when ``forward`` takes ``**kwargs``.
    """
    model = _inner_model(model)
    declared = getattr(model, "accepts_loss_kwargs", None)
    if declared is not None:
        return bool(declared)
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature (a C extension)
        return False
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s own loss predicts ``labels[..., 1:]`` (a transformers causal LM): its
    ``loss_function`` is ``ForCausalLMLoss`` and its config is not an encoder-decoder one. Any other
    model (not a transformers one, a classifier, T5): False."""
    model = _inner_model(model)
    if not isinstance(getattr(type(model), "loss_function", None), property):
        return False  # not a transformers PreTrainedModel: transformers need not be installed
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    try:
        loss_function = model.loss_function
    except Exception:  # a model-specific failure: not a loss this count knows
        return False
    # read by name: optsched does not import transformers (the model's own module already did)
    return getattr(loss_function, "__name__", None) == "ForCausalLMLoss" and str(
        getattr(loss_function, "__module__", "")
    ).startswith("transformers.")


def count_label_items(batches: list[Any], *, shift_labels: bool = False) -> int | None:
    """The labels a step's loss averages over (``num_items_in_batch``), or None if a batch has none.

    A dict batch counts its ``shift_labels`` key when it has one (a padding-free collator's), else its
    ``labels``: ``labels[..., 1:]`` when ``shift_labels`` (:func:`loss_shifts_labels`), every element
    ``!= -100`` otherwise (transformers' count, float labels included). A tuple / list batch counts its
    last element (for ``compute_loss_func``, which takes it as the labels).
    """
    total = 0
    for batch in batches:
        if isinstance(batch, Mapping):
            labels = batch.get("shift_labels")
            if labels is None:
                labels = batch.get("labels")
                if shift_labels and isinstance(labels, torch.Tensor) and labels.ndim:
                    labels = labels[..., 1:]
        elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
            labels = batch[-1]
        else:
            return None
        if not isinstance(labels, torch.Tensor):
            return None
        total += int((labels != IGNORE_INDEX).sum())
    return total
