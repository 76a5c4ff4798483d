"""bitsandbytes specifics: 8-bit optimizers keep embedding weights in 32-bit, as transformers does.

Quantizing the optimizer state of an embedding table hurts (rare tokens get few, large updates), so
transformers registers a 32-bit override for every ``nn.Embedding`` weight with bitsandbytes'
``GlobalOptimManager`` after building an 8-bit optimizer. bitsandbytes applies the override on the
first ``step()`` by matching parameter identity.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["is_bnb_8bit", "keep_embeddings_32bit"]

logger = logging.getLogger(__name__)


def is_bnb_8bit(optimizer_cls: Any, kwargs: Mapping[str, Any]) -> bool:
    """transformers' test: a bitsandbytes class built with ``optim_bits=8``."""
    module = getattr(optimizer_cls, "__module__", "") or ""
    return module.split(".")[0] == "bitsandbytes" and kwargs.get("optim_bits") == 8


def keep_embeddings_32bit(optimizer_cls: Any, kwargs: Mapping[str, Any], model: nn.Module) -> int:
    """Register a 32-bit state override for every ``nn.Embedding`` weight of ``model``.

    Does nothing unless :func:`is_bnb_8bit`. Returns the number of embedding elements kept in
    32-bit (each shared tensor counted once).
    """
    if not is_bnb_8bit(optimizer_cls, kwargs):
        return 0
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    kept: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            kept[module.weight.data_ptr()] = module.weight.numel()
            manager.register_module_override(module, "weight", {"optim_bits": 32})
            logger.debug("bitsandbytes: will optimize %s in fp32", module)
    total = sum(kept.values())
    logger.info("bitsandbytes 8-bit: %.3fM embedding parameters kept in 32-bit", total / 2**20)
    return total
