"""Subcommands of the ``optsched`` command line, one module each (see :mod:`optsched.cli`)."""

from __future__ import annotations

__all__ = ["spellings"]


def spellings(*names: str) -> list[str]:
    """The flags of an option: ``--name-with-dashes`` and ``--name_with_underscores`` for each name.

    transformers' users type ``--max_steps`` (``TrainingArguments``) or ``--num_training_steps``
    (``get_scheduler``); the command line answers to those as well as to its own dashed spelling.

    Example:
        >>> spellings("max_steps", "num_training_steps")
        ['--max-steps', '--max_steps', '--num-training-steps', '--num_training_steps']
        >>> spellings("lr")
        ['--lr']
    """
    flags = (f"--{spelling}" for name in names for spelling in (name.replace("_", "-"), name))
    return list(dict.fromkeys(flags))
