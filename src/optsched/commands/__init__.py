"""Subcommands of the ``optsched`` command line, one module each (see :mod:`optsched.cli`)."""

from __future__ import annotations

__all__ = ["UsageError", "cannot_write", "chart_flags", "spellings", "write_png"]


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


class UsageError(Exception):
    """Input the user can fix that is not a bad value as such: a path that cannot be written, say.

    :func:`optsched.cli.main` prints it as one line on stderr and exits with code 2, as for a
    ``ValueError``.
    """


def cannot_write(flag: str, path: object, exc: OSError, accepted: str) -> UsageError:
    """The error for ``exc``, raised while writing ``path`` given as ``flag``: names the flag, the path
    and the system's reason.

    Example:
        >>> print(cannot_write("--png", "/sys/x.png", PermissionError(13, "Permission denied"), "a file you can write"))
        --png='/sys/x.png': cannot write it (Permission denied); accepted: a file you can write.
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UsageError(f"{flag}={str(path)!r}: cannot write it ({reason}); accepted: {accepted}.")


def write_png(curves, png, **kwargs):
    """:func:`optsched.schedules.render.save_png` of ``curves`` to ``png`` (the path ``--png`` gave, see
    ``render.png_path``); returns the path written.

    Raises:
        UsageError: the file cannot be written (:func:`cannot_write`, naming ``--png``).
    """
    from optsched.schedules.render import save_png

    try:
        return save_png(curves, png, **kwargs)
    except OSError as exc:
        raise cannot_write("--png", png, exc, "a PNG file in a folder you can write to") from None


def chart_flags(cfg):
    """``--width``, ``--height`` and ``--png`` of a command that draws, checked before any work is done or
    anything printed (``ascii_chart``'s limits; ``render.png_path``); returns the PNG path or ``None``.

    Raises:
        ValueError: a width or height below 2, or a ``--png`` name that is refused, naming the flag.
    """
    from optsched._validation import check_int
    from optsched.schedules.render import png_path

    check_int("--width", cfg.width, low=2)
    check_int("--height", cfg.height, low=2)
    return png_path(cfg.png, "--png") if cfg.png is not None else None
