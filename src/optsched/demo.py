"""A tiny transformer classifier and synthetic sequence tasks, built in code (nothing downloaded).

This is the model behind ``optsched demo``, the seed's examples when transformers is not installed,
and the Trainer-overhead benchmark. It is small enough to train on two CPU cores in seconds and has
every kind of parameter a parameter-group policy has to classify:

* embeddings (``bert.embeddings.word_embeddings.weight``, ``...position_embeddings.weight``),
* LayerNorm weights and biases (``...LayerNorm.weight`` / ``.bias``, named as in HF's BERT so the
  seed's ``no_decay = ["bias", "LayerNorm.weight", "LayerNorm.bias"]`` means what it says),
* attention projections with biases (``...attention.self.query`` / ``key`` / ``value``,
  ``...attention.output.dense``),
* MLP weights and biases (``...intermediate.dense``, ``...output.dense``),
* a pooler and a classification head (``bert.pooler.dense``, ``classifier``).

The backbone is the attribute ``bert`` (HF's ``BertForSequenceClassification`` layout), so grouping
code written for BERT (``"bert" in name``) separates backbone from head here too.

``model(input_ids, labels=None)`` returns a :class:`ModelOutput`: a ``dict`` with attribute access,
holding ``logits`` and, when ``labels`` are given, the cross-entropy ``loss`` (what HF models return,
so both transformers' and optsched's Trainer read the loss from it).

Synthetic tasks live in the registry :data:`TASKS` (name -> label function); :func:`build_dataset`
draws balanced examples from one of them as a map-style dataset of ``{"input_ids", "labels"}`` dicts.

Example:
    >>> model = build_model()
    >>> data = build_dataset(num_examples=8)
    >>> out = model(**default_collate([data[i] for i in range(8)]))
    >>> sorted(out), tuple(out.logits.shape)
    (['logits', 'loss'], (8, 2))

``optsched plan --model optsched.demo:build_model`` uses :func:`build_model` as a factory: it needs no
arguments.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data import default_collate  # noqa: F401 - used by the module docstring's example

from optsched._validation import check_choice, check_int, check_number

__all__ = [
    "TASKS",
    "DemoConfig",
    "ModelOutput",
    "SyntheticSequenceDataset",
    "TinyBertForSequenceClassification",
    "build_dataset",
    "build_model",
    "evaluate_accuracy",
    "register_task",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Sizes of :class:`TinyBertForSequenceClassification` (defaults: ~30k parameters).

    Attributes:
        vocab_size: number of token ids; inputs must lie in ``[0, vocab_size)``.
        max_position_embeddings: longest sequence the position table covers.
        hidden_size: model width; must be divisible by ``num_attention_heads``.
        num_hidden_layers: transformer blocks (post-LayerNorm, as BERT).
        num_attention_heads: heads per attention layer.
        intermediate_size: MLP width.
        num_labels: classes of the head.
        dropout: dropout after attention and MLP (0 keeps runs bitwise reproducible without RNG use).

    Not frozen: trainers set attributes on a model's config (transformers' sets ``use_cache``).
    """

    vocab_size: int = 16
    max_position_embeddings: int = 32
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 64
    num_labels: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "num_attention_heads",
                     "intermediate_size"):
            check_int(name, getattr(self, name), low=1)
        check_int("num_hidden_layers", self.num_hidden_layers, low=0)
        check_int("num_labels", self.num_labels, low=2)
        check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size!r} is not divisible by "
                f"num_attention_heads={self.num_attention_heads!r}; accepted: a multiple of the head count."
            )


class ModelOutput(dict):
    """What the model returns: a ``dict`` (``out["loss"]``) with attribute access (``out.loss``).

    ``loss`` is ``None`` as an attribute and absent as a key when no labels were given, as in HF's
    ``ModelOutput``.
    """

    @property
    def loss(self) -> torch.Tensor | None:
        return self.get("loss")

    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]


class _Embeddings(nn.Module):
    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size)  # noqa: N815 - HF's name, matched by no_decay lists

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class _SelfAttention(nn.Module):
    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, H*D) -> (B, H, L, D)
            return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(heads(self.query(hidden)), heads(self.key(hidden)),
                                                 heads(self.value(hidden)))
        return context.transpose(1, 2).reshape(batch, length, width)


class _DenseResidual(nn.Module):
    """``LayerNorm(residual + dropout(dense(x)))``: BERT's post-norm output sub-block."""

    def __init__(self, in_features: int, config: DemoConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size)  # noqa: N815
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class _Attention(nn.Module):
    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(config)
        self.output = _DenseResidual(config.hidden_size, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden), hidden)


class _Intermediate(nn.Module):
    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))


class _Layer(nn.Module):
    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _DenseResidual(config.intermediate_size, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden)
        return self.output(self.intermediate(hidden), hidden)


class _Encoder(nn.Module):
    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden)
        return hidden


class _Pooler(nn.Module):
    """Mean over positions, then ``tanh(dense(.))``. (BERT pools the first token; the mean makes the
    counting tasks learnable in fewer steps.)"""

    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden.mean(dim=1)))


class _Backbone(nn.Module):
    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = _Pooler(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.encoder(self.embeddings(input_ids)))


class TinyBertForSequenceClassification(nn.Module):
    """A BERT-shaped sequence classifier small enough for CPU demos and tests.

    Args:
        config: sizes; defaults to :class:`DemoConfig` ``()``.

    ``forward(input_ids, labels=None, **kwargs)`` takes ``input_ids`` of shape ``(batch, length)``
    with ``length <= config.max_position_embeddings`` and returns a :class:`ModelOutput` with
    ``logits`` ``(batch, num_labels)`` and, when ``labels`` ``(batch,)`` are given, the mean
    cross-entropy ``loss``. Extra keyword arguments (``attention_mask``, ``num_items_in_batch``,
    ...) are accepted and ignored: every sequence has the full length, nothing is padded.
    """

    def __init__(self, config: DemoConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else DemoConfig()
        if not isinstance(self.config, DemoConfig):
            raise TypeError(f"config must be a DemoConfig, got {type(self.config).__name__}.")
        self.bert = _Backbone(self.config)
        self.dropout = nn.Dropout(self.config.dropout)
        self.classifier = nn.Linear(self.config.hidden_size, self.config.num_labels)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> ModelOutput:
        if input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has length {input_ids.shape[-1]}, longer than "
                f"max_position_embeddings={self.config.max_position_embeddings}; accepted: a length up to it."
            )
        logits = self.classifier(self.dropout(self.bert(input_ids)))
        out = ModelOutput(logits=logits)
        if labels is not None:
            # transformers' loss (fixed_cross_entropy): with the step's label count from the Trainer
            # (num_items_in_batch), the sum over this batch divided by it, so that under gradient
            # accumulation each example weighs the same; else the batch mean.
            num_items = kwargs.get("num_items_in_batch")
            if num_items is None:
                out["loss"] = F.cross_entropy(logits, labels)
            else:
                out["loss"] = F.cross_entropy(logits, labels, reduction="sum") / num_items
        return out


def build_model(**config: Any) -> TinyBertForSequenceClassification:
    """The demo model; keyword arguments override :class:`DemoConfig` fields.

    Usable as a factory with no arguments (``optsched plan --model optsched.demo:build_model``).
    Parameters are initialised from torch's global RNG: seed it first for a reproducible model.

    Raises:
        ValueError: an unknown field name (with a "did you mean") or a bad size.
    """
    known = [f.name for f in fields(DemoConfig)]
    for key in config:
        check_choice("build_model() keyword", key, known, what="DemoConfig field")
    return TinyBertForSequenceClassification(DemoConfig(**config))


# --------------------------------------------------------------------------------------------------
# synthetic tasks
# --------------------------------------------------------------------------------------------------

# A task draws ``num_examples`` token sequences and their labels:
#   fn(num_examples, seq_len, vocab_size, generator) -> (input_ids LongTensor[N, L], labels LongTensor[N])
# with both labels equally frequent (up to one example), so chance accuracy is 50%.
TaskFn = Callable[[int, int, int, torch.Generator], "tuple[torch.Tensor, torch.Tensor]"]

TASKS: dict[str, TaskFn] = {}


def register_task(name: str) -> Callable[[TaskFn], TaskFn]:
    """Decorator adding a task function to :data:`TASKS` under ``name``."""

    def add(fn: TaskFn) -> TaskFn:
        if name in TASKS:
            raise ValueError(f"task name {name!r} is already registered; accepted: a new name.")
        TASKS[name] = fn
        return fn

    return add


def _balanced_labels(num_examples: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.arange(num_examples) % 2
    return labels[torch.randperm(num_examples, generator=generator)]


@register_task("majority")
def majority_task(num_examples: int, seq_len: int, vocab_size: int, generator: torch.Generator):
    """Label 1 iff tokens from the upper half of the vocabulary (``id >= vocab_size // 2``) are the
    strict majority. ``seq_len`` should be odd to rule out ties; an even length labels a tie 0.

    Sequences are drawn so that the upper-half count is near the middle (the hard cases), which a
    bag-of-tokens model learns within a few hundred steps.
    """
    labels = _balanced_labels(num_examples, generator)
    half = vocab_size // 2
    majority = seq_len // 2 + 1
    # upper-half count: just above the middle for label 1, just below for label 0
    offset = torch.randint(0, max(1, seq_len // 4), (num_examples,), generator=generator)
    count = torch.where(labels == 1, majority + offset, seq_len - majority - offset).clamp(0, seq_len)
    upper = torch.randint(half, vocab_size, (num_examples, seq_len), generator=generator)
    lower = torch.randint(0, half, (num_examples, seq_len), generator=generator)
    order = torch.rand(num_examples, seq_len, generator=generator).argsort(dim=1)
    use_upper = order < count[:, None]  # exactly `count` random positions per row
    input_ids = torch.where(use_upper, upper, lower)
    return input_ids, (use_upper.sum(dim=1) >= majority).long()


@register_task("marker")
def marker_task(num_examples: int, seq_len: int, vocab_size: int, generator: torch.Generator):
    """Label 1 iff token id 0 (the marker) occurs anywhere in the sequence."""
    labels = _balanced_labels(num_examples, generator)
    input_ids = torch.randint(1, vocab_size, (num_examples, seq_len), generator=generator)
    where = torch.randint(0, seq_len, (num_examples,), generator=generator)
    rows = torch.nonzero(labels == 1).flatten()
    input_ids[rows, where[rows]] = 0
    return input_ids, (input_ids == 0).any(dim=1).long()


class SyntheticSequenceDataset(Dataset):
    """A map-style dataset of ``{"input_ids": LongTensor[seq_len], "labels": LongTensor[]}`` items.

    Args:
        input_ids: ``(N, seq_len)`` token ids.
        labels: ``(N,)`` class ids.
    """

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        if input_ids.ndim != 2 or labels.shape != input_ids.shape[:1]:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} and labels of shape {tuple(labels.shape)} "
                "do not match; accepted: (N, seq_len) and (N,)."
            )
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def build_dataset(
    num_examples: int = 1024,
    *,
    task: str = "majority",
    seq_len: int = 15,
    vocab_size: int = 16,
    seed: int = 0,
) -> SyntheticSequenceDataset:
    """Draw a balanced synthetic dataset; the same arguments always give the same data.

    Args:
        num_examples: number of items (>= 1).
        task: a name in :data:`TASKS` (``"majority"``, ``"marker"``).
        seq_len: tokens per sequence (>= 2; must not exceed the model's ``max_position_embeddings``).
        vocab_size: tokens are drawn from ``[0, vocab_size)`` (>= 4 ; match the model's).
        seed: seeds a private generator (torch's global RNG is left untouched); use different seeds
            for the train and eval splits.

    Raises:
        ValueError: unknown task (with a "did you mean") or sizes out of range.
    """
    check_int("num_examples", num_examples, low=1)
    check_choice("task", task, TASKS, what="task")
    check_int("seq_len", seq_len, low=2)
    check_int("vocab_size", vocab_size, low=4)
    check_int("seed", seed)
    generator = torch.Generator().manual_seed(seed)
    input_ids, labels = TASKS[task](num_examples, seq_len, vocab_size, generator)
    return SyntheticSequenceDataset(input_ids, labels)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: SyntheticSequenceDataset, batch_size: int = 256) -> float:
    """Fraction of ``dataset`` classified correctly (argmax of the logits); the model's train/eval
    mode is restored afterwards."""
    check_int("batch_size", batch_size, low=1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    try:
        for start in range(0, len(dataset), batch_size):
            ids = dataset.input_ids[start:start + batch_size].to(device)
            labels = dataset.labels[start:start + batch_size].to(device)
            correct += (model(input_ids=ids).logits.argmax(dim=-1) == labels).sum().item()
    finally:
        model.train(was_training)
    return correct / len(dataset)


def chance_loss(num_labels: int = 2) -> float:
    """Cross-entropy of a uniform guess, ``ln(num_labels)``: where the loss starts."""
    return math.log(num_labels)
