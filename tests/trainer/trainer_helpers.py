"""A tiny regression model and its data, built in code (shared by conftest.py and ddp_worker.py), and tiny
transformers models (GPT-2, T5, Llama with tied embeddings, BERT classifier; transformers imported on call)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyRegressor(nn.Module):
    """Linear -> LayerNorm -> dropout -> Linear; returns ``{"loss", "logits"}`` like a HF model."""

    def __init__(self, dropout: float = 0.0, in_features: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x, labels=None):
        pred = self.out(self.drop(torch.relu(self.norm(self.inp(x))))).squeeze(-1)
        out = {"logits": pred}
        if labels is not None:
            out["loss"] = ((pred - labels) ** 2).mean()
        return out


def make_regression_data(n: int = 32, in_features: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = x.sum(-1) + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


# ---- tiny transformers models (no dropout: two Trainers draw their masks from the global RNG at
# different times) ------------------------------------------------------------------------------------


def tiny_gpt2() -> nn.Module:
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


def tiny_t5() -> nn.Module:
    import transformers

    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50, decoder_start_token_id=0,
        dropout_rate=0.0))


def tiny_llama() -> nn.Module:
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=50, tie_word_embeddings=True))


def tiny_bert() -> nn.Module:
    import transformers

    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def masked_lm_data(n: int = 12) -> list[dict[str, torch.Tensor]]:
    """Causal-LM examples of 8 tokens (vocabulary 50) whose labels end in a different number of -100s:
    micro-batches of one step hold different numbers of labels, where a mean of means and the token mean
    differ."""
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(n):
        labels = torch.randint(0, 50, (8,), generator=g)
        labels[2 + i % 6:] = -100
        data.append({"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": labels})
    return data


def padded_lm_data(n: int = 11) -> list[dict[str, torch.Tensor]]:
    """Causal-LM examples of 8 positions whose attention_mask ends in a different number of zeros (padding),
    so that 'all' and 'non_padding' differ and every micro-batch adds a different count."""
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(n):
        mask = torch.ones(8, dtype=torch.long)
        mask[3 + i % 5:] = 0
        labels = torch.randint(0, 50, (8,), generator=g).masked_fill(mask == 0, -100)
        data.append({"input_ids": torch.randint(0, 50, (8,), generator=g), "attention_mask": mask, "labels": labels})
    return data


def varied_length_data(n: int = 23, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Causal-LM examples of 2 to 11 tokens whose first token is their index (``n <= 50``), so a batch's
    ``input_ids[:, 0]`` names its samples (see :func:`record_batches`); labels are the tokens."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        ids = torch.randint(0, 50, (int(torch.randint(2, 12, (), generator=g)),), generator=g)
        ids[0] = i
        data.append({"input_ids": ids, "labels": ids.clone()})
    return data


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pads ``input_ids`` (0, masked out by ``attention_mask``) and ``labels`` (-100) to the longest item."""
    width = max(len(item["input_ids"]) for item in items)
    batch = {"input_ids": torch.zeros(len(items), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(items), width, dtype=torch.long),
             "labels": torch.full((len(items), width), -100)}
    for row, item in enumerate(items):
        size = len(item["input_ids"])
        batch["input_ids"][row, :size] = item["input_ids"]
        batch["attention_mask"][row, :size] = 1
        batch["labels"][row, :size] = item["labels"]
    return batch


def record_batches(model: nn.Module) -> list[list[int]]:
    """The samples of each batch ``model`` is called on, in order (the first tokens of
    :func:`varied_length_data`'s examples), filled in by a forward pre-hook."""
    seen: list[list[int]] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][:, 0].tolist()), with_kwargs=True)
    return seen


class PlainRegressor(nn.Module):
    """``forward(x, labels)``: a linear map of 3 features, mean squared error; no ``**kwargs``, no
    ``num_parameters``: what transformers' Trainer treats as a plain module."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x, labels=None):
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


class PeftStyleWrapper(nn.Module):
    """Stands for peft's PeftModel (peft is not installed here; recognised by its module's name):
    forward(*args, **kwargs) hands everything to the model it wraps, and get_base_model() returns it."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_model = base

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)


PeftStyleWrapper.__module__ = "peft.peft_model"


def leave_torchrun_worker() -> None:
    """The end of a worker run under torchrun: every rank waits at a barrier for the files the ranks write
    (a gloo peer that leaves while the other still holds the connection can abort it, "terminate called
    without an active exception"), then leaves without finalizing: under load about 1 exit in 16 still
    aborts in C++ teardown after destroy_process_group (one of gloo's threads torn down during interpreter
    finalization, SIGABRT), and the work is done and written."""
    import os
    import sys

    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_trainer(kind: str, model: nn.Module, train_dataset, data_collator=None, eval_dataset=None, *,
                 compute_metrics=None, callbacks=None, **fields):
    """optsched's Trainer (``kind="optsched"``) or transformers' (``"hf"``, with ``report_to="none"``) on
    the same model, data, collator, ``compute_metrics``, callbacks and TrainingArguments fields: the two
    sides of a parity test."""
    trainer_kw = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, compute_metrics=compute_metrics,
                      callbacks=callbacks)
    if kind == "hf":
        import transformers

        args = transformers.TrainingArguments(report_to="none", **fields)
        return transformers.Trainer(model, args, data_collator, **trainer_kw)
    from optsched import Trainer, TrainingArguments

    return Trainer(model, TrainingArguments(**fields), data_collator, **trainer_kw)


def run_torchrun(worker: str, *argv: str) -> None:
    """Run ``worker`` (a file beside this one) in 2 processes on the CPU under torchrun (gloo, 127.0.0.1, a
    free port, one thread each); fail with the end of its stderr. Ends by itself: a 240 s timeout."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={port}", str(Path(__file__).parent / worker), *argv,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]


#: the log keys that hold times (never compared)
LOG_TIMES = ("runtime", "per_second", "preparation_time")


def _noisy_log_value(key: str) -> bool:
    """The logged values the two Trainers compute with other float operations, compared to 1e-6: an
    evaluation's loss (optsched averages the batches in float64, transformers the samples' repeated losses in
    float32; ``eval_loss``, ``test_loss``, ``best_metric``). The learning rate is exact (the schedules are
    HF's bit for bit)."""
    return key == "best_metric" or (key.endswith("_loss") and key not in ("loss", "train_loss"))


def assert_same_logs(ours: list[dict], theirs: list[dict], skip: tuple[str, ...] = ()) -> None:
    """The same log entries, keys and values: exact but for the :func:`_noisy_log_value` ones (1e-6) and the times."""
    assert len(ours) == len(theirs), ([sorted(e) for e in ours], [sorted(e) for e in theirs])
    for a, b in zip(ours, theirs):
        a = {k: v for k, v in a.items() if not any(t in k for t in LOG_TIMES) and k not in skip}
        b = {k: v for k, v in b.items() if not any(t in k for t in LOG_TIMES) and k not in skip}
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        for key in a:
            expected = pytest.approx(b[key], rel=1e-6) if _noisy_log_value(key) else b[key]
            assert a[key] == expected, (a.get("step"), key, a[key], b[key])
