"""Predictions collected for ``compute_metrics`` and ``predict()``, with transformers' Trainer semantics.

What transformers' ``trainer_utils`` / ``trainer_pt_utils`` / ``Trainer.prediction_step`` do, rewritten
without importing transformers:

* :class:`EvalPrediction` (``preds, labels = eval_pred``; ``inputs`` and ``losses`` after them with
  ``include_for_metrics``: :func:`batch_main_input`, :func:`sample_losses`) and :class:`PredictionOutput`;
* :func:`logits_from_outputs`: the model outputs other than ``loss`` (and ``ignore_keys``, checked by
  :func:`check_ignore_keys`), one tensor or a tuple of them;
* :func:`nested_concat`: batches concatenated on the first dimension, a different second dimension
  (sequence length) padded with ``-100``;
* :func:`gather_in_dataset_order`: under DDP the eval loader gives rank ``r`` the samples ``r, r + N,
  ...`` (each once, no padding; see :class:`~optsched.trainer.data.EpochSampler`), so the ranks'
  arrays are interleaved back into the dataset's order;
* ``eval_do_concat_batches=False``: lists of per-batch arrays instead, under DDP one entry per step with
  every process's batch of that step (:func:`gather_batches_in_dataset_order`);
* :func:`denumpify_detensorize` and :func:`prefix_metrics` for the returned metrics.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "EvalPrediction",
    "PredictionCollector",
    "PredictionOutput",
    "batch_labels",
    "batch_main_input",
    "check_ignore_keys",
    "checked_metrics",
    "denumpify_detensorize",
    "find_labels",
    "gather_batches_in_dataset_order",
    "gather_in_dataset_order",
    "logits_from_outputs",
    "nested_concat",
    "nested_numpify",
    "prefix_metrics",
    "run_compute_metrics",
    "sample_losses",
]

#: transformers' padding index for predictions / labels of different lengths
PADDING_INDEX = -100


class EvalPrediction:
    """What ``compute_metrics`` receives: ``predictions`` and ``label_ids`` (numpy arrays, or tuples of
    them), as transformers' ``EvalPrediction``; iterating or indexing gives ``(predictions, label_ids)``
    (plus ``inputs`` / ``losses`` when given), so ``preds, labels = eval_pred`` works."""

    def __init__(self, predictions: Any, label_ids: Any, inputs: Any = None, losses: Any = None) -> None:
        self.predictions = predictions
        self.label_ids = label_ids
        self.inputs = inputs
        self.losses = losses
        self.elements: tuple[Any, ...] = (predictions, label_ids)
        if inputs is not None:
            self.elements += (inputs,)
        if losses is not None:
            self.elements += (losses,)

    def __iter__(self):
        return iter(self.elements)

    def __getitem__(self, idx: int) -> Any:
        if idx < 0 or idx >= len(self.elements):
            raise IndexError("tuple index out of range")
        return self.elements[idx]

    def __len__(self) -> int:
        return len(self.elements)

    def __repr__(self) -> str:
        shapes = [getattr(e, "shape", type(e).__name__) for e in self.elements]
        return f"EvalPrediction(shapes={shapes})"


class PredictionOutput(NamedTuple):
    """What ``Trainer.predict()`` returns (transformers' fields): numpy ``predictions``, ``label_ids``
    (``None`` when the data had no labels) and ``metrics``."""

    predictions: Any
    label_ids: Any
    metrics: dict[str, float] | None


# ---- labels and logits of one batch --------------------------------------------------------------------


def find_labels(model: Any) -> list[str]:
    """The label argument names of the model's ``forward``, transformers' ``find_labels`` rule: the
    parameters whose name contains ``"label"`` (``start_positions`` / ``end_positions`` too for a
    question-answering class). A forward without such a name (``forward(**kwargs)``) gives
    ``["labels"]``, the key optsched's batches use (transformers would find none and compute no loss)."""
    cls = type(model)
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # a builtin / C forward: no signature to read
        return ["labels"]
    if "QuestionAnswering" in cls.__name__:
        names = [p for p in params if "label" in p or p in ("start_positions", "end_positions")]
    else:
        names = [p for p in params if "label" in p]
    return names or ["labels"]


def batch_labels(batch: Any, label_names: list[str]) -> Any:
    """The labels of a batch, detached: for a mapping, its ``label_names`` values (one tensor for one
    name, a tuple for several), ``None`` unless all are present and not None (transformers' rule); for a
    list / tuple batch of 2+ items, its last item (optsched's convention, see
    :func:`~optsched.trainer.data.split_model_inputs`); otherwise ``None``."""
    if isinstance(batch, Mapping):
        if not label_names or any(batch.get(k) is None for k in label_names):
            return None
        labels = tuple(_detach(batch[k]) for k in label_names)
        return labels[0] if len(labels) == 1 else labels
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return _detach(batch[-1])
    return None


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


def logits_from_outputs(outputs: Any, ignore_keys: list[str], has_loss: bool) -> Any:
    """The predictions in a model's outputs, as transformers' ``prediction_step`` takes them.

    A mapping (a transformers ``ModelOutput`` is one): its values except ``loss`` and ``ignore_keys``,
    in order. A tuple / list: the items after the first when the first is the loss (``has_loss``), else
    all. A tensor: itself. Non-tensor values (a cache object) are left out. One value gives that tensor,
    several a tuple, none ``None``.
    """
    if isinstance(outputs, Mapping) or (hasattr(outputs, "keys") and hasattr(outputs, "items")):
        values = tuple(v for k, v in outputs.items() if k not in ignore_keys and k != "loss")
    elif isinstance(outputs, (tuple, list)):
        values = tuple(outputs[1:] if has_loss else outputs)
    else:
        values = (outputs,)
    values = tuple(_detach(v) for v in values if isinstance(v, (torch.Tensor, tuple, list)))
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# ---- concatenation and gathering ------------------------------------------------------------------------


def _pad_and_concatenate(a: np.ndarray, b: np.ndarray, padding_index: int = PADDING_INDEX) -> np.ndarray:
    """``a`` and ``b`` on their first dimension; when their second dimension differs both are padded on
    the right with ``padding_index`` to the larger one (0- and 1-dimensional arrays: plain
    concatenation; 0-dimensional ones are first made 1-dimensional, as transformers' ``atleast_1d``)."""
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    if a.ndim == 1 or a.shape[1:] == b.shape[1:]:
        return np.concatenate((a, b), axis=0)
    shape = (a.shape[0] + b.shape[0], max(a.shape[1], b.shape[1])) + a.shape[2:]
    result = np.full(shape, padding_index, dtype=np.result_type(a, b))
    result[: a.shape[0], : a.shape[1]] = a
    result[a.shape[0] :, : b.shape[1]] = b
    return result


def nested_concat(a: Any, b: Any, padding_index: int = PADDING_INDEX) -> Any:
    """``a`` and ``b`` (numpy arrays, tensors, or tuples / lists / dicts of them) concatenated on the
    first dimension, padded with ``padding_index`` where the second dimensions differ (transformers'
    ``nested_concat``); ``a`` None gives ``b``. Tensors come back as numpy arrays.

    Raises:
        TypeError: ``a`` and ``b`` of different structures, or a leaf that is not an array / tensor.
    """
    if a is None:
        return nested_numpify(b)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            raise TypeError(f"nested_concat: cannot join a {type(a).__name__} of {len(a)} with {type(b).__name__} {b!r:.80}.")
        return type(a)(nested_concat(x, y, padding_index) for x, y in zip(a, b))
    if isinstance(a, Mapping):
        return type(a)({k: nested_concat(v, b[k], padding_index) for k, v in a.items()})
    a, b = nested_numpify(a), nested_numpify(b)
    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
        raise TypeError(
            f"nested_concat: accepted leaves are numpy arrays and tensors, got {type(a).__name__} and {type(b).__name__}."
        )
    return _pad_and_concatenate(a, b, padding_index)


def nested_numpify(value: Any) -> Any:
    """Tensors (in tuples / lists / dicts) as numpy arrays on the CPU; bfloat16 becomes float32 (numpy has no
    bfloat16), float16 stays float16 (transformers' rules both). Anything else is returned as is."""
    if isinstance(value, (list, tuple)):
        return type(value)(nested_numpify(v) for v in value)
    if isinstance(value, Mapping):
        return type(value)({k: nested_numpify(v) for k, v in value.items()})
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        return t.numpy()
    return value


def _interleave(parts: list[np.ndarray], padding_index: int) -> np.ndarray:
    """Rank ``r``'s rows are the dataset's rows ``r, r + N, ...``: put them back in the dataset's order.
    The second dimensions are padded to the largest with ``padding_index`` first (ranks' sequence
    lengths may differ); a rank with no row contributes nothing."""
    parts = [np.atleast_1d(p) for p in parts]
    total = sum(p.shape[0] for p in parts)
    nonempty = [p for p in parts if p.shape[0]]
    if not nonempty:
        return parts[0]
    ref = nonempty[0]
    shape = (total,) + ref.shape[1:]
    if ref.ndim > 1:
        shape = (total, max(p.shape[1] for p in nonempty)) + ref.shape[2:]
    out = np.full(shape, padding_index, dtype=np.result_type(*nonempty)) if ref.ndim > 1 else np.empty(
        shape, dtype=np.result_type(*nonempty)
    )
    world = len(parts)
    for r, p in enumerate(parts):
        if p.shape[0]:
            rows = np.arange(r, r + world * p.shape[0], world)
            if p.ndim > 1:
                out[rows, : p.shape[1]] = p
            else:
                out[rows] = p
    return out


def _per_sample(value: list[Any], objects: bool) -> bool:
    """Whether a list holds one object per sample (gathered item by item) rather than one array per output
    or layer (gathered position by position, as transformers' tensor gather does): with ``objects``
    (``eval_use_gather_object``) every list, as transformers' object gather takes it; without, a list
    holding anything but arrays (a detection collator's dict of classes and boxes per image)."""
    return objects or any(not isinstance(v, np.ndarray) for v in value)


def _nested_interleave(parts: list[Any], padding_index: int, objects: bool = False) -> Any:
    """:func:`_interleave` leaf by leaf; a rank's ``None`` (no sample, or no such value) contributes nothing.
    A list of one object per sample (:func:`_per_sample`) is interleaved item by item instead: rank ``r``'s
    item ``i`` is the dataset's sample ``r + N * i``."""
    first = next((p for p in parts if p is not None), None)
    if first is None:
        return None
    if isinstance(first, list) and any(_per_sample(p, objects) for p in parts if p):
        lists = [p or [] for p in parts]
        return [p[i] for i in range(max(map(len, lists))) for p in lists if i < len(p)]
    if isinstance(first, (list, tuple)):
        return type(first)(_nested_interleave([None if p is None else p[i] for p in parts], padding_index, objects)
                           for i in range(len(first)))
    if isinstance(first, Mapping):
        return type(first)({k: _nested_interleave([None if p is None else p[k] for p in parts], padding_index, objects)
                            for k in first})
    return _interleave([p if p is not None else np.empty((0,) + first.shape[1:], first.dtype) for p in parts],
                       padding_index)


def gather_in_dataset_order(value: Any, ctx: Any, padding_index: int = PADDING_INDEX, objects: bool = False) -> Any:
    """This rank's collected arrays joined with the other ranks', in the dataset's order.

    The eval loader splits the data by striding (rank ``r`` of ``N`` reads samples ``r, r + N, ...``,
    each sample on exactly one rank, shares differing by at most one), so the gathered rows are
    interleaved, not concatenated, and none is counted twice. Identity for one process. Every rank must
    call it (an ``all_gather_object``); a rank with no sample passes ``None``. ``objects``
    (``eval_use_gather_object``): every list is one object per sample (:func:`_per_sample`).
    """
    if not getattr(ctx, "enabled", False):
        return value
    import torch.distributed as dist

    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, value)
    return _nested_interleave(parts, padding_index, objects)


def gather_batches_in_dataset_order(batches: list[Any] | None, ctx: Any, padding_index: int = PADDING_INDEX,
                                    objects: bool = False) -> Any:
    """This rank's per-batch arrays (a list, or ``None`` for none) joined with the other ranks' step by
    step: entry ``k`` holds every rank's ``k``-th batch, its rows in the dataset's order (the eval loader's
    striding puts rank ``r``'s rows at ``r, r + N, ...`` of the step's), second dimensions padded with
    ``padding_index``; a rank with fewer batches adds nothing to the last entries. These are the rows of
    transformers' entry ``k`` (there, each process reads whole consecutive batches and a step's batches are
    gathered). Identity for one process (``None`` then stays ``None``); a collective under DDP. ``objects``:
    as in :func:`gather_in_dataset_order`.
    """
    if not getattr(ctx, "enabled", False):
        return batches
    import torch.distributed as dist

    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, batches or [])
    steps = max(len(p) for p in parts)
    if steps == 0:
        return None
    return [_nested_interleave([p[k] if k < len(p) else None for p in parts], padding_index, objects)
            for k in range(steps)]


class PredictionCollector:
    """Per-batch predictions, labels, and the ``include_for_metrics`` inputs and losses, concatenated as
    they come (:func:`nested_concat`, on the CPU as numpy arrays: the device keeps one batch at a time,
    which is what transformers' ``eval_accumulation_steps=1`` does), or with ``concat=False``
    (``eval_do_concat_batches=False``) kept as a list of per-batch arrays, as transformers'
    ``EvalLoopContainer`` keeps them."""

    #: the collected streams, in :meth:`gathered`'s order
    STREAMS = ("predictions", "label_ids", "inputs", "losses")

    def __init__(self, padding_index: int = PADDING_INDEX, concat: bool = True, objects: bool = False) -> None:
        self.padding_index = padding_index
        self.concat = concat
        self.objects = objects  # eval_use_gather_object: every list is one object per sample
        self.predictions: Any = None
        self.label_ids: Any = None
        self.inputs: Any = None
        self.losses: Any = None

    def add(self, logits: Any, labels: Any, inputs: Any = None, losses: Any = None) -> None:
        """Append one batch; ``None`` (no logits, labels, inputs or losses) is skipped."""
        for name, value in zip(self.STREAMS, (logits, labels, inputs, losses)):
            if value is None:
                continue
            if self.concat:
                setattr(self, name, nested_concat(getattr(self, name), value, self.padding_index))
            else:
                if getattr(self, name) is None:
                    setattr(self, name, [])
                getattr(self, name).append(nested_numpify(value))

    def gathered(self, ctx: Any) -> tuple[Any, Any, Any, Any]:
        """``(predictions, label_ids, inputs, losses)`` over all processes, in dataset order (collective
        under DDP): arrays, or per-batch lists (:func:`gather_batches_in_dataset_order`) without ``concat``."""
        gather = gather_in_dataset_order if self.concat else gather_batches_in_dataset_order
        return tuple(gather(getattr(self, name), ctx, self.padding_index, self.objects) for name in self.STREAMS)


# ---- what include_for_metrics adds --------------------------------------------------------------------


def batch_main_input(batch: Any, main_input_name: str) -> Any:
    """The batch's input that ``include_for_metrics=["inputs"]`` collects, detached: for a mapping, its
    ``main_input_name`` value (transformers' rule: the model's ``main_input_name``, ``"input_ids"`` by
    default); for a list / tuple batch, its first item (the model's first positional input: optsched's
    convention, transformers takes mappings only); any other batch, itself.

    Raises:
        ValueError: a mapping without ``main_input_name`` (transformers raises a bare ``KeyError``).
    """
    if isinstance(batch, Mapping):
        if main_input_name not in batch:
            raise ValueError(
                f"include_for_metrics=['inputs'] collects the batch's {main_input_name!r} (the model's "
                f"main_input_name), which a batch with keys {list(batch)} lacks; accepted: batches with that "
                "key, a model whose main_input_name names one of the keys, or include_for_metrics without 'inputs'."
            )
        return _detach(batch[main_input_name])
    if isinstance(batch, (list, tuple)):
        return _detach(batch[0]) if batch else None
    return _detach(batch)


def sample_losses(loss: torch.Tensor | None, num_samples: int) -> torch.Tensor | None:
    """``include_for_metrics=["loss"]``: the batch's mean loss once per sample (transformers repeats it
    ``eval_batch_size`` times and cuts the last batch to its samples: the same for a dataset with a
    length; for an iterable one its last batch keeps ``eval_batch_size`` entries there, one per sample
    here). ``None`` without a loss."""
    if loss is None:
        return None
    return loss.detach().reshape(()).repeat(num_samples)


def check_ignore_keys(name: str, value: Any) -> list[str] | None:
    """``ignore_keys`` / ``ignore_keys_for_eval``: ``None`` (the model config's
    ``keys_to_ignore_at_inference``) or a list / tuple of output names, returned as a list.

    Raises:
        TypeError: anything else; a single string is refused rather than read as its characters.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(k, str) for k in value):
        return list(value)
    hint = f" (accepted: [{value!r}])" if isinstance(value, str) else ""
    raise TypeError(
        f"{name} must be a list of model output names to leave out of the predictions, or None, got "
        f"{type(value).__name__} {value!r:.80}{hint}."
    )


# ---- metrics -------------------------------------------------------------------------------------------


def denumpify_detensorize(metrics: Any) -> Any:
    """numpy scalars and one-element tensors (in dicts / lists / tuples) made Python numbers, so the
    metrics are JSON-plain (transformers' function). Other values are returned as they are."""
    if isinstance(metrics, (list, tuple)):
        return type(metrics)(denumpify_detensorize(m) for m in metrics)
    if isinstance(metrics, dict):
        return type(metrics)({k: denumpify_detensorize(v) for k, v in metrics.items()})
    if isinstance(metrics, np.generic):
        return metrics.item()
    if isinstance(metrics, torch.Tensor) and metrics.numel() == 1:
        return metrics.item()
    return metrics


def run_compute_metrics(compute_metrics: Callable[[EvalPrediction], Any], prediction: EvalPrediction) -> dict[str, Any]:
    """``compute_metrics(prediction)`` checked and made JSON-plain (a new ``dict``).

    Raises:
        TypeError: it returned something other than a mapping with string keys (``None`` included: a
            function that forgot its ``return``).
    """
    return checked_metrics(compute_metrics, compute_metrics(prediction))


def checked_metrics(compute_metrics: Callable[..., Any], result: Any) -> dict[str, Any]:
    """``compute_metrics``' ``result`` checked and made JSON-plain (a new ``dict``); see
    :func:`run_compute_metrics`."""
    name = getattr(compute_metrics, "__qualname__", type(compute_metrics).__name__)
    if not isinstance(result, Mapping):
        raise TypeError(
            f"compute_metrics ({name}) returned {type(result).__name__} {result!r:.100}; accepted: a mapping "
            "of metric names to values, e.g. {'accuracy': 0.9}."
        )
    bad = [k for k in result if not isinstance(k, str)]
    if bad:
        raise TypeError(f"compute_metrics ({name}) returned non-string metric names {bad!r}; accepted: str keys.")
    return denumpify_detensorize(dict(result))


def prefix_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``metrics`` with every key not already starting with ``<prefix>_`` renamed ``<prefix>_<key>``
    (transformers' rule and order: ``"accuracy"`` -> ``"eval_accuracy"``, ``"eval_f1"`` unchanged; a
    renamed key is moved after the kept ones and replaces a kept key of the same name)."""
    out = dict(metrics)
    start = f"{prefix}_"
    for key in list(out):
        if not key.startswith(start):
            out[start + key] = out.pop(key)
    return out
