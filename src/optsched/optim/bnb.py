"""bitsandbytes specifics: 8-bit optimizers keep embedding weights in 32-bit, as transformers does.

Quantizing the optimizer state of an embedding table hurts (rare tokens get few, large updates), so
transformers registers a 32-bit override for every ``nn.Embedding`` weight with bitsandbytes'
``GlobalOptimManager`` after building an 8-bit optimizer. bitsandbytes applies the override on the
first ``step()`` by matching parameter identity, then keeps it by (group, index) and by ``id()`` in
the process-wide manager.

That manager never forgets: the registered modules stay referenced for the life of the process (an
embedding table per optimizer built, in a sweep), and the (group, index) entries apply to whatever
parameter a later 8-bit optimizer has at that position. optsched applies the override at once
(``check_overrides``, what the first step would do), drops its module references from the manager,
and removes its entries when the optimizer is garbage-collected.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["is_bnb_8bit", "keep_embeddings_32bit"]

logger = logging.getLogger(__name__)


def is_bnb_8bit(optimizer_cls: Any, kwargs: Mapping[str, Any]) -> bool:
    """transformers' test: a bitsandbytes class built with ``optim_bits=8``."""
    module = getattr(optimizer_cls, "__module__", "") or ""
    return module.split(".")[0] == "bitsandbytes" and kwargs.get("optim_bits") == 8


def keep_embeddings_32bit(optimizer: Any, optimizer_cls: Any, kwargs: Mapping[str, Any], model: nn.Module) -> int:
    """Keep the optimizer state of every ``nn.Embedding`` weight of ``model`` in 32-bit, in ``optimizer``.

    Does nothing unless :func:`is_bnb_8bit`. The override is bitsandbytes' own (a 32-bit
    ``optim_bits`` for those parameters, as transformers registers it), mapped to ``optimizer``'s
    parameters now; the manager keeps no reference to ``model``'s modules, and the entries go when
    ``optimizer`` does.

    Returns:
        The number of embedding elements kept in 32-bit (each shared tensor counted once).
    """
    if not is_bnb_8bit(optimizer_cls, kwargs):
        return 0
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    config = {"optim_bits": 32}  # one object: identifies this optimizer's entries in the manager
    triples = manager.module_weight_config_triple
    first = len(triples)
    kept: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            kept[module.weight.data_ptr()] = module.weight.numel()
            manager.register_module_override(module, "weight", config)
            logger.debug("bitsandbytes: will optimize %s in fp32", module)
    if len(triples) > first and callable(getattr(optimizer, "check_overrides", None)):
        optimizer.check_overrides()  # what the first step() does; that one then finds nothing of ours
        del triples[first:]  # no reference to the model's modules stays in the process-wide manager
        weakref.finalize(optimizer, _forget, manager, config)
    total = sum(kept.values())
    logger.info("bitsandbytes 8-bit: %.3fM embedding parameters kept in 32-bit", total / 2**20)
    return total


def _forget(manager: Any, config: dict[str, Any]) -> None:
    """Remove the manager's entries that hold ``config`` (an optimizer's, once it is gone): a later
    optimizer's parameter at the same (group, index), or with a recycled ``id()``, must not inherit them."""
    for table in (manager.index2config, manager.pid2config):
        for key in [k for k, v in table.items() if v is config]:
            del table[key]
