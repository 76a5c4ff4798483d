"""The Trainer's data: its DataLoaders, the plan of steps, and where in the data a resume starts.

:class:`DataLoaderMixin` holds these methods of :class:`~optsched.trainer.trainer.Trainer`
(``get_train_dataloader`` / ``get_eval_dataloader`` keep transformers' names, so a subclass overrides
them as it would there); the samplers and the step arithmetic are :mod:`optsched.trainer.data`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from optsched.trainer.collate import RemoveColumnsCollator, default_data_collator, signature_columns
from optsched.trainer.data import (
    EpochSampler,
    ShardedIterable,
    TrainingPlan,
    build_dataloader,
    epoch_batches,
    has_length,
    iter_update_groups,
    plan_training,
)
from optsched.trainer.length_grouping import LengthGroupedOrder
from optsched.trainer.loss_items import innermost_model

__all__ = ["DataLoaderMixin"]

logger = logging.getLogger(__name__)


def _is_map_style(dataset: Any) -> bool:
    """A dataset read by index (a sampler applies), not a stream."""
    return has_length(dataset) and not isinstance(dataset, torch.utils.data.IterableDataset)


class DataLoaderMixin:
    """The train / eval DataLoaders, the :class:`~optsched.trainer.data.TrainingPlan`, the resume position.

    Reads the Trainer's ``args``, ``dist``, ``model``, ``label_names``, ``train_dataset``, ``eval_dataset``,
    ``data_collator`` and ``state``.
    """

    def _data_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _groups_by_length(self) -> bool:
        return self.args.train_sampling_strategy == "group_by_length"

    def _new_train_loader(self) -> DataLoader:
        args, ds = self.args, self.train_dataset
        sampler = None
        if _is_map_style(ds):
            grouped = self._groups_by_length()
            sampler = EpochSampler(
                len(ds),
                seed=self._data_seed(),
                shuffle=True,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                drop_last=args.dataloader_drop_last and self.dist.enabled,
                # transformers' LengthGroupedSampler; under DDP accelerate deals its batches out in turn
                order=LengthGroupedOrder(
                    ds, batch_size=self._train_batch_size * args.gradient_accumulation_steps,
                    seed=self._data_seed(), length_column_name=args.length_column_name,
                    model_input_name=args.model_input_name,
                ) if grouped else None,
                shard_size=self._train_batch_size if grouped else 1,
            )
        elif self.dist.enabled:
            # every rank the same number of items, hence of batches and steps (see ShardedIterable)
            ds = ShardedIterable(
                ds, self.dist.rank, self.dist.world_size, pad=True, drop_last=args.dataloader_drop_last
            )
        return build_dataloader(
            ds,
            batch_size=self._train_batch_size,  # per_device_train_batch_size, or auto_find_batch_size's
            collate_fn=self._collator("training"),
            sampler=sampler,
            drop_last=args.dataloader_drop_last,
            seed=self._data_seed(),
            **self._loader_options(),
        )

    def _loader_options(self) -> dict[str, Any]:
        """The ``dataloader_*`` fields as DataLoader arguments. ``dataloader_pin_memory`` pins batches only
        when the Trainer runs on an accelerator: on the CPU there is nothing to copy them to (transformers
        turns it off with ``use_cpu``; torch warns about pinning without an accelerator)."""
        args = self.args
        return {
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory and self.device.type != "cpu",
            "persistent_workers": args.dataloader_persistent_workers,
            "prefetch_factor": args.dataloader_prefetch_factor,
            "multiprocessing_context": args.dataloader_multiprocessing_context,
            "in_order": getattr(args, "dataloader_in_order", True),
        }

    def _collator(self, description: str) -> Callable[[list[Any]], Any]:
        """``data_collator`` (default: :func:`~optsched.trainer.collate.default_data_collator`), behind a
        :class:`~optsched.trainer.collate.RemoveColumnsCollator` with ``remove_unused_columns`` (transformers'
        default), which keeps the keys the model's ``forward`` names and the label keys."""
        collator = self.data_collator if self.data_collator is not None else default_data_collator
        if not getattr(self.args, "remove_unused_columns", True):
            return collator
        model = innermost_model(self.model)
        columns = signature_columns(model.forward, self.label_names)
        if columns is None:
            return collator
        return RemoveColumnsCollator(collator, columns, type(model).__name__, description)

    def get_train_dataloader(self) -> DataLoader:
        """The training DataLoader: seeded per-epoch order, split over processes under DDP.

        With ``train_sampling_strategy="group_by_length"`` a map-style dataset's order groups similar
        lengths (:mod:`optsched.trainer.length_grouping`; its lengths are measured here) and, under DDP, each
        process takes whole batches in turn, as transformers' Trainer; an iterable dataset (or one without
        ``__len__``) is read in its own order, with a warning.

        Raises:
            ValueError: no ``train_dataset``; ``group_by_length`` on items it cannot measure.
        """
        if self.train_dataset is None:
            raise ValueError("Trainer: training needs a train_dataset; pass train_dataset= to the Trainer.")
        loader = self._new_train_loader()
        if self._groups_by_length():
            if isinstance(loader.sampler, EpochSampler):
                _ = loader.sampler.order.lengths  # measured now: a dataset without lengths fails before training
            else:  # transformers ignores it too (with this warning for a dataset without __len__)
                logger.warning(
                    "train_sampling_strategy='group_by_length' is ignored: the training dataset (%s) has no "
                    "__len__ or is an IterableDataset, so its items are read in the dataset's own order.",
                    type(self.train_dataset).__name__,
                )
        return loader

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        """The evaluation DataLoader: dataset order, split over processes under DDP (each sample once).

        ``group_by_length`` does not apply here, on purpose: transformers' Trainer groups evaluation and
        ``predict()`` batches by length too, which returns predictions in a shuffled order that the caller
        cannot map back to the dataset's rows.

        Raises:
            ValueError: no eval dataset given here or to the Trainer.
        """
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("Trainer: evaluation needs an eval_dataset; pass eval_dataset= to the Trainer or evaluate().")
        if not self.args.dataloader_persistent_workers:
            return self._new_eval_loader(ds)
        # persistent workers: one loader (and its workers) per dataset, kept for the next evaluations, as
        # transformers does, instead of new worker processes at every evaluation
        cache = self.__dict__.setdefault("_persistent_eval_loaders", {})
        if id(ds) not in cache or cache[id(ds)][0] is not ds:
            cache[id(ds)] = (ds, self._new_eval_loader(ds))
        return cache[id(ds)][1]

    def _new_eval_loader(self, ds: Any) -> DataLoader:
        sampler = None
        if _is_map_style(ds):
            # no padding: a sample repeated to even out the ranks' shares would count twice in the loss
            sampler = EpochSampler(
                len(ds), seed=0, shuffle=False, rank=self.dist.rank, world_size=self.dist.world_size, pad=False
            )
        elif self.dist.enabled:
            ds = ShardedIterable(ds, self.dist.rank, self.dist.world_size)
        return build_dataloader(
            ds,
            batch_size=getattr(self.args, "per_device_eval_batch_size", self.args.per_device_train_batch_size),
            collate_fn=self._collator("evaluation"),
            sampler=sampler,
            drop_last=False,
            seed=0,
            **self._loader_options(),
        )

    def get_test_dataloader(self, test_dataset: Any) -> DataLoader:
        """The DataLoader of :meth:`predict`: as :meth:`get_eval_dataloader` (dataset order, each sample
        on one process), for ``test_dataset``.

        Raises:
            ValueError: ``test_dataset`` is None.
        """
        if test_dataset is None:
            raise ValueError("Trainer.predict(test_dataset=None): accepted: a dataset (map-style or iterable).")
        return self.get_eval_dataloader(test_dataset)

    def _plan(self, batches_per_epoch: int | None) -> TrainingPlan:
        return plan_training(
            batches_per_epoch,
            max_steps=self.args.max_steps,
            num_train_epochs=self.args.num_train_epochs,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
        )

    # ---- position in the data ------------------------------------------------------------------------

    def _epoch_groups(self, loader: DataLoader, epoch: int, skip_updates: int) -> Iterator[list[Any]]:
        ga = self.args.gradient_accumulation_steps
        batches = epoch_batches(loader, epoch, self._data_seed(), skip_updates * ga if has_length(loader) else 0)
        groups = iter_update_groups(batches, ga)
        if not has_length(loader):
            for _ in range(skip_updates):
                next(groups, None)
        return groups

    def _start_position(self, loader: DataLoader, plan: TrainingPlan) -> tuple[int, int, Iterator[list[Any]] | None]:
        """``(epoch, updates done in it, positioned group iterator or None)`` for ``state.global_step``.

        With ``args.ignore_data_skip`` (transformers' rule): the epoch is ``global_step // updates_per_epoch``
        and none of its updates is skipped, so its data starts from its first batch (an iterable dataset's
        passes are not replayed either: its epoch is 0 until ``max_steps``).
        """
        step = self.state.global_step
        if getattr(self.args, "ignore_data_skip", False):
            return step // plan.updates_per_epoch, 0, None
        if has_length(loader):
            epoch, done = divmod(step, plan.updates_per_epoch)
            if done and getattr(loader, "in_order", True) is False and loader.num_workers > 1:
                logger.warning(
                    "resuming at step %d, %d steps into epoch %d, with dataloader_in_order=False: the batches "
                    "trained before the stop came in the order the workers finished them, so the batches "
                    "skipped now (the first ones dispatched) may differ from them by a few", step, done, epoch)
            return epoch, done, None
        # an iterable dataset: replay the passes (an exhausted pass starts the next epoch)
        epoch, remaining = 0, step
        while True:
            groups = self._epoch_groups(loader, epoch, 0)
            consumed = 0
            while consumed < remaining and next(groups, None) is not None:
                consumed += 1
            if consumed == remaining:
                return epoch, consumed, groups
            if consumed == 0:
                return epoch, 0, groups  # empty dataset: the loop reports it
            remaining -= consumed
            epoch += 1
