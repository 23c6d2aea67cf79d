"""Run the ``entitle`` command line: parse the arguments, call the command and turn errors into exit codes.

Exit codes: 0 success; 2 usage or configuration; 3 bad input (campaign or user
file); 4 partition files; 5 ledger refused (including a refused void or
repair); 6 campaign not started; 7 some partitions failed (the others
finished; for deliver: grants failed or not attempted); 8 reconciliation found
breaks; 9 reconciliation incomplete; 10 deliver: an issuer answered conflict;
70 internal error (a bug: please report).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence

from pipeline.cli.parser import build_parser
from pipeline.config import debug_enabled, load_settings
from pipeline.errors import EntitleError

EXIT_INTERNAL = 70
_LIBRARY_LINK = re.compile(r"\s*\(Background on this error at: [^)]*\)")
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what shells report for a closed pipe


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        settings = load_settings()
        result: int = args.handler(args, settings)
        return result
    except BrokenPipeError:
        # The reader went away (`entitle … | head`): not an error of ours, and nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except EntitleError as exc:
        _fail(args, str(exc), exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        _fail(args, "interrupted; every partition is all-or-nothing, so rerun the same command to finish", 130)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback as the interface
        if debug_enabled():
            traceback.print_exc()
        _fail(
            args,
            f"internal error ({type(exc).__name__}: {exc}). This is a bug; rerun with ENTITLE_DEBUG=1 for the "
            "traceback and report it. The ledger is consistent: every partition is one transaction.",
            EXIT_INTERNAL,
        )
        return EXIT_INTERNAL


def _fail(args: argparse.Namespace, message: str, code: int) -> None:
    message = _LIBRARY_LINK.sub("", message)
    print(f"entitle: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        try:
            print(json.dumps({"error": message, "exit_code": code}))
        except BrokenPipeError:
            pass
