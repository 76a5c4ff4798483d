"""Preemption: turn SIGTERM / SIGINT into "finish this step, save a checkpoint, stop cleanly".

Clusters preempt a job by sending SIGTERM (then SIGKILL after a grace period); a user stops one with
Ctrl-C (SIGINT). :class:`PreemptionHandler` records such a signal instead of dying inside a forward
pass; the Trainer polls :attr:`PreemptionHandler.requested` at every optimizer-step boundary, saves a
checkpoint at that step and returns from ``train()``. Resuming from that checkpoint continues exactly.

Rules:

* handlers are installed only in the main thread of the main interpreter (``signal.signal`` may only
  be called there); elsewhere the handler does nothing and logs why;
* the previous handlers are restored when the ``with`` block ends, whatever happens in it;
* a second signal while the first is being honoured goes to the previous handler (so a second Ctrl-C
  raises ``KeyboardInterrupt`` as usual, a second SIGTERM terminates): nobody is locked in.

Example:
    >>> import signal
    >>> with PreemptionHandler(["SIGUSR1"]) as h:
    ...     signal.raise_signal(signal.SIGUSR1)
    ...     h.requested, h.signal_name
    (True, 'SIGUSR1')
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["PreemptionHandler", "parse_signals", "signal_exit_status"]


def signal_exit_status(signal_name: str) -> int:
    """The exit status a shell gives a process ended by ``signal_name``: 128 + the signal's number.

    A program whose training a signal stopped early (with a checkpoint) exits with it rather than 0, so
    that a shell script or a job scheduler does not take the preempted run for a finished one.

    Example:
        >>> signal_exit_status("SIGINT"), signal_exit_status("SIGTERM")
        (130, 143)

    Raises:
        ValueError: a name that is not a signal here (see :func:`parse_signals`).
    """
    (sig,) = parse_signals([signal_name])
    return 128 + int(sig)


def parse_signals(names: str | Iterable[str]) -> list[signal.Signals]:
    """``"SIGTERM,SIGINT"`` (or a list of names) -> ``[Signals.SIGTERM, Signals.SIGINT]``.

    The names are those :class:`optsched.TrainingArguments` accepts for ``save_signals`` (it
    normalises and validates them); this function only maps them.

    Raises:
        ValueError: a name this platform does not know.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    out = []
    for item in filter(None, (str(i).strip().upper() for i in items)):
        name = item if item.startswith("SIG") else "SIG" + item
        try:
            out.append(signal.Signals[name])
        except KeyError:
            known = ", ".join(s.name for s in signal.Signals)
            raise ValueError(f"save_signals={names!r}: {item!r} is not a signal; accepted: {known}.") from None
    return out


class PreemptionHandler:
    """Context manager recording the first of ``signals`` delivered while it is active.

    Args:
        signals: the signals to catch (names or ``signal.Signals``).
        enabled: False makes the whole object a no-op (``save_on_signal=False``).

    Attributes:
        requested: a signal arrived and training should stop at the next step boundary.
        signal_name: its name (``"SIGTERM"``), or None.
        installed: whether the handlers were installed (False outside the main thread).
    """

    def __init__(self, signals: str | Iterable[str | signal.Signals] = "SIGTERM,SIGINT", enabled: bool = True) -> None:
        if isinstance(signals, str):
            self.signals = parse_signals(signals)
        else:
            self.signals = [s if isinstance(s, signal.Signals) else parse_signals([s])[0] for s in signals]
        self.enabled = enabled
        self.requested = False
        self.signal_name: str | None = None
        self.installed = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.requested:  # a second signal: let the previous handler have it (don't lock anyone in)
            previous = self._previous.get(sig, signal.SIG_DFL)
            logger.warning("%s received again while saving: handing it to the previous handler.", sig.name)
            self._restore()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(sig)
            return
        self.requested = True
        self.signal_name = sig.name
        # logging from a signal handler is not async-signal-safe in C, but Python runs this handler
        # between bytecodes of the main thread, where logging is safe.
        logger.warning("%s received: training stops after the current step, with a checkpoint.", sig.name)

    def __enter__(self) -> PreemptionHandler:
        if not self.enabled or not self.signals:
            return self
        if threading.current_thread() is not threading.main_thread():
            logger.info("Not in the main thread: no preemption handlers installed (signals go to their usual handlers).")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        self.installed = True
        return self

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.installed:
            self._restore()
