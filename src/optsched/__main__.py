"""``python -m optsched``: the same as the ``optsched`` command."""

from optsched.cli import main

raise SystemExit(main())
