"""``group_by_length``: each epoch's order groups samples of similar length, as transformers' Trainer does.

transformers' ``LengthGroupedSampler`` (``trainer_pt_utils``; ``train_sampling_strategy="group_by_length"``,
transformers 4's ``group_by_length=True``) orders an epoch with :func:`get_length_grouped_indices`: a random
permutation cut into megabatches of ``mega_batch_mult x batch_size`` (``batch_size`` is
``per_device_train_batch_size x gradient_accumulation_steps``; ``mega_batch_mult`` is 50, or fewer so that
there are 4 megabatches), each sorted by length, longest first, and the longest sample of all moved to the
front, so that an out-of-memory error comes at the first step rather than hours in.

Where the permutation comes from (a deliberate difference): transformers draws it from torch's global RNG,
seeded by ``seed`` when the Trainer is built, each time an epoch's DataLoader starts, right after the
DataLoader has drawn its workers' base seed from the same RNG. Its order therefore also moves with anything
else that draws from that RNG during training (dropout, an evaluation's DataLoader), and a resume in epoch
``e > 0`` replays epoch 0's order. :class:`LengthGroupedOrder` makes the same draws from a generator of its
own, seeded with ``data_seed`` (default ``seed``): the same batches as transformers' Trainer when nothing
else draws from the global RNG in between (no dropout, no evaluation during training), and always an
order that depends on the seed and the epoch only, so that a resume is exact and every process computes
the same order. transformers takes ``seed`` even when ``data_seed`` is set; optsched takes ``data_seed``,
as its documentation says data samplers do.

Lengths (:func:`dataset_lengths`): the ``length_column_name`` column of a dataset that has columns (a
``datasets.Dataset``), else ``len(item[model_input_name])`` of every item. transformers' Trainer first
drops the columns its model's ``forward`` does not take (``remove_unused_columns``), the length column with
them, and so measures ``model_input_name`` unless told ``remove_unused_columns=False``; optsched drops no
column and reads it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch

__all__ = ["LengthGroupedOrder", "dataset_lengths", "get_length_grouped_indices"]

#: transformers' default megabatch multiplier (``get_length_grouped_indices``).
MAX_MEGA_BATCH_MULT = 50


def get_length_grouped_indices(
    lengths: Sequence[float], batch_size: int, mega_batch_mult: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """transformers' ``get_length_grouped_indices``: a permutation whose consecutive ``batch_size`` slices
    hold samples of similar length.

    ``torch.randperm(len(lengths), generator=generator)`` cut into megabatches of ``mega_batch_mult x
    batch_size`` (default ``min(len(lengths) // (4 x batch_size), 50)``, at least 1; the last megabatch
    holds the rest), each sorted by decreasing length (a stable sort: equal lengths keep the permutation's
    order), then the first element of the megabatch with the longest sample swapped with the first element
    of the first megabatch (the first of them on a tie). Draws ``randperm`` from ``generator`` (the global
    RNG when None) and nothing else.

    Raises:
        ValueError: ``lengths`` is empty.
    """
    if len(lengths) == 0:
        raise ValueError("get_length_grouped_indices needs at least one length; got an empty sequence.")
    if mega_batch_mult is None:
        mega_batch_mult = min(len(lengths) // (batch_size * 4), MAX_MEGA_BATCH_MULT) or 1
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = mega_batch_mult * batch_size
    megabatches = [sorted(indices[i : i + size], key=lambda i: lengths[i], reverse=True)
                   for i in range(0, len(indices), size)]
    # transformers' torch.argmax over the megabatches' maximums: the first maximum on a tie
    maximums = [lengths[megabatch[0]] for megabatch in megabatches]
    longest = maximums.index(max(maximums))
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for megabatch in megabatches for i in megabatch]


def _column_lengths(dataset: Any, column: str) -> list[Any] | None:
    """The ``column`` of a dataset with columns (``datasets.Dataset``; not imported), None without it."""
    names = getattr(dataset, "column_names", None)
    if not isinstance(names, (list, tuple)) or column not in names:
        return None
    values = dataset[column]
    return values.tolist() if hasattr(values, "tolist") else list(values)  # a tensor / numpy column


def _check_lengths(lengths: list[Any], count: int, source: str) -> list[Any]:
    if len(lengths) != count:
        raise ValueError(f"group_by_length: {source} gives {len(lengths)} lengths for a dataset of {count} items; "
                         "accepted: one length per item.")
    for i, length in enumerate(lengths):
        if isinstance(length, bool) or not isinstance(length, numbers.Real) or not length >= 0:
            raise ValueError(
                f"group_by_length: {source} gives item {i} the length {length!r} ({type(length).__name__}); "
                "accepted: numbers >= 0 (token counts)."
            )
    return lengths


def _item_length(item: Any, index: int, model_input_name: str, length_column_name: str) -> int:
    """``len(item[model_input_name])``, or an error that says what group_by_length accepts."""
    if not isinstance(item, Mapping) or model_input_name not in item:
        what = (f"a mapping without that key (keys: {sorted(map(str, item))})" if isinstance(item, Mapping)
                else f"a {type(item).__name__}, not a mapping")
        raise ValueError(
            f"group_by_length measures each item's model_input_name={model_input_name!r}, but item {index} of "
            f"the training dataset is {what}. Accepted: items that are mappings (dicts) holding a sized "
            f"{model_input_name!r} (set model_input_name to the key to measure), a dataset with a "
            f"length_column_name={length_column_name!r} column (a datasets.Dataset), or "
            "train_sampling_strategy='random' (group_by_length=False)."
        )
    value = item[model_input_name]
    try:
        return len(value)
    except TypeError:
        raise TypeError(
            f"group_by_length measures len(item[{model_input_name!r}]) (model_input_name), but item {index}'s is "
            f"a {type(value).__name__} without a length; accepted: a sequence or a tensor with a first dimension."
        ) from None


def dataset_lengths(
    dataset: Any, *, length_column_name: str = "length", model_input_name: str = "input_ids"
) -> list[Any]:
    """Each item's length, for grouping (see the module docstring): the ``length_column_name`` column of a
    dataset with ``column_names`` that lists it, else ``len(dataset[i][model_input_name])`` for every ``i``.

    Raises:
        ValueError: an item that is not a mapping with ``model_input_name`` (the message names
            ``group_by_length``, ``model_input_name``, ``length_column_name`` and the item); a length that is
            not a number >= 0; a column of another length than the dataset; an empty dataset.
        TypeError: an item's ``model_input_name`` value has no ``len()`` (a 0-d tensor, an int).
    """
    count = len(dataset)
    if count == 0:
        raise ValueError("group_by_length: the training dataset is empty; accepted: at least one item.")
    column = _column_lengths(dataset, length_column_name)
    if column is not None:
        return _check_lengths(column, count, f"the column length_column_name={length_column_name!r}")
    return [_item_length(dataset[i], i, model_input_name, length_column_name) for i in range(count)]


class LengthGroupedOrder:
    """Epoch ``e``'s order of a map-style dataset under ``group_by_length``: ``order(e)``.

    A generator seeded with ``seed`` makes, for each epoch in turn, transformers' two draws: one int64
    (where transformers' DataLoader draws its workers' base seed) then :func:`get_length_grouped_indices`'
    ``randperm``. ``order(e)`` replays the draws of epochs ``0 .. e`` (continuing from the last epoch asked
    for when ``e`` is later), so it depends only on ``seed`` and ``e``. The lengths are measured
    (:func:`dataset_lengths`) at the first call or the first read of :attr:`lengths`, once.

    Args:
        dataset: a map-style dataset (``len`` and ``dataset[i]``).
        batch_size: the grouping's batch, ``per_device_train_batch_size x gradient_accumulation_steps``.
        seed: ``data_seed``, else ``seed``.
        length_column_name / model_input_name: where the lengths come from (:func:`dataset_lengths`).
    """

    def __init__(self, dataset: Any, *, batch_size: int, seed: int, length_column_name: str = "length",
                 model_input_name: str = "input_ids") -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.length_column_name = length_column_name
        self.model_input_name = model_input_name
        self._generator: torch.Generator | None = None
        self._next_epoch = 0  # the epoch whose draws the generator makes next
        self._cached: tuple[int, list[int]] | None = None

    @cached_property
    def lengths(self) -> list[Any]:
        """Each item's length (measured once; see :func:`dataset_lengths` for the errors)."""
        return dataset_lengths(self.dataset, length_column_name=self.length_column_name,
                               model_input_name=self.model_input_name)

    def _draw_base_seed(self) -> None:
        # transformers' DataLoader draws this int64 (its workers' base seed) from the same RNG first
        torch.empty((), dtype=torch.int64).random_(generator=self._generator)

    def __call__(self, epoch: int) -> list[int]:
        if self._cached is not None and self._cached[0] == epoch:
            return list(self._cached[1])
        lengths = self.lengths
        if self._generator is None or epoch < self._next_epoch:
            self._generator = torch.Generator().manual_seed(self.seed)
            self._next_epoch = 0
        for _ in range(self._next_epoch, epoch):  # the epochs in between: their draws, no sorting
            self._draw_base_seed()
            torch.randperm(len(lengths), generator=self._generator)
        self._draw_base_seed()
        order = get_length_grouped_indices(lengths, self.batch_size, generator=self._generator)
        self._next_epoch = epoch + 1
        self._cached = (epoch, order)
        return list(order)
