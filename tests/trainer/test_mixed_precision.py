"""float32_outputs (optsched.trainer.mixed_precision): the model's outputs under autocast, as accelerate's
convert_to_fp32 gives them to transformers' Trainer."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from optsched.trainer.mixed_precision import float32_outputs

transformers = pytest.importorskip("transformers")


def test_half_tensors_become_float32_in_every_container_as_accelerate_makes_them():
    from accelerate.utils import convert_to_fp32
    from transformers.modeling_outputs import CausalLMOutputWithPast

    logits = torch.randn(2, 3, 5).to(torch.bfloat16)
    loss = torch.tensor(1.5)
    Pair = namedtuple("Pair", "a b")
    cache = object()
    outputs = [
        CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache),
        (loss, logits.half(), [logits, torch.arange(3)]),
        {"logits": logits, "pair": Pair(logits, 7)},
        logits,
    ]
    for output in outputs:
        ours, theirs = float32_outputs(output), convert_to_fp32(output)
        assert type(ours) is type(theirs) is type(output)
        flat_ours, flat_theirs = _leaves(ours), _leaves(theirs)
        assert len(flat_ours) == len(flat_theirs) > 0
        for a, b in zip(flat_ours, flat_theirs):
            if isinstance(b, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b) and a.dtype != torch.bfloat16
            else:
                assert a is b  # a cache object, a number: left as they are
    ours = float32_outputs(outputs[0])
    assert ours.loss is loss and ours.past_key_values is cache and ours.logits.dtype == torch.float32


def _leaves(value):
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    if hasattr(value, "items"):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]
