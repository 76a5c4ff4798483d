"""``include_num_input_tokens_seen``: how many input tokens a micro-batch feeds the model.

transformers' Trainer (``_track_num_input_tokens``) counts, per micro-batch, the elements of the batch's
entry under the model's ``main_input_name`` (``"input_ids"`` unless the model says otherwise):

* ``"all"``: every element, padding included (``numel``);
* ``"non_padding"``: the sum of the batch's ``attention_mask``. transformers falls back to comparing with
  its tokenizer's pad id, then to ``numel``; optsched's Trainer has no tokenizer, so without an
  ``attention_mask`` it counts every element, with a warning, as transformers' last fallback does.

A batch without the main input (a tuple, a dict of other keys) is not counted: one warning, where
transformers warns at every micro-batch. The Trainer sums the counts of a step over the processes into
``state.num_input_tokens_seen``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TokenCounter"]

logger = logging.getLogger(__name__)


class TokenCounter:
    """Counts the input tokens of micro-batches for one ``mode`` (``"all"`` or ``"non_padding"``).

    Args:
        mode: ``include_num_input_tokens_seen``'s value (not ``"no"``).
        main_input_name: the batch key of the model's main input (``model.main_input_name``).
    """

    def __init__(self, mode: str, main_input_name: str) -> None:
        self.mode = mode
        self.main_input_name = main_input_name
        self._warned: set[str] = set()

    def count(self, batch: Any) -> int:
        """The tokens of one micro-batch (0, with one warning, when it has no main input)."""
        if not isinstance(batch, Mapping) or self.main_input_name not in batch:
            self._warn_once(
                "missing",
                "include_num_input_tokens_seen=%r: the batch has no %r entry (the model's main_input_name), so "
                "its tokens are not counted; accepted: dict batches holding it, or a model whose "
                "main_input_name names the key of its input.", self.mode, self.main_input_name,
            )
            return 0
        if self.mode == "non_padding":
            mask = batch.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                return int(mask.sum())
            self._warn_once(
                "mask",
                "include_num_input_tokens_seen='non_padding': the batch has no attention_mask, so every "
                "element of %r is counted (padding included).", self.main_input_name,
            )
        tokens = batch[self.main_input_name]
        return tokens.numel() if isinstance(tokens, torch.Tensor) else torch.as_tensor(tokens).numel()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)
