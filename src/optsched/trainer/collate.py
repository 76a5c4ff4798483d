"""The Trainer's default collator and ``remove_unused_columns``: transformers' batches from the same samples.

* :func:`default_data_collator`: transformers' ``default_data_collator`` for dict samples (what its
  Trainer uses without a ``data_collator``): ``label`` / ``label_ids`` become ``labels`` (int64 for
  integers, float32 otherwise); tensors are stacked, numpy arrays stacked into tensors, numbers and
  lists of numbers made a tensor (``torch.tensor``: python floats become float32); keys whose first value
  is None or a string are dropped. Where transformers fails, it does not:

  - a sample that is not a mapping (a tuple, a tensor) goes to torch's ``default_collate``
    (transformers calls ``vars()`` on it and fails), as does a value that is a mapping or a sequence
    of tensors;
  - values of different lengths are refused naming the key and what to do (a padding collator),
    where ``torch.tensor`` says ``expected sequence of length 5 at dim 1 (got 3)``.

* :class:`RemoveColumnsCollator` (``remove_unused_columns=True``, transformers' default): each dict
  sample keeps only the keys that the model's ``forward`` names, plus ``label``, ``label_ids`` and
  ``label_names``, so a dataset's extra columns (an ``idx``, the raw ``text``) never reach the model.
  One deliberate difference: a ``forward`` that names no parameter (``forward(self, **batch)``) keeps
  every key, where transformers removes them all and the model is then called without inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

__all__ = ["RemoveColumnsCollator", "default_data_collator", "signature_columns"]

logger = logging.getLogger(__name__)


def default_data_collator(features: list[Any]) -> Any:
    """transformers' ``default_data_collator`` (``return_tensors="pt"``) for dict samples; torch's
    ``default_collate`` for other samples. See the module docstring.

    Raises:
        ValueError: a key whose values cannot form one tensor (different lengths), naming the key.
    """
    first = features[0]
    if not isinstance(first, Mapping):
        if not (dataclasses.is_dataclass(first) and not isinstance(first, type)):
            return default_collate(features)
        features = [vars(f) for f in features]  # transformers' rule for dataclass samples
        first = features[0]
    batch: dict[str, Any] = {}
    if first.get("label") is not None:
        label = first["label"].item() if isinstance(first["label"], torch.Tensor) else first["label"]
        dtype = torch.long if isinstance(label, (int, np.integer)) else torch.float
        batch["labels"] = _tensor("label", [f["label"] for f in features], dtype)
    elif first.get("label_ids") is not None:
        if isinstance(first["label_ids"], torch.Tensor):
            batch["labels"] = torch.stack([f["label_ids"] for f in features])
        else:
            dtype = torch.long if isinstance(first["label_ids"][0], (int, np.integer)) else torch.float
            batch["labels"] = _tensor("label_ids", [f["label_ids"] for f in features], dtype)
    for key, value in first.items():
        if key in ("label", "label_ids") or value is None or isinstance(value, str):
            continue
        column = [f[key] for f in features]
        if isinstance(value, torch.Tensor):
            batch[key] = _stacked(key, column, torch.stack)
        elif isinstance(value, np.ndarray):
            batch[key] = _stacked(key, column, lambda arrays: torch.from_numpy(np.stack(arrays)))
        elif isinstance(value, Mapping) or (
            isinstance(value, Sequence) and value and isinstance(value[0], torch.Tensor)
        ):
            batch[key] = default_collate(column)
        else:
            batch[key] = _tensor(key, column, None)
    return batch


def _padding_hint(key: str, exc: Exception) -> ValueError:
    return ValueError(
        f"default_data_collator: the samples' {key!r} values cannot be stacked into one tensor ({exc}); "
        "accepted: values of one shape, or Trainer(data_collator=...) that pads them (e.g. transformers' "
        "DataCollatorWithPadding)."
    )


def _tensor(key: str, column: list[Any], dtype: torch.dtype | None) -> torch.Tensor:
    try:
        return torch.tensor(column, dtype=dtype)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise _padding_hint(key, exc) from None


def _stacked(key: str, column: list[Any], stack: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
    try:
        return stack(column)
    except (ValueError, RuntimeError) as exc:
        raise _padding_hint(key, exc) from None


def signature_columns(forward: Callable[..., Any], label_names: Iterable[str]) -> list[str] | None:
    """The sample keys ``remove_unused_columns`` keeps: ``forward``'s parameter names, ``label``,
    ``label_ids`` and ``label_names`` (transformers' ``_set_signature_columns_if_needed``); None (keep
    every key) for a ``forward`` that names no parameter, only ``*args`` / ``**kwargs``."""
    parameters = inspect.signature(forward).parameters.values()
    named = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not named:
        return None
    return [p.name for p in parameters] + sorted({"label", "label_ids", *label_names})


class RemoveColumnsCollator:
    """Drop the keys of dict samples that the model does not take, then collate (transformers' class of
    the same name; it logs the dropped keys once, at INFO).

    Args:
        data_collator: the collator that makes the batch from the kept keys.
        columns: the keys kept (:func:`signature_columns`).
        model_name: the model's class name, for the message.
        description: ``"training"`` / ``"evaluation"`` / ``"test"``, for the message.
    """

    def __init__(self, data_collator: Callable[[list[Any]], Any], columns: Iterable[str], model_name: str,
                 description: str) -> None:
        self.data_collator = data_collator
        self.columns = frozenset(columns)
        self.model_name = model_name
        self.description = description
        self._logged = False

    def _remove_columns(self, feature: Any) -> Any:
        if not isinstance(feature, dict):  # transformers': a BatchEncoding or a tuple passes as is
            return feature
        if feature.keys() <= self.columns:  # nothing to drop (the common case once columns are set): no copy
            return feature
        ignored = [] if self._logged else sorted(set(feature) - self.columns)
        if ignored:
            self._logged = True
            logger.info(
                "The following columns in the %s set don't have a corresponding argument in `%s.forward` and "
                "have been ignored: %s (remove_unused_columns=True; set it to False to keep them).",
                self.description, self.model_name, ", ".join(ignored),
            )
        return {k: v for k, v in feature.items() if k in self.columns}

    def __call__(self, features: list[Any]) -> Any:
        return self.data_collator([self._remove_columns(f) for f in features])
