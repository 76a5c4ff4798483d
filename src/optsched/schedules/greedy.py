"""``greedy``: HF's ``GreedyLR`` (arXiv:2512.14527), same behaviour and state keys, no transformers import.

The lr goes *up* (divided by ``factor``) after more than ``patience`` consecutive improvements of the
metric and *down* (multiplied by ``factor``) after more than ``patience`` evaluations without one,
within ``[min_lr, max_lr]`` per group. After ``reset_start`` reductions with every group at its
``min_lr``, the scheduler resets to the initial lrs.

Differences from HF, none of which changes a learning rate:

* it is a ``torch.optim.lr_scheduler.ReduceLROnPlateau`` subclass, so every training loop that
  steps plateau schedulers with the eval metric (HF's Trainer, Lightning, accelerate) steps it
  correctly, not only the loops that know HF's class;
* ``verbose`` logs through :mod:`logging` instead of printing;
* ``state_dict()`` also carries :attr:`GreedyLR.spec`; HF's state dicts load unchanged;
* a state saved for another number of param groups is a ``ValueError`` (HF loads it, and the groups
  get the lrs and bounds saved for others, by position).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, SupportsFloat

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from optsched._validation import check_number
from optsched.schedules.scheduler import check_state_groups, set_group_lr

logger = logging.getLogger(__name__)

__all__ = ["GreedyLR", "StreamingAverage"]


class StreamingAverage:
    """Mean of the last ``window_size`` values (HF's rolling window, same running-sum arithmetic)."""

    def __init__(self, window_size: int) -> None:
        self.window_size = window_size
        self.values: list[float] = []
        self.sum = 0.0

    def streamavg(self, value: float) -> float:
        """Add ``value``; return the mean of the window."""
        self.values.append(value)
        self.sum += value
        if len(self.values) > self.window_size:
            self.sum -= self.values.pop(0)
        return self.sum / len(self.values)

    def state_dict(self) -> dict[str, Any]:
        return {"window_size": self.window_size, "values": self.values.copy(), "sum": self.sum}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.window_size = state_dict.get("window_size", self.window_size)
        self.values = list(state_dict.get("values", []))
        self.sum = state_dict.get("sum", 0.0)


_STATE_KEYS = (
    "factor", "min_lrs", "max_lrs", "patience", "verbose", "cooldown", "warmup", "cooldown_counter",
    "warmup_counter", "mode", "threshold", "threshold_mode", "best", "num_bad_epochs", "num_good_epochs",
    "eps", "last_epoch", "smooth", "window_size", "reset_start", "reset_start_original", "_last_lr",
    "_init_lrs",
)  # fmt: skip


def _per_group(field: str, value: Any, n: int) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"{field} has {len(value)} values; accepted: one per param group ({n}) or one number."
            )
        return [float(v) for v in value]
    return [float(value)] * n


class GreedyLR(ReduceLROnPlateau):
    """Metric-driven lr: up on sustained improvement, down on plateau. Step with ``step(metric)``.

    Args:
        optimizer: any torch optimizer.
        mode: ``"min"`` (lower metric is better) or ``"max"``.
        factor: in (0, 1); lr * factor on plateau, lr / factor on improvement.
        patience: consecutive good (bad) evaluations tolerated before raising (lowering) the lr.
        threshold, threshold_mode: what counts as an improvement (``"abs"``: ``best - threshold``,
            ``"rel"``: ``best * (1 - threshold)``, mirrored for ``"max"``).
        cooldown: evaluations ignored after a reduction; ``warmup``: after an increase.
        min_lr, max_lr: bounds, one number or one per group.
        eps: lr changes smaller than this are skipped.
        verbose: log each change at INFO level.
        smooth: feed the mean of the last ``window_size`` metrics instead of the raw metric.
        reset_start: reductions at the floor before resetting to the initial lrs.
        spec: the schedule spec kept in ``state_dict()`` (set by ``get_scheduler``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.95,
        patience: int = 10,
        threshold: float = 1e-6,
        threshold_mode: str = "abs",
        cooldown: int = 0,
        warmup: int = 0,
        min_lr: float | list[float] = 1e-3,
        max_lr: float | list[float] = 1.0,
        eps: float = 1e-8,
        verbose: bool = False,
        smooth: bool = False,
        window_size: int = 50,
        reset_start: int = 500,
        *,
        spec: Mapping[str, Any] | None = None,
    ) -> None:
        check_number("factor", factor, low=0.0, high=1.0, low_open=True, high_open=True)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        n = len(optimizer.param_groups)
        min_lrs, max_lrs = _per_group("min_lr", min_lr, n), _per_group("max_lr", max_lr, n)
        # torch's __init__ checks the optimizer, mode and threshold_mode and sets the shared fields.
        super().__init__(
            optimizer,
            mode=mode,  # type: ignore[arg-type]
            factor=factor,
            patience=patience,
            threshold=threshold,
            threshold_mode=threshold_mode,  # type: ignore[arg-type]
            cooldown=cooldown,
            min_lr=min_lrs,
            eps=eps,
        )
        self.min_lrs, self.max_lrs = min_lrs, max_lrs
        self.verbose = verbose
        self.warmup = warmup
        self.warmup_counter = 0
        self.cooldown_counter = 0
        self.smooth = smooth
        self.window_size = window_size
        self.reset_start = reset_start
        self.reset_start_original = reset_start
        self.last_epoch = 0
        self._init_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self._last_lr = self._init_lrs.copy()
        self.best = float("inf") if mode == "min" else float("-inf")
        self.num_bad_epochs = 0
        self.num_good_epochs = 0
        self._streaming_avg: StreamingAverage | None = StreamingAverage(window_size) if smooth else None
        self.spec: dict[str, Any] = (
            copy.deepcopy(dict(spec))
            if spec is not None
            else {"name": "greedy", "num_warmup_steps": None, "num_training_steps": None, "kwargs": {}}
        )

    def step(self, metrics: SupportsFloat, epoch: int | None = None) -> None:  # type: ignore[override]
        """Feed one evaluation of the metric (HF's GreedyLR.step, line for line)."""
        current = float(metrics)
        if self.smooth and self._streaming_avg is not None:
            current = self._streaming_avg.streamavg(current)
        if epoch is None:
            epoch = self.last_epoch + 1
        self.last_epoch = epoch

        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
            self.num_good_epochs = 0
        elif self.warmup_counter > 0:
            self.warmup_counter -= 1
            self.num_bad_epochs = 0
            self.num_good_epochs = 0
        else:
            if self.is_better(current, self.best):
                self.best = current
                self.num_bad_epochs = 0
                self.num_good_epochs += 1
            else:
                self.num_bad_epochs += 1
                self.num_good_epochs = 0
            if self.num_good_epochs > self.patience:
                self._increase_lr(epoch)
                self.warmup_counter = self.warmup
                self.num_good_epochs = 0
            elif self.num_bad_epochs > self.patience:
                self._reduce_lr(epoch)
                self.cooldown_counter = self.cooldown
                self.num_bad_epochs = 0
        self._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]

    def is_better(self, current: float, best: float) -> bool:
        """Whether ``current`` improves on ``best`` by more than the threshold."""
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return current < best * (1.0 - self.threshold)
            return current < best - self.threshold
        if self.threshold_mode == "rel":
            return current > best * (1.0 + self.threshold)
        return current > best + self.threshold

    def _reduce_lr(self, epoch: int) -> None:  # type: ignore[override]
        all_at_min = True
        for i, group in enumerate(self.optimizer.param_groups):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, self.min_lrs[i])
            if old_lr - new_lr > self.eps:
                set_group_lr(group, new_lr)
                if self.verbose:
                    logger.info("Epoch %s: reducing learning rate of group %d to %.4e.", epoch, i, new_lr)
            if group["lr"] > self.min_lrs[i]:
                all_at_min = False
        if all_at_min:
            self.reset_start -= 1
            if self.reset_start <= 0:
                self._reset_to_initial()

    def _increase_lr(self, epoch: int) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            old_lr = float(group["lr"])
            new_lr = min(old_lr / self.factor, self.max_lrs[i])
            if new_lr - old_lr > self.eps:
                set_group_lr(group, new_lr)
                if self.verbose:
                    logger.info("Epoch %s: increasing learning rate of group %d to %.4e.", epoch, i, new_lr)
        self.reset_start = self.reset_start_original

    def _reset(self) -> None:
        # torch's ReduceLROnPlateau.__init__ calls _reset() for its own counters; keep that meaning.
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def _reset_to_initial(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            set_group_lr(group, self._init_lrs[i])
        self.best = float("inf") if self.mode == "min" else float("-inf")
        self.num_bad_epochs = 0
        self.num_good_epochs = 0
        self.cooldown_counter = 0
        self.warmup_counter = 0
        self.reset_start = self.reset_start_original
        if self.smooth and self._streaming_avg is not None:
            self._streaming_avg = StreamingAverage(self.window_size)
        if self.verbose:
            logger.info("GreedyLR reset to its initial state.")

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        """The lrs after the last step."""
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        """HF's GreedyLR state keys, plus ``spec`` and the smoothing window when ``smooth``."""
        state = {key: copy.copy(getattr(self, key)) for key in _STATE_KEYS}
        if self.smooth and self._streaming_avg is not None:
            state["_streaming_avg"] = self._streaming_avg.state_dict()
        state["spec"] = copy.deepcopy(self.spec)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state (ours or HF's GreedyLR's) and put the saved lrs back into the optimizer.

        Raises:
            ValueError: the state's per-group lists (``min_lrs``, ``max_lrs``, ``_last_lr``,
                ``_init_lrs``) are for another number of param groups; nothing is loaded then.
        """
        check_state_groups("GreedyLR", state_dict, ("min_lrs", "max_lrs", "_last_lr", "_init_lrs"), self.optimizer)
        for key in _STATE_KEYS:
            if key in state_dict:
                setattr(self, key, copy.copy(state_dict[key]))
        self.mode_worse = float("inf") if self.mode == "min" else float("-inf")
        if "_streaming_avg" in state_dict:
            if self._streaming_avg is None:
                self._streaming_avg = StreamingAverage(self.window_size)
            self._streaming_avg.load_state_dict(state_dict["_streaming_avg"])
        if "_last_lr" in state_dict:
            for group, lr in zip(self.optimizer.param_groups, self._last_lr):
                set_group_lr(group, lr)
