"""The ``optsched`` command: a thin dispatcher over the subcommands in :mod:`optsched.commands`.

Each subcommand module exposes ``HELP`` (one line), ``build_parser() -> jsonargparse.ArgumentParser``
and ``run(cfg) -> int``; heavy imports (torch, matplotlib) stay inside ``run``. Bad input of any kind
(an unknown flag, a bad value, a missing optional package) is answered with one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand name -> module; order is the order shown by --help
COMMANDS: dict[str, str] = {
    "demo": "optsched.commands.demo",
    "plan": "optsched.commands.plan",
    "schedule": "optsched.commands.schedule",
}

EXIT_USAGE = 2


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in COMMANDS else None)
    try:
        cfg = parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        print(f"optsched: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    command = cfg.command
    module = importlib.import_module(COMMANDS[command])
    try:
        return int(module.run(cfg[command]) or 0)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as exc:
        print(f"optsched {command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("optsched: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
