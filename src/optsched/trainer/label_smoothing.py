"""``label_smoothing_factor``: transformers' ``LabelSmoother``, the same arithmetic.

With ``epsilon = label_smoothing_factor > 0`` the Trainer takes the labels out of the batch (the model
computes no loss of its own) and computes, from the model's logits ``z`` over ``K`` classes and the
labels ``y`` that are not -100 (``labels[..., 1:]`` against ``logits[..., :-1, :]`` for a causal LM)::

    loss = (1 - epsilon) * sum(-log_softmax(z)[y]) / n  +  epsilon * sum_k(-log_softmax(z)_k) / (n * K)

with ``n`` the step's ``num_items_in_batch`` (the labels of every micro-batch of the optimizer step,
:mod:`optsched.trainer.loss_items`), so a smoothed loss weighs every label of a step the same. In
evaluation ``n`` is the batch's own number of labels, given as a float32 count as transformers'
``prediction_step`` gives it (a bfloat16 sum divided by it is divided in float32); called without a count
the smoother counts the labels itself (an int64 count, the division in the logits' dtype). transformers passes its
count only to a model that accepts loss kwargs; for a plain module the smoother then takes the
micro-batch mean and its Trainer divides by the accumulation steps. Here the count always goes to the
smoother, which uses it in every case. As in transformers, a model configured for
multi-label classification (``config.problem_type``) is trained without smoothing, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from optsched.trainer.loss_items import IGNORE_INDEX

__all__ = ["LabelSmoother", "make_label_smoother"]

logger = logging.getLogger(__name__)


class LabelSmoother:
    """transformers' ``LabelSmoother(epsilon, ignore_index=-100)``: called with the model's outputs and
    the labels (see the module docstring)."""

    def __init__(self, epsilon: float, ignore_index: int = IGNORE_INDEX) -> None:
        self.epsilon = epsilon
        self.ignore_index = ignore_index

    def __call__(
        self, model_output: Any, labels: torch.Tensor, shift_labels: bool = False, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        logits = _logits(model_output)
        if shift_labels:
            logits = logits[..., :-1, :].contiguous()
            labels = labels[..., 1:].contiguous()
        log_probs = -nn.functional.log_softmax(logits, dim=-1)
        if labels.dim() == log_probs.dim() - 1:
            labels = labels.unsqueeze(-1)
        padding_mask = labels.eq(self.ignore_index)
        # -100 cannot index the gather: any class does, the mask zeroes it
        nll_loss = log_probs.gather(dim=-1, index=torch.clamp(labels, min=0))
        smoothed_loss = log_probs.sum(dim=-1, keepdim=True, dtype=torch.float32)  # fp32 for fp16 logits too
        nll_loss.masked_fill_(padding_mask, 0.0)
        smoothed_loss.masked_fill_(padding_mask, 0.0)
        if num_items_in_batch is None:
            denominator = padding_mask.numel() - padding_mask.long().sum()
        elif torch.is_tensor(num_items_in_batch):
            denominator = num_items_in_batch.to(nll_loss.device)
        else:
            denominator = num_items_in_batch
        nll_loss = nll_loss.sum() / denominator
        smoothed_loss = smoothed_loss.sum() / (denominator * log_probs.shape[-1])
        return (1 - self.epsilon) * nll_loss + self.epsilon * smoothed_loss


def _logits(model_output: Any) -> torch.Tensor:
    if isinstance(model_output, Mapping) and "logits" in model_output:
        logits = model_output["logits"]
    elif isinstance(model_output, (tuple, list)) and model_output:
        logits = model_output[0]
    else:
        logits = getattr(model_output, "logits", model_output)
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise ValueError(
            f"label_smoothing_factor > 0 smooths the model's logits, but its output ({type(model_output).__name__}) "
            "has none. Accepted: a model returning logits of shape (..., num_classes) as outputs['logits'], "
            ".logits or the first item of a tuple; or label_smoothing_factor=0."
        )
    return logits


def make_label_smoother(model: nn.Module, epsilon: float) -> LabelSmoother | None:
    """The smoother for ``label_smoothing_factor=epsilon``: None when 0, and (with a warning) for a model
    configured for multi-label classification, as transformers' Trainer decides."""
    if epsilon == 0:
        return None
    if getattr(getattr(model, "config", None), "problem_type", None) == "multi_label_classification":
        logger.warning(
            "label_smoothing_factor=%r is not applied: the model is configured for multi-label classification "
            "(config.problem_type), where label smoothing does not apply (transformers disables it too).", epsilon
        )
        return None
    return LabelSmoother(epsilon)
