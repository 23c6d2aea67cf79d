"""The ``entitle`` command line: demo users, plan, run, grant, deliver, status, summary, reconcile, repair,
void, notices, report, db, query, and the programs' ``pass``, ``claims`` and ``review`` commands.

:func:`main` runs it and returns the exit code (see :mod:`pipeline.cli.dispatch` for the codes);
:func:`build_parser` builds the argument parser with every command.
"""

from pipeline.cli.dispatch import main
from pipeline.cli.parser import build_parser

__all__ = ["build_parser", "main"]
