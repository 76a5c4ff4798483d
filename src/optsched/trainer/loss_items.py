"""Which models normalise their own loss by the step's token count, and that count (transformers' rule).

With gradient accumulation, averaging each micro-batch's mean loss weights a token of a short
micro-batch more than a token of a long one. transformers' Trainer (4.46 on) fixes this for models that
*accept loss kwargs*: it counts the labels of the whole optimizer step (``labels != -100``, over every
micro-batch and, with ``average_tokens_across_devices``, every process) and passes that count to the
model as ``num_items_in_batch``; the model's loss is then ``sum over the micro-batch / count`` and the
Trainer does not divide by the accumulation steps. The step's gradient is the mean over its tokens,
whatever the padding. optsched's Trainer does the same:

* :func:`model_accepts_loss_kwargs`: the model's ``accepts_loss_kwargs`` attribute where it has one
  (transformers' switch), else whether its ``forward`` uses the count: names ``num_items_in_batch``,
  or passes ``**kwargs`` to ``self.loss_function`` (transformers' causal LMs). transformers' Trainer
  takes any ``forward(**kwargs)``, so BERT's and T5's plain mean losses, which ignore the count, lose
  the division by the accumulation steps there (``gradient_accumulation_steps`` x the mean); here
  they keep it;
* :func:`loss_shifts_labels`: a causal LM's loss predicts ``labels[..., 1:]``, so the count skips each
  row's first label. Decided from the loss the model runs (its ``loss_function`` is transformers'
  ``ForCausalLMLoss`` and it is not an encoder-decoder). transformers 5.23 decides from ``loss_type``,
  which GPT-2 leaves ``None``: it counts GPT-2's first labels too and trains on ``(L - 1) / L`` of the
  mean loss; optsched counts what the loss uses;
* :func:`count_label_items`: the count over a step's batches;
* :func:`extract_loss`: the loss a model's outputs carry (the Trainer's training and evaluation read it
  the same way).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from optsched.trainer.distributed import unwrap_model

__all__ = [
    "IGNORE_INDEX", "count_label_items", "extract_loss", "innermost_model", "loss_shifts_labels", "main_input_name",
    "model_accepts_loss_kwargs",
]

#: The label value losses ignore (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``).
IGNORE_INDEX = -100

_COUNT = "num_items_in_batch"


def extract_loss(outputs: Any) -> torch.Tensor | None:
    """The loss in a model's output: ``["loss"]``, ``.loss``, a 0-dim tensor, or the first item of a
    tuple / list when it is a 0-dim tensor (a transformers model with ``return_dict=False`` returns
    ``(loss, logits, ...)``, which transformers' Trainer reads as ``outputs[0]``). A first item with
    dimensions (the logits of a model given no labels) is not taken for a loss; ``None`` then."""
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        loss = outputs.get("loss") if hasattr(outputs, "get") else None
        if loss is not None:
            return loss
    loss = getattr(outputs, "loss", None)
    if loss is not None:
        return loss
    if isinstance(outputs, torch.Tensor) and outputs.ndim == 0:
        return outputs
    if isinstance(outputs, (tuple, list)) and outputs:
        first = outputs[0]
        if isinstance(first, torch.Tensor) and first.ndim == 0:
            return first
    return None


def innermost_model(model: nn.Module) -> nn.Module:
    """The model itself inside DDP, ``torch.compile`` and PEFT wrappers (a LoRA ``PeftModel`` passes its
    ``**kwargs`` on to the model it wraps, whose loss decides: transformers' ``unwrap_peft_model``)."""
    while True:
        inner = unwrap_model(model)
        if type(inner).__module__.split(".")[0] == "peft" and callable(getattr(inner, "get_base_model", None)):
            inner = inner.get_base_model()  # peft is not imported: the model's own module did
        if inner is model:
            return model
        model = inner


def main_input_name(model: nn.Module) -> str:
    """The batch key of the model's main input, as transformers reads it: ``model.main_input_name`` (of the
    model inside DDP and ``torch.compile``), ``"input_ids"`` when the model has none. Read by the FLOP
    estimate, ``include_num_input_tokens_seen`` and ``include_for_metrics=["inputs"]``."""
    return getattr(unwrap_model(model), "main_input_name", "input_ids")


def model_accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether the Trainer passes ``num_items_in_batch`` to ``model`` and leaves the accumulation
    scaling to its loss (transformers' ``Trainer.model_accepts_loss_kwargs``).

    ``model.accepts_loss_kwargs`` where the model defines it. Else True when ``forward`` names
    ``num_items_in_batch`` (a parameter, ``kwargs["num_items_in_batch"]``, ...), or takes ``**kwargs``
    and hands them to ``self.loss_function(..., **kwargs)`` (transformers' causal LMs and the other
    models whose loss goes through its loss registry); False otherwise, and when the source cannot be
    read. transformers' Trainer takes any ``forward(**kwargs)``: BERT's and T5's, whose losses are
    plain means that ignore the count, then skip the division by the accumulation steps and train on
    ``gradient_accumulation_steps`` times the mean loss. False only ever costs the token weighting
    (each micro-batch's mean, divided by the accumulation steps), never the loss's scale.
    """
    model = innermost_model(model)
    declared = getattr(model, "accepts_loss_kwargs", None)
    if declared is not None:
        return bool(declared)
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature (a C extension)
        return False
    if "num_items_in_batch" in parameters:
        return True
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return False
    return _forward_uses_the_count(type(model).forward)


def _forward_uses_the_count(forward: Any) -> bool:
    """Whether ``forward``'s source reads ``num_items_in_batch`` or passes ``**kwargs`` on to a
    ``loss_function`` call (parsed, not run)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(forward))))
    except (OSError, TypeError, SyntaxError):  # no source (built in code, a C extension)
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == _COUNT:
            return True
        if isinstance(node, ast.Constant) and node.value == _COUNT:  # kwargs["..."], kwargs.get("...")
            return True
        if isinstance(node, ast.keyword) and node.arg == _COUNT:
            return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "loss_function"
            and any(keyword.arg is None for keyword in node.keywords)  # loss_function(..., **kwargs)
        ):
            return True
    return False


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s own loss predicts ``labels[..., 1:]`` (a transformers causal LM): its
    ``loss_function`` is ``ForCausalLMLoss`` and its config is not an encoder-decoder one. Any other
    model (not a transformers one, a classifier, T5): False."""
    model = innermost_model(model)
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
