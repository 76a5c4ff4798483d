"""``debug="underflow_overflow"``: find the first module whose forward meets a NaN or an inf.

A forward hook on every module records a *frame* per call: the module's qualified name and class, then
the absolute min and max of its own parameters, of each tensor input and of each tensor output (a
tuple output's items as ``output[i]``, a nested one's as ``output[i][j]``), in transformers'
``DebugUnderflowOverflow`` layout, so a report reads the same in both libraries::

                      encoder.block.2.layer.1.DenseReluDense.wo Linear
    1.01e-06 6.44e+00 weight
    0.00e+00 9.74e+03 input[0]
    3.18e-04 6.27e+04 output

The last ``max_frames_to_save`` frames (21) are kept; when a parameter, input or output holds a NaN or
an inf, they are logged at ERROR level with the batch number (each top-level forward that completes is
one batch), the values that tripped it are named, and :class:`UnderflowOverflowError` is raised: the
frames before the event show where values grew towards the dtype's limit (fp16's 65504).

Where optsched differs from transformers: the report goes to the ``optsched`` logger, not ``print``;
the hooks come off when ``train()`` ends (transformers leaves them on the model, and stacks a second set
on each further ``train()``), so evaluations after training run without them. Each frame reads every
tensor's min and max back to the host: a debugging tool, several times slower than a plain step.
"""

from __future__ import annotations

import collections
import logging
from types import TracebackType
from typing import Any

import torch
from torch import nn

from optsched.trainer.nonfinite import NonFiniteError

logger = logging.getLogger(__name__)

__all__ = ["DebugUnderflowOverflow", "UnderflowOverflowError"]

#: transformers' indentation of a frame's module line (17 spaces: the width of "abs min abs max ")
_PREFIX = " " * 17


class UnderflowOverflowError(NonFiniteError, ValueError):
    """A NaN or inf met in a forward with ``debug="underflow_overflow"``. A ``ValueError``, as transformers
    raises, and optsched's :class:`~optsched.trainer.nonfinite.NonFiniteError`."""


class DebugUnderflowOverflow:
    """Forward hooks on ``model`` and all its submodules that stop at the first NaN / inf (module docstring).

    Registered on construction (transformers' API: ``DebugUnderflowOverflow(model)``); :meth:`remove`, or
    leaving a ``with`` block, takes them off.

    Args:
        model: the module to watch (its submodules too).
        max_frames_to_save: how many of the last frames a report shows (transformers' default, 21).

    Raises:
        ValueError: ``max_frames_to_save`` below 1.
    """

    def __init__(self, model: nn.Module, max_frames_to_save: int = 21) -> None:
        if isinstance(max_frames_to_save, bool) or not isinstance(max_frames_to_save, int) or max_frames_to_save < 1:
            raise ValueError(f"max_frames_to_save={max_frames_to_save!r}; accepted: an integer >= 1.")
        self.model = model
        self.frames: collections.deque[str] = collections.deque(maxlen=max_frames_to_save)
        self.batch_number = 0
        self._frame: list[str] = self._batch_start()
        self._found: list[str] = []
        # a module shared by several parents is reported under its first name, as named_modules() gives it
        self._names = {m: name for name, m in model.named_modules()}
        self._handles = [m.register_forward_hook(self._hook) for m in self._names]

    def remove(self) -> None:
        """Take the hooks off (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> DebugUnderflowOverflow:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._frame.append(f"{_PREFIX} {self._names[module]} {type(module).__name__}")
        for name, param in module.named_parameters(recurse=False):
            self._record(param, name)
        for i, value in enumerate(inputs):  # torch hands a forward hook the positional inputs as a tuple
            self._record(value, f"input[{i}]")
        if isinstance(output, tuple):
            for i, value in enumerate(output):
                if isinstance(value, tuple):
                    for j, item in enumerate(value):
                        self._record(item, f"output[{i}][{j}]")
                else:
                    self._record(value, f"output[{i}]")
        else:
            self._record(output, "output")
        self.frames.append("\n".join(self._frame))
        self._frame = []
        if module is self.model:
            self.batch_number += 1
            self._frame = self._batch_start()  # the next batch's first frame opens with its header
        if self._found:
            self._report()

    def _batch_start(self) -> list[str]:
        """transformers' header of a batch, at the head of its first frame."""
        return [f"\n\n{_PREFIX} *** Starting batch number={self.batch_number} ***", f"{'abs min':8} {'abs max':8} metadata"]

    def _record(self, value: Any, what: str) -> None:
        if value is None:
            self._frame.append(f"{'None':>17} {what}")
            return
        if not torch.is_tensor(value):
            self._frame.append(f"{'not a tensor':>17} {what}")
            return
        if value.numel() == 0:  # transformers' min() of an empty tensor raises in the middle of training
            self._frame.append(f"{'empty':>17} {what}")
            return
        with torch.no_grad():
            # a bool tensor (a mask) has no abs(): read as 0 / 1 (transformers raises there)
            magnitude = (value.detach().to(torch.uint8) if value.dtype == torch.bool else value.detach()).abs()
            self._frame.append(f"{magnitude.min().item():8.2e} {magnitude.max().item():8.2e} {what}")
            # the same tests as transformers (isnan / isinf), so the same tensors trip it
            for kind, test in (("nans", torch.isnan), ("infs", torch.isinf)):
                if test(value).any().item():
                    self._found.append(f"{what} has {kind}")

    def _report(self) -> None:
        frames = list(self.frames)
        found = "; ".join(self._found)
        self.frames.clear()
        self._found = []
        logger.error(
            "%s\nDetected inf/nan during batch_number=%d\nLast %d forward frames:\n%-8s %-8s metadata\n%s\n",
            found, self.batch_number, len(frames), "abs min", "abs max", "\n".join(frames),
        )
        raise UnderflowOverflowError(
            f"debug='underflow_overflow': inf/nan detected during batch_number={self.batch_number} ({found}); "
            "the last forward frames before it are logged above (logger 'optsched.trainer.overflow_debug')."
        )
