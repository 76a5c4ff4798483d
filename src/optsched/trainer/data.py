"""Data for the Trainer: step arithmetic, a seeded resumable sampler, batches, and how a batch reaches the model.

Step count (transformers' rule)::

    updates_per_epoch = max(ceil(batches_per_epoch / gradient_accumulation_steps), 1)
    max_steps         = args.max_steps                     if args.max_steps > 0
                      = ceil(num_train_epochs * updates_per_epoch)   otherwise

A dataset without ``__len__`` (an ``IterableDataset``) needs ``max_steps > 0``.

Data order: epoch ``e`` visits ``randperm(len(dataset), generator=seed(data_seed + e))`` (``data_seed``
defaults to ``seed``), so the order depends only on the seed and the epoch. That is what lets a resume
skip exactly the batches already consumed, and under ``N`` processes rank ``r`` takes every ``N``-th index
of the same permutation (``torch.utils.data.DistributedSampler``'s split), so ``N x batch b`` covers the
same samples per step as ``1 x batch N*b``. With ``train_sampling_strategy="group_by_length"`` the epoch's
order is :class:`~optsched.trainer.length_grouping.LengthGroupedOrder`'s (also a function of the seed and the
epoch only) and the ranks take whole batches of it in turn, as transformers' Trainer under DDP.

Batches reach the model as:

* a ``dict`` (or any mapping): ``model(**batch)``; with ``compute_loss_func`` the ``labels`` key is taken
  out and handed to the loss function;
* a ``tuple`` / ``list``: ``model(*batch)``; with ``compute_loss_func`` the *last* element is the labels,
  handed to the loss function, and ``model(*batch[:-1])`` is called;
* anything else (a tensor): ``model(batch)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

__all__ = [
    "EpochSampler",
    "ShardedIterable",
    "TrainingPlan",
    "build_dataloader",
    "epoch_batches",
    "has_length",
    "iter_update_groups",
    "move_to_device",
    "plan_training",
    "scalar_to_device",
    "split_model_inputs",
]


def has_length(obj: Any) -> bool:
    """True when ``len(obj)`` works (an ``IterableDataset`` usually raises ``TypeError``)."""
    try:
        len(obj)
    except (TypeError, NotImplementedError):
        return False
    return True


@dataclass(frozen=True)
class TrainingPlan:
    """How long one ``train()`` runs.

    Attributes:
        max_steps: optimizer updates in total.
        num_train_epochs: passes over the data the loop may start (ceil of a fractional request).
        updates_per_epoch: optimizer updates per pass (``max_steps`` for a dataset without length).
        batches_per_epoch: batches per pass on this process, ``None`` when the dataset has no length.
    """

    max_steps: int
    num_train_epochs: int
    updates_per_epoch: int
    batches_per_epoch: int | None


def plan_training(
    batches_per_epoch: int | None, *, max_steps: int, num_train_epochs: float, gradient_accumulation_steps: int
) -> TrainingPlan:
    """Apply transformers' step-count rule (see the module docstring).

    Raises:
        ValueError: no length and ``max_steps <= 0``; or nothing to do (zero epochs and no max_steps).
    """
    ga = gradient_accumulation_steps
    if batches_per_epoch is None:
        if max_steps <= 0:
            raise ValueError(
                f"max_steps={max_steps!r} must be a positive integer when the training dataset has no length "
                "(an IterableDataset): the Trainer cannot count the steps of an epoch. Set max_steps > 0."
            )
        return TrainingPlan(max_steps, 2**62, max_steps, None)
    if batches_per_epoch == 0:
        raise ValueError(
            "the training dataset gives 0 batches per epoch (empty dataset, or fewer samples than "
            "per_device_train_batch_size with dataloader_drop_last=True); accepted: at least one batch."
        )
    updates = max(math.ceil(batches_per_epoch / ga), 1)
    if max_steps > 0:
        return TrainingPlan(max_steps, math.ceil(max_steps / updates), updates, batches_per_epoch)
    total = math.ceil(num_train_epochs * updates)
    if total <= 0:
        raise ValueError(
            f"num_train_epochs={num_train_epochs!r} with max_steps={max_steps!r} plans 0 training steps; "
            "accepted: num_train_epochs > 0 or max_steps > 0."
        )
    return TrainingPlan(total, math.ceil(num_train_epochs), updates, batches_per_epoch)


class EpochSampler(Sampler[int]):
    """Seeded per-epoch order, split over processes, with a resumable start.

    Epoch ``e`` uses ``torch.randperm(n, generator=manual_seed(seed + e))`` (or ``range(n)`` without
    shuffling, or ``order(e)`` when given: ``group_by_length``'s
    :class:`~optsched.trainer.length_grouping.LengthGroupedOrder`). Under several processes the order is
    cut into runs of ``shard_size`` consecutive positions, padded by wrapping around to a multiple of
    ``world_size`` runs (or cut down to whole rounds with ``drop_last``), and rank ``r`` takes runs
    ``r, r + world_size, ...``: with ``shard_size=1``, positions ``r, r + world_size, ...``
    (``DistributedSampler``'s split); with ``shard_size`` the batch size, whole batches in turn
    (accelerate's split of a batch sampler, transformers' Trainer's under DDP). One process takes the
    whole order, unpadded. ``set_skip(k)`` drops the first ``k`` indices of this rank's share for the next
    iteration only (a resume).

    ``pad=False`` (evaluation) neither pads nor cuts: every index is taken exactly once, and the ranks'
    shares differ by at most one run (a padded index would be counted twice in a metric summed over ranks).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        pad: bool = True,
        order: Callable[[int], list[int]] | None = None,
        shard_size: int = 1,
    ) -> None:
        self.num_samples = num_samples
        self.pad = pad
        self.order = order
        self.shard_size = shard_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_skip(self, num_indices: int) -> None:
        self._skip = num_indices

    def _total(self) -> int:
        """How many positions of the (padded or cut) order the ranks share."""
        n, world = self.num_samples, self.world_size
        if not self.pad or world == 1:
            return n
        rounds = n // (world * self.shard_size) if self.drop_last else math.ceil(n / (world * self.shard_size))
        return rounds * world * self.shard_size

    def __len__(self) -> int:
        total, size = self._total(), self.shard_size
        rounds, rest = divmod(total, size * self.world_size)
        return rounds * size + min(max(rest - self.rank * size, 0), size)

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch (before any skip)."""
        if self.order is not None:
            order = self.order(self.epoch)
        elif self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = self._total()
        if total > len(order) and order:
            order = (order * math.ceil(total / len(order)))[:total]
        if self.shard_size == 1:
            return order[self.rank : total : self.world_size]
        size, stride = self.shard_size, self.shard_size * self.world_size
        return [order[p] for start in range(self.rank * size, total, stride)
                for p in range(start, min(start + size, total))]

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.indices()[skip:])


class ShardedIterable(IterableDataset):
    """Rank ``r`` of ``N`` keeps items ``r, r + N, ...`` of an iterable dataset (each process its share).

    The items are read in rounds of ``N``, one item of each round per rank. With ``pad`` (training), a
    last round the stream leaves incomplete is completed from the stream's first items, as
    :class:`EpochSampler` wraps around (or dropped with ``drop_last``), so every rank gets the same
    number of items: ``ceil(n / N)`` (``n // N``). DDP needs it: a rank with a batch more than the others
    ran a step of its own, and the ranks' epochs, evaluations and checkpoints (whose collectives must
    match) went out of step, a hang at the first save or evaluation at an epoch's end. ``pad=False``
    (evaluation, whose loop has no collective) takes every item once; the shares differ by at most one.
    """

    def __init__(
        self, dataset: Iterable[Any], rank: int, world_size: int, *, pad: bool = False, drop_last: bool = False
    ) -> None:
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[Any]:
        if not self.pad:
            for i, item in enumerate(self.dataset):
                if i % self.world_size == self.rank:
                    yield item
            return
        # a rank's item is yielded once its round is complete: only then is it known not to be the last,
        # incomplete one (dropped or padded); the first round is kept to pad that one
        first: list[Any] = []
        current: list[Any] = []
        for item in self.dataset:
            if len(first) < self.world_size:
                first.append(item)
            current.append(item)
            if len(current) == self.world_size:
                yield current[self.rank]
                current = []
        if current and not self.drop_last:
            padded = current + [first[i % len(first)] for i in range(self.world_size - len(current))]
            yield padded[self.rank]


def iter_update_groups(batches: Iterator[Any], gradient_accumulation_steps: int) -> Iterator[list[Any]]:
    """Group an epoch's batches into optimizer steps of ``gradient_accumulation_steps`` batches.

    The last group of an epoch holds the remainder (1 to ``gradient_accumulation_steps`` batches); an
    exhausted iterator ends the generator without an empty group.
    """
    while True:
        group = []
        for batch in batches:
            group.append(batch)
            if len(group) == gradient_accumulation_steps:
                break
        if not group:
            return
        yield group
        if len(group) < gradient_accumulation_steps:
            return


def scalar_to_device(value: int | float, device: torch.device) -> torch.Tensor:
    """``torch.tensor(value, device=device)`` without waiting for the GPU.

    ``torch.tensor(n, device="cuda")`` copies from pageable memory, which blocks the host until the
    stream has run everything queued before the copy: one stall of the host per call. Staged through
    pinned memory the copy is queued like a kernel (torch's pinned-memory cache keeps the host buffer
    until the copy has run). Same value, dtype (int64 for an int, the default float dtype for a float)
    and device either way.
    """
    host = torch.tensor(value)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def move_to_device(data: Any, device: torch.device) -> Any:
    """Tensors inside dicts, lists and tuples moved to ``device`` (other values untouched)."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, Mapping):  # plain dict out: batches are passed on as keyword arguments
        return {k: move_to_device(v, device) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(move_to_device(v, device) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(move_to_device(v, device) for v in data)
    return data


def split_model_inputs(batch: Any, take_labels: bool) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """``(args, kwargs, labels)`` for ``model(*args, **kwargs)`` following the module docstring's rules.

    ``labels`` is ``None`` unless ``take_labels`` (a ``compute_loss_func`` or label smoothing computes
    the loss from them).
    """
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        labels = kwargs.pop("labels", None) if take_labels else None
        return (), kwargs, labels
    if isinstance(batch, (list, tuple)):
        items = tuple(batch)
        if take_labels:
            if len(items) < 2:
                raise ValueError(
                    f"a {type(batch).__name__} batch of length {len(items)} has no labels for the Trainer's "
                    "loss (compute_loss_func, or label_smoothing_factor > 0); accepted: (inputs..., labels) "
                    "with the labels last, or a dict with a 'labels' key."
                )
            return items[:-1], {}, items[-1]
        return items, {}, None
    return (batch,), {}, None


def build_dataloader(
    dataset: Dataset | Iterable[Any],
    *,
    batch_size: int,
    collate_fn: Any,
    sampler: EpochSampler | None,
    num_workers: int,
    drop_last: bool,
    seed: int,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: str | None = None,
    in_order: bool = True,
) -> DataLoader:
    """A DataLoader whose worker seeds come from its own generator (never from the global RNG).

    ``pin_memory``, ``persistent_workers``, ``prefetch_factor``, ``multiprocessing_context`` and
    ``in_order`` are the DataLoader's own (the last four only with ``num_workers > 0``;
    ``prefetch_factor=None`` is torch's default, 2 batches per worker; ``in_order=False`` is passed only
    when asked for, as torch before 2.6 has no such argument).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    workers: dict[str, Any] = {}
    if num_workers > 0:
        workers = {"persistent_workers": persistent_workers, "multiprocessing_context": multiprocessing_context}
        if prefetch_factor is not None:
            workers["prefetch_factor"] = prefetch_factor
        if not in_order:
            workers["in_order"] = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=pin_memory,
        **workers,
    )


def epoch_batches(loader: DataLoader, epoch: int, seed: int, skip_batches: int = 0) -> Iterator[Any]:
    """An iterator over ``loader`` for ``epoch``, starting after ``skip_batches`` batches.

    A map-style loader skips by index (no data is loaded for skipped batches); an iterable one reads
    and drops them. The loader's generator is re-seeded per epoch so worker seeds repeat on resume and
    the global RNG is never touched.
    """
    sampler = loader.sampler if isinstance(loader.sampler, EpochSampler) else None
    if loader.generator is not None:
        loader.generator.manual_seed(seed + epoch)
    if sampler is not None:
        sampler.set_epoch(epoch)
        sampler.set_skip(skip_batches * loader.batch_size)
        return iter(loader)
    it = iter(loader)
    for _ in range(skip_batches):
        if next(it, _END) is _END:
            break
    return it


_END = object()
