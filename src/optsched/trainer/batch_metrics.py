"""``batch_eval_metrics=True``: ``compute_metrics`` called on every evaluation batch, transformers' contract.

transformers' ``evaluation_loop`` then calls ``compute_metrics(EvalPrediction(...), compute_result=is_last)``
after each batch that has logits and labels, with the batch's torch tensors (on the device, after
``preprocess_logits_for_metrics``), ``compute_result=True`` for the last batch, and uses what the last
call returned as the metrics; ``evaluate()`` keeps no prediction (``predict()`` still does). With
``include_for_metrics``, ``eval_pred.inputs`` is the whole batch (a mapping: transformers passes the batch
there, where the collected ``inputs`` of an ordinary evaluation are the main input only) and
``eval_pred.losses`` the batch's loss once per sample.

Under DDP every process calls ``compute_metrics`` with the same step's batches of all processes, joined in
the dataset's order (transformers gathers each step too): the processes step together (:func:`lockstep_batches`),
one with no batch left taking part with none. Here the whole batch in ``eval_pred.inputs`` is gathered with
the predictions (its tensors; other values are this process's), where transformers passes each process's
own batch beside the gathered predictions, which no metric can pair.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from optsched.trainer.distributed import all_reduce_sum
from optsched.trainer.predictions import (
    PADDING_INDEX,
    EvalPrediction,
    _nested_interleave,
    checked_metrics,
    nested_numpify,
)

__all__ = ["BatchMetrics", "check_compute_result_parameter", "gather_step", "lockstep_batches"]

_END = object()


def check_compute_result_parameter(compute_metrics: Callable[..., Any]) -> None:
    """transformers' check at construction: with ``batch_eval_metrics``, ``compute_metrics`` must have a
    parameter named ``compute_result``.

    Raises:
        ValueError: it has none (``**kwargs`` does not count, as in transformers).
    """
    try:
        params = inspect.signature(compute_metrics).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call decide
        return
    if "compute_result" not in params:
        name = getattr(compute_metrics, "__qualname__", type(compute_metrics).__name__)
        raise ValueError(
            f"batch_eval_metrics=True calls compute_metrics(eval_pred, compute_result=...) after every eval batch "
            f"(compute_result=True after the last one, whose return gives the metrics), but compute_metrics ({name}) "
            "has no compute_result parameter. Accepted: def compute_metrics(eval_pred, compute_result=False) that "
            "accumulates statistics and returns the metrics when compute_result is True, or batch_eval_metrics=False."
        )


def lockstep_batches(batches: Iterable[Any], ctx: Any, device: torch.device) -> Iterator[tuple[Any, bool]]:
    """``(batch, is_last)`` for each evaluation step, ``is_last`` True on the last step of every process.

    One process: the loader's batches, read one ahead to know which is the last (transformers'
    ``end_of_dataloader``). Under DDP every process makes as many steps as the one with the most batches
    (one with none left gets ``None``), since each step's batches are gathered; two flags are summed over
    the processes per step.
    """
    it = iter(batches)
    current = next(it, _END)
    while True:
        following = _END if current is _END else next(it, _END)
        have, more = current is not _END, following is not _END
        if getattr(ctx, "enabled", False):
            flags = all_reduce_sum(torch.tensor([float(have), float(more)], device=device), ctx)
            have, more = bool(flags[0] > 0), bool(flags[1] > 0)
        if not have:
            return
        yield (None if current is _END else current), not more
        current = following


def _dtypes(value: Any) -> Any:
    """The structure of ``value`` with each tensor replaced by its dtype (other leaves by None)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_dtypes(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _dtypes(v) for k, v in value.items()}
    return value.dtype if isinstance(value, torch.Tensor) else None


def _as_tensors(value: Any, dtypes: Any, device: torch.device) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(_as_tensors(v, d, device) for v, d in zip(value, dtypes))
    if isinstance(value, Mapping):
        return {k: _as_tensors(v, dtypes[k], device) for k, v in value.items()}
    # numpy has no bfloat16: nested_numpify made it float32, which holds it exactly
    return torch.from_numpy(value).to(device=device, dtype=dtypes) if dtypes is not None else value


def gather_step(value: Any, ctx: Any, device: torch.device) -> Any:
    """One step's tensors (in tuples / dicts) of every process, joined in the dataset's order, as tensors
    of their dtypes on ``device``; rows of different lengths padded with ``-100``. Identity for one
    process. Collective: every process calls it, one without a batch with ``None``."""
    if not getattr(ctx, "enabled", False):
        return value
    import torch.distributed as dist

    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, None if value is None else (nested_numpify(value), _dtypes(value)))
    dtypes = next((p[1] for p in parts if p is not None), None)
    merged = _nested_interleave([None if p is None else p[0] for p in parts], PADDING_INDEX)
    return _as_tensors(merged, dtypes, device)


class BatchMetrics:
    """The per-batch ``compute_metrics`` calls of one evaluation and the metrics of the last one.

    Args:
        compute_metrics: ``f(eval_pred, compute_result=...) -> metrics``.
        ctx: the Trainer's distributed context (``enabled``, ``world_size``).
        device: where gathered tensors are put (the Trainer's device).
    """

    def __init__(self, compute_metrics: Callable[..., Any], ctx: Any, device: torch.device) -> None:
        self.compute_metrics = compute_metrics
        self.ctx = ctx
        self.device = device
        self._result: Any = None
        self._called = False

    def update(self, logits: Any, labels: Any, batch: Any, losses: Any, is_last: bool) -> None:
        """One step: ``compute_metrics(EvalPrediction(logits, labels, inputs=batch, losses=losses),
        compute_result=is_last)`` when there are logits and labels (over all processes under DDP; every
        process calls this each step). ``batch`` / ``losses`` None: not included."""
        if getattr(self.ctx, "enabled", False):
            tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)} if isinstance(batch, Mapping) else batch
            logits, labels, gathered, losses = gather_step((logits, labels, tensors, losses), self.ctx, self.device)
            batch = {**batch, **gathered} if isinstance(batch, Mapping) and gathered is not None else gathered
        if logits is None or labels is None:
            return
        prediction = EvalPrediction(predictions=logits, label_ids=labels, inputs=batch, losses=losses)
        self._result = self.compute_metrics(prediction, compute_result=is_last)
        self._called = True

    def metrics(self) -> dict[str, Any]:
        """What the last call returned, checked and JSON-plain; ``{}`` when there was no call (no labels).

        Raises:
            TypeError: the last call returned no mapping of metric names.
        """
        return checked_metrics(self.compute_metrics, self._result) if self._called else {}
