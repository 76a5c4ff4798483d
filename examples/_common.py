"""What the seed's examples share: a small model built in code in place of the hub checkpoint, a
small synthetic ``train_dataset``, and the folder the examples write into.

* ``OUTPUT_ROOT``: the environment variable ``OPTSCHED_EXAMPLES_DIR`` if set, else a fresh temporary
  folder; the seed's ``output_dir="./results"`` becomes ``f"{OUT}/results"``, so nothing is written
  into the repository.
* ``build_classifier()``: a tiny ``BertForSequenceClassification`` (transformers' ``BertConfig``, random
  weights) when transformers is installed, else optsched's demo model, which has the same layout
  (a ``bert`` backbone with ``LayerNorm`` modules, a ``classifier`` head), so the seed's
  ``"bert" in n`` and ``no_decay`` lists mean the same thing for both.
* ``build_causal_lm()``: a tiny ``GPT2LMHeadModel`` (``GPT2Config``), else the demo model.
* ``build_train_dataset(n)``: ``n`` synthetic sequences (optsched.demo's "majority" task) as a
  map-style dataset of ``{"input_ids", "labels"}``; ``build_lm_dataset(n)`` the same sequences with
  ``labels = input_ids`` for causal language modelling.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import torch

from optsched.demo import SyntheticSequenceDataset, build_dataset, build_model

VOCAB_SIZE = 99
SEQ_LEN = 15
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _output_root() -> str:
    root = os.environ.get("OPTSCHED_EXAMPLES_DIR")
    if root:
        os.makedirs(root, exist_ok=True)
        return root
    return tempfile.mkdtemp(prefix="optsched-examples-")


OUT = _output_root()


def build_classifier(num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny sequence classifier with BERT's parameter names."""
    torch.manual_seed(seed)
    if HAS_TRANSFORMERS:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                            vocab_size=VOCAB_SIZE, max_position_embeddings=64, num_labels=num_labels)
        return BertForSequenceClassification(config)
    return build_model(vocab_size=VOCAB_SIZE, num_labels=num_labels)


def build_causal_lm(seed: int = 0) -> torch.nn.Module:
    """A tiny causal language model (GPT-2's layout when transformers is installed)."""
    torch.manual_seed(seed)
    if HAS_TRANSFORMERS:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=VOCAB_SIZE,
                            bos_token_id=VOCAB_SIZE - 1, eos_token_id=VOCAB_SIZE - 1)
        return GPT2LMHeadModel(config)
    return build_model(vocab_size=VOCAB_SIZE)


def build_train_dataset(num_examples: int = 64, seed: int = 0) -> SyntheticSequenceDataset:
    """``num_examples`` labelled synthetic sequences (``{"input_ids", "labels"}`` items)."""
    return build_dataset(num_examples, task="majority", seq_len=SEQ_LEN, vocab_size=VOCAB_SIZE, seed=seed)


class LanguageModelingDataset(torch.utils.data.Dataset):
    """Token sequences whose labels are the inputs themselves (the model shifts them)."""

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


def build_lm_dataset(num_examples: int = 64, seed: int = 0) -> torch.utils.data.Dataset:
    """``num_examples`` synthetic sequences for causal LM training (the demo model when transformers
    is missing takes classification labels instead)."""
    data = build_train_dataset(num_examples, seed)
    return LanguageModelingDataset(data.input_ids) if HAS_TRANSFORMERS else data
