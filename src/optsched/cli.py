"""The ``optsched`` command: a thin dispatcher over the subcommands in :mod:`optsched.commands`.

Each subcommand module exposes ``HELP`` (one line), ``build_parser() -> jsonargparse.ArgumentParser``
and ``run(cfg) -> int``; heavy imports (torch, matplotlib) stay inside ``run``. Bad input of any kind
(an unknown flag, a bad value, a missing optional package) is answered with one line on stderr and
exit code 2, never a traceback: ``optsched <command>: error: <message>``, whether the parser or the
command refused it (``optsched: error: ...`` only when no known command was given). A Python warning raised while a command runs (a warmup longer than the
run, ...) is printed as one line, ``optsched <command>: warning: <message>``, without the source line
Python would show; this formatter is installed by :func:`main` only, and removed when it returns.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Sequence

from optsched._validation import closest

# subcommand name -> module; order is the order shown by --help
COMMANDS: dict[str, str] = {
    "demo": "optsched.commands.demo",
    "plan": "optsched.commands.plan",
    "schedule": "optsched.commands.schedule",
}

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE


def build_parser(only: str | None = None):
    """The top-level parser with one subparser per entry of :data:`COMMANDS` (or just ``only``).

    Building a single subcommand's parser keeps ``optsched schedule ...`` from importing the demo's
    or the planner's modules (torch among them) just to parse its own flags.
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="optsched",
        description="Plan, explain and run optimizer / learning-rate schedule setups (HF Trainer semantics).",
        exit_on_error=False,
        allow_abbrev=False,
    )
    subcommands = parser.add_subcommands(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(module_name)
        subcommands.add_subcommand(name, module.build_parser(), help=module.HELP)
    return parser


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


_UNRECOGNIZED = "unrecognized arguments:"


def _closest(flag: str, known: list[str]) -> list[str]:
    """Up to three flags ``flag`` may have meant: those it begins (``--warmup`` -> ``--warmup_steps``,
    ``--warmup_ratio``; dashes and underscores alike), else the most similar one; never ``--help``."""
    candidates = [k for k in known if k != "--help"]
    stem = flag.replace("-", "_")
    begun: dict[str, str] = {}  # one spelling per option
    for candidate in candidates:
        key = candidate.replace("-", "_")
        if key.startswith(stem):
            begun.setdefault(key, candidate)
    if begun:
        return list(begun.values())[:3]
    return closest(flag, candidates, n=1)


def _command_parser(command: str):
    """The subcommand's own parser, built again: reaching the one :func:`main` parsed with means going
    through jsonargparse's private attributes. Used on error paths only."""
    return importlib.import_module(COMMANDS[command]).build_parser()


def _flags(parser, dest: str | None = None, long_only: bool = False) -> list[str]:
    """The option strings of the option stored in ``dest`` (of every option with ``None``), in the
    order declared; argparse keeps them in ``_actions`` (private, but unchanged since Python 3.2)."""
    return [
        flag for action in parser._actions if dest is None or action.dest == dest
        for flag in action.option_strings if not long_only or flag.startswith("--")
    ]


def unrecognized_hint(message: str, command: str | None) -> str:
    """What to add to argparse's ``unrecognized arguments: ...``: the closest flag of ``command`` for each
    unknown one, and where the accepted flags are listed; ``""`` for any other message.

    Example: ``--stepz 10`` for ``schedule`` gives ``" (--stepz: did you mean --steps?); accepted flags:
    optsched schedule --help"``.
    """
    if command not in COMMANDS or _UNRECOGNIZED not in message:
        return ""
    known = _flags(_command_parser(command), long_only=True)
    unknown = [word.split("=")[0] for word in message.split(_UNRECOGNIZED, 1)[1].split() if word.startswith("--")]
    guesses = [f"{flag}: did you mean {' or '.join(close)}?" for flag in unknown if (close := _closest(flag, known))]
    return (f" ({'; '.join(guesses)})" if guesses else "") + f"; accepted flags: optsched {command} --help"


def _warning_printer(prefix: str):
    """A :func:`warnings.showwarning` that prints ``"{prefix}: warning: <message>"`` as one line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        try:
            print(f"{prefix}: warning: {_one_line(message)}", file=file if file is not None else sys.stderr)
        except OSError:  # stderr gone: a warning is not worth a crash
            pass

    return show


_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_GIVEN_VALUE = re.compile(r"(?:Got|Given) value: (.*?)\s*$", re.M)

# jsonargparse.typing's restricted numbers, by class name (their bounds live in a private attribute)
_RESTRICTED = {
    "PositiveInt": "an integer > 0",
    "NonNegativeInt": "an integer >= 0",
    "PositiveFloat": "a number > 0",
    "NonNegativeFloat": "a number >= 0",
    "ClosedUnitInterval": "a number in [0, 1]",
    "OpenUnitInterval": "a number in (0, 1)",
}


def describe_type(hint: object) -> str:
    """What a flag of type ``hint`` accepts, in words: ``int`` -> ``"an integer"``.

    Example:
        >>> describe_type(int), describe_type(float), describe_type(int | float | None)
        ('an integer', 'a finite number', 'a finite number')
        >>> from jsonargparse.typing import PositiveFloat
        >>> describe_type(PositiveFloat | None), describe_type(bool)
        ('a number > 0', 'true or false')
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(hint) if m is not type(None)]  # None is never what was meant
        if float in members and int in members:
            members.remove(int)  # "an integer or a number" says no more than "a number"
        return " or ".join(dict.fromkeys(describe_type(m) for m in members))
    name = getattr(hint, "__name__", "")
    if name in _RESTRICTED:
        return _RESTRICTED[name]
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a JSON object"}
    if hint in words:
        return words[hint]
    if typing.get_origin(hint) is list or hint is list:
        return "a list, e.g. [a, b]"
    return _one_line(str(hint).replace("typing.", ""))


def _flag_and_value(parser, dest: str, argv: Sequence[str], reported: str | None) -> tuple[str, str | None]:
    """The flag for ``dest`` as the user spelled it, and the text given to it: of several occurrences,
    the one whose text is the value jsonargparse reported (it reports ``1e12`` as ``1000000000000.0``),
    else the first."""
    options = _flags(parser, dest)
    given: list[tuple[str, str]] = []
    for i, word in enumerate(argv):
        flag, eq, text = word.partition("=")
        if flag in options:
            if eq:
                given.append((flag, text))
            elif i + 1 < len(argv):
                given.append((flag, argv[i + 1]))

    def same(text: str) -> bool:
        if reported is None or text == reported:
            return reported is not None
        try:
            return float(text) == float(reported)
        except ValueError:
            return False

    for flag, text in given:
        if same(text):
            return flag, text
    if given:
        return given[0]
    long = _flags(parser, dest, long_only=True)
    return (long[0] if long else f"--{dest}"), reported


def type_error_message(message: str, command: str | None, argv: Sequence[str]) -> str:
    """jsonargparse's ``Parser key "steps": Expected a <class 'int'>. Got value: 1e12`` as the project
    words its errors, ``--steps: expected an integer, got '1e12'``; any other message as it is."""
    match = _PARSER_KEY.match(message)
    if command not in COMMANDS or match is None:
        return _one_line(message)
    dest = match.group(1).rpartition(".")[2]
    parser = _command_parser(command)
    action = next((a for a in parser._actions if a.dest == dest), None)
    hint = getattr(action, "_typehint", None)  # jsonargparse's ActionTypeHint keeps the annotation there
    if hint is None:
        return _one_line(message)
    values = _GIVEN_VALUE.findall(message)
    flag, text = _flag_and_value(parser, dest, argv, values[-1] if values else None)
    got = f", got {text!r}" if text is not None else ""
    typed = any(word.partition("=")[0] == flag for word in argv)
    if text is not None and not typed and any(word.partition("=")[0] == "--config" for word in argv):
        got += " (in the --config file)"
    return f"{flag}: expected {describe_type(hint)}{got}"


_REQUIRED = re.compile(r"^the following arguments are required: (.+)$")
_NO_VALUE = re.compile(r"^argument (\S+): expected one argument$")


def argparse_message(message: str, command: str | None, argv: Sequence[str]) -> str:
    """argparse's wording with the flags as the user types them: ``the following arguments are
    required: schedule.name, schedule.steps`` becomes ``missing name, --steps``, and ``argument --steps/--num-training-steps/...:
    expected one argument`` becomes ``--steps: expected a value after it`` (the spelling used); any other
    message as it is."""
    required = _REQUIRED.match(message)
    if required and command in COMMANDS:
        parser = _command_parser(command)
        flags = []
        for key in required.group(1).split(", "):
            dest = key.rpartition(".")[2]
            options = _flags(parser, dest, long_only=True)
            flags.append(options[0] if options else dest)  # a positional: its name, as the usage line shows it
        return f"missing {', '.join(flags)}"
    no_value = _NO_VALUE.match(message)
    if no_value:
        spellings = no_value.group(1).split("/")
        used = next((word for word in reversed(argv) if word in spellings), spellings[0])
        return f"{used}: expected a value after it"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    # the caller's filters stay as they are; only the way a shown warning is printed changes, and
    # catch_warnings puts the caller's printer back when main returns
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(prog(command))
        try:
            try:
                return _run(argv, command)
            finally:  # write what is buffered now, so a closed pipe is noticed here, not at exit
                sys.stdout.flush()
        except BrokenPipeError:
            # the reader has gone (`optsched plan | head -1`): stop quietly, as Unix tools do
            _stdout_to_devnull()
            return EXIT_BROKEN_PIPE


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at /dev/null, so that the interpreter's own flush at exit does not
    fail again on the closed pipe (the recipe of Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (an in-process caller's capture)
        pass


def prog(command: str | None) -> str:
    """The name a message of ``command`` starts with: ``optsched schedule`` (argparse's convention for a
    subcommand's errors), or ``optsched`` when no known command was given."""
    return f"optsched {command}" if command in COMMANDS else "optsched"


def _run(argv: list[str], command: str | None) -> int:
    parser = build_parser(only=command)
    try:
        cfg = parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        message = argparse_message(type_error_message(str(exc), command, argv[1:]), command, argv[1:])
        # the same prefix as the command's own errors below: which command refused is known either way
        print(f"{prog(command)}: error: {message}{unrecognized_hint(message, command)}", file=sys.stderr)
        return EXIT_USAGE
    from optsched.commands import UsageError

    command = cfg.command
    module = importlib.import_module(COMMANDS[command])
    try:
        return int(module.run(cfg[command]) or 0)
    except (ValueError, TypeError, ImportError, FileNotFoundError, UsageError) as exc:
        print(f"{prog(command)}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog(command)}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
