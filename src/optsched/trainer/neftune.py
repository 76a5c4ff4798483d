"""``neftune_noise_alpha``: NEFTune (noisy embeddings for fine-tuning), as transformers' Trainer applies it.

With ``alpha = neftune_noise_alpha``, :func:`neftune_noise` hooks the model's input embeddings
(``get_input_embeddings()``; of the model a PEFT wrapper wraps) for the duration of ``train()``: in
training mode their output ``e`` of shape ``(batch, L, d)`` becomes::

    e + U(-m, m),    m = alpha / sqrt(L * d)

one uniform draw per element from the default generator of ``e``'s device, in transformers'
``neftune_post_forward_hook`` arithmetic (``m`` computed in float32), so a run with the same seed draws
the same noise. In eval mode (evaluation, prediction) the embeddings are untouched, and once ``train()``
returns the hook is gone: the model computes what it computed before.

With ``torch.compile`` (``torch_compile``, or a model compiled by the user), the code torch compiled
is discarded (``torch._dynamo.reset()``) when the hook goes on and when it comes off: torch does not
guard compiled code on forward hooks by default (``torch._dynamo.config.skip_nnmodule_hook_guards``), so
code compiled earlier in the process for the same model class would run without the noise, and code
compiled with the hook would go on adding noise after ``train()``. transformers' Trainer has exactly
this bug (a tiny Llama trained with ``torch_compile`` and then with NEFTune in one process gets no
noise); the price here is that other compiled models of the process compile again on their next call.

Differences from transformers, on purpose: the compiled code above; the hook is removed however
``train()`` ends (transformers removes it only when training completes, so an exception leaves a noisy
model behind); and a model without usable input embeddings is refused when the Trainer is built, with a
``ValueError`` naming the field (transformers fails at ``train()`` with an ``AttributeError`` or
``NotImplementedError``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from optsched.trainer.loss_items import innermost_model

__all__ = ["input_embeddings", "neftune_noise", "neftune_post_forward_hook"]

logger = logging.getLogger(__name__)


def neftune_post_forward_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """transformers' forward hook: ``output`` plus uniform noise in ``+-module.neftune_noise_alpha /
    sqrt(L * d)`` while ``module.training``; ``output`` itself in eval mode."""
    if module.training:
        # torch.tensor / torch.sqrt as transformers writes them: the bound is a float32 value, whose
        # rounding decides every draw
        dims = torch.tensor(output.size(1) * output.size(2))
        mag_norm = module.neftune_noise_alpha / torch.sqrt(dims)
        output = output + torch.zeros_like(output).uniform_(-mag_norm, mag_norm)
    return output


def input_embeddings(model: nn.Module, alpha: Any = None) -> nn.Module:
    """The module whose output NEFTune perturbs: ``get_input_embeddings()`` of the model inside any DDP,
    ``torch.compile`` or PEFT wrapper (a PEFT model's ``get_base_model()``; transformers takes its
    ``base_model.model``, the same model for LoRA).

    Raises:
        ValueError: the model has no ``get_input_embeddings()``, or it raises ``NotImplementedError``
            (transformers' default for a model whose embeddings it cannot find) or returns no module;
            the message names ``neftune_noise_alpha`` (given as ``alpha``).
    """
    inner = innermost_model(model)
    getter = getattr(inner, "get_input_embeddings", None)
    if not callable(getter):
        problem = "has no get_input_embeddings() method"
    else:
        try:
            embeddings = getter()
        except NotImplementedError as exc:
            problem = f"has no input embeddings that get_input_embeddings() finds ({exc})"
        else:
            if isinstance(embeddings, nn.Module):
                return embeddings
            problem = f"returns {type(embeddings).__name__} from get_input_embeddings(), not a module"
    raise ValueError(
        f"neftune_noise_alpha={alpha!r} adds noise to the output of the model's input embeddings, but the model "
        f"({type(inner).__name__}) {problem}. Accepted: a transformers model (or a PEFT model wrapping one), a "
        "model whose get_input_embeddings() returns its embedding module, or neftune_noise_alpha=None."
    )


def _discard_compiled_code() -> None:
    """Drop the code ``torch.compile`` holds, which would not notice the hook come or go (module docstring)."""
    import torch._dynamo

    torch._dynamo.reset()


@contextlib.contextmanager
def neftune_noise(model: nn.Module, alpha: float | None, compiled: bool = False) -> Iterator[None]:
    """Within the block, the input embeddings of ``model`` are noisy in training mode (see the module
    docstring); after it, however it is left, the hook and the ``neftune_noise_alpha`` attribute it reads
    are removed. ``alpha=None``: nothing is done. ``compiled``: the model runs through ``torch.compile``,
    whose code is discarded on the way in and out.

    Raises:
        ValueError: see :func:`input_embeddings`.
    """
    if alpha is None:
        yield
        return
    embeddings = input_embeddings(model, alpha)
    embeddings.neftune_noise_alpha = alpha
    handle = embeddings.register_forward_hook(neftune_post_forward_hook)
    logger.info("NEFTune on %s: alpha=%r", type(embeddings).__name__, alpha)
    if compiled:
        _discard_compiled_code()
    try:
        yield
    finally:
        handle.remove()
        with contextlib.suppress(AttributeError):
            del embeddings.neftune_noise_alpha
        if compiled:
            _discard_compiled_code()
