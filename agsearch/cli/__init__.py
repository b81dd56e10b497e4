"""The ``agsearch`` command line: subcommands in :mod:`.main`, ``agsearch search`` in
:mod:`.search`, ``agsearch cca`` in :mod:`.cca`."""

from agsearch.cli.main import main

__all__ = ["main"]
