"""Subcommands of the ``optsched`` command line, one module each (see :mod:`optsched.cli`)."""
