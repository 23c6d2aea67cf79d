"""How commands print: a JSON document with ``--json``, else lines for people."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def emit(args: argparse.Namespace, document: dict[str, Any], lines: list[str]) -> None:
    """The command's result: the JSON document with --json, else the lines."""
    if getattr(args, "json", False):
        print(json.dumps(document, default=str, indent=2))
    else:
        print("\n".join(lines))


def explain_exit(code: int, reason: str) -> int:
    """Say on standard error why the command exits ``code`` (its result is on standard output); returns ``code``."""
    print(f"entitle: error: {reason}", file=sys.stderr)
    return code


def say(args: argparse.Namespace, *lines: str) -> None:
    """Progress narration: stdout for people, stderr when stdout carries JSON."""
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    print("\n".join(lines), file=stream)
