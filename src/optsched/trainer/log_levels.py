"""``log_level`` / ``log_level_replica`` / ``log_on_each_node``: the ``optsched`` logger's level during the
Trainer's calls.

transformers' Trainer sets the ``transformers`` library logger's level when it is built
(``logging.set_verbosity(args.get_process_log_level())``): ``log_level`` in the process that logs,
``log_level_replica`` (default ``"warning"``) in the others, ``"passive"`` leaving the level as it is. The
process that logs is each node's first (``local_rank == 0``) with ``log_on_each_node`` (the default), else
the global rank 0 only (``TrainingArguments.should_log``). optsched's Trainer does the same to the
``optsched`` logger, with two differences, on purpose:

* The level holds for the duration of each call of the Trainer's that logs (``__init__``, ``train``,
  ``evaluate``, ``predict``, ``log_metrics``, ``save_model``, ...: :func:`logs_at_process_level`), and the
  logger's own level is restored when the call returns or raises. transformers leaves its logger at the
  level for the rest of the process, so a second Trainer with ``log_level="passive"`` still logs at the
  first one's level, as does any other use of the library; here nothing leaks out of the Trainer.
* When no handler is configured (``logging.getLogger("optsched").hasHandlers()`` is False: neither the
  application nor a test runner set one up), a handler writing the bare message to stderr is added for
  the duration of the call, so ``log_level="info"`` shows the info records as it does with transformers
  (which always installs its own handler); without it Python's last-resort handler would print only
  warnings and above. With a handler configured, the records go to it as usual and nothing is added.

Only the ``optsched`` logger (and the loggers under it) is concerned: the ``transformers`` logger of a
transformers model is left alone. The defaults change nothing in the process that logs (``"passive"``), and
quiet the others to warnings and above, as transformers' defaults do.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["LOG_LEVEL_VALUES", "logs_at_process_level", "optsched_log_level", "process_log_level", "should_log"]

#: The level of each ``log_level`` name (transformers' ``trainer_log_levels``; "passive" is not a level).
LOG_LEVEL_VALUES: dict[str, int] = {
    "detail": logging.DEBUG,  # transformers' name for debug with file names and line numbers in its format
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_LOGGER_NAME = "optsched"

F = TypeVar("F", bound=Callable[..., Any])


def should_log(args: Any, *, local_rank: int, rank: int) -> bool:
    """Whether this process logs at ``args.log_level`` (else at ``log_level_replica``): transformers'
    ``TrainingArguments.should_log``, each node's first process with ``log_on_each_node``, else rank 0."""
    return local_rank == 0 if getattr(args, "log_on_each_node", True) else rank == 0


def process_log_level(args: Any, *, local_rank: int, rank: int) -> int | None:
    """The ``optsched`` logger's level for this process (transformers' ``get_process_log_level``), or
    ``None`` for ``"passive"``: leave it as it is. An ``args`` without the fields (a subclass's own object)
    gets transformers' defaults.

    Raises:
        KeyError: a level name that ``TrainingArguments`` would have refused (its fields are checked).
    """
    if should_log(args, local_rank=local_rank, rank=rank):
        name = getattr(args, "log_level", "passive")
    else:
        name = getattr(args, "log_level_replica", "warning")
    return None if name == "passive" else LOG_LEVEL_VALUES[name]


@contextlib.contextmanager
def optsched_log_level(level: int | None) -> Iterator[None]:
    """Set the ``optsched`` logger's level to ``level`` inside the block, and restore its own level (and
    handlers) after it, even when the block raises. ``None`` changes nothing.

    With no handler configured anywhere above the logger, a stderr handler (the bare message, as Python's
    last-resort handler prints) is attached inside the block, so that records below WARNING are shown.
    Nested blocks restore the level of the enclosing block.
    """
    if level is None:
        yield
        return
    logger = logging.getLogger(_LOGGER_NAME)
    previous = logger.level
    handler = None if logger.hasHandlers() else logging.StreamHandler(sys.stderr)
    if handler is not None:
        logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
        if handler is not None:
            logger.removeHandler(handler)


def logs_at_process_level(method: F) -> F:
    """Decorate a Trainer method so that it runs under :func:`optsched_log_level` at the level its
    ``self.args`` give this process (``self.dist``: its ranks); the arguments are read at each call."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        level = process_log_level(self.args, local_rank=self.dist.local_rank, rank=self.dist.rank)
        with optsched_log_level(level):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
