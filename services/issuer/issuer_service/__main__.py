"""``python -m issuer_service``: run the reference entitlement service (see ``--help``)."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from issuer_service.errors import ConfigError
from issuer_service.faults import FaultInjector, FaultSettings

DEFAULT_PORT = 8700
PORT_MAX = 65_535
EXIT_OK = 0
EXIT_USAGE = 2
TOKENS_FILE_ENV = "ISSUER_TOKENS_FILE"
NO_TOKENS_WARNING = "--no-auth: every client is trusted (reference/test use only)"

_DESCRIPTION = """\
Run the reference entitlement service: an HTTP API that grants entitlements by
idempotency key (the grant's deterministic id), singly (PUT /v1/grants/{id}) or
in batches of up to 1,000 (POST /v1/grants:batch), answering per grant created,
exists (same key, same payload) or conflict (same key, different payload; never
overwritten). It exports its grants for reconciliation
(GET /v1/grants/export?campaign_id=X[&format=parquet]) and can inject faults
(also changeable at runtime through POST /admin/faults). The API is specified in
services/issuer/issuer_service/openapi.json, served at GET /openapi.json.

With --tokens-file (or the environment variable ISSUER_TOKENS_FILE) every
endpoint but GET /healthz and GET /openapi.json needs "Authorization: Bearer
TOKEN" with a right: grant (PUT /v1/grants/{id}, POST /v1/grants:batch), revoke
(POST /v1/grants:revoke), export (GET /v1/grants/export), stats (GET /v1/stats),
admin (/admin/*), or * for all. The file holds one token per line:

    TOKEN RIGHT[,RIGHT...]   # comment

tokens of at least 16 characters; blank lines and # comments are ignored. No
token: 401; a token without the right: 403. The file is read again within a
second of a change (no restart): add the new token, move the clients to it,
remove the old one. A malformed file at start-up is exit code 2; at a reload it
is logged and the tokens loaded before stay in force. A tokens file is
required: only --no-auth (tests on loopback) runs the service trusting every
client.

When it listens, one line "issuer service listening on http://HOST:PORT" goes to
stdout. Stop it with Ctrl-C or SIGTERM (exit code 0). Exit code 2: bad
arguments, a store that cannot be opened, a port that cannot be bound, a tokens
file that cannot be read or holds an error.
"""

_EPILOG = """\
examples:
  python -m issuer_service --store var/issuer/issuer.sqlite --tokens-file var/issuer/tokens
  python -m issuer_service --store var/issuer/issuer.sqlite --port 8700 --no-auth
  python -m issuer_service --store postgresql://postgres@127.0.0.1/issuer --tokens-file var/issuer/tokens \\
      --fault-error-rate 0.05 --fault-throttle-rate 0.05 --fault-seed 42
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m issuer_service",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--store",
        required=True,
        help="the service's own grant store: an SQLite file path or sqlite:///path, or a PostgreSQL URL "
        "(postgresql://user@host/db); the table issued_grants is created when missing",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on; 0 picks a free one (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--tokens-file",
        default=os.environ.get(TOKENS_FILE_ENV),
        metavar="PATH",
        help="bearer tokens and their rights, one 'TOKEN RIGHT[,RIGHT...]' per line, read again within a second "
        f"of a change; every endpoint but /healthz and /openapi.json then needs one (default: ${TOKENS_FILE_ENV})",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="no tokens file: trust every client that reaches the port (tests on loopback only)",
    )
    parser.add_argument("--json-log", action="store_true", help="log one JSON object per line on stderr")
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    faults = parser.add_argument_group(
        "fault injection (granting endpoints only; all off by default; at most one of the four shares per request)"
    )
    faults.add_argument(
        "--fault-drop-rate",
        type=float,
        metavar="SHARE",
        help="share of requests whose connection is closed without any answer (nothing committed)",
    )
    faults.add_argument(
        "--fault-throttle-rate",
        type=float,
        metavar="SHARE",
        help="share answered 429 with Retry-After (nothing committed)",
    )
    faults.add_argument(
        "--fault-retry-after-s",
        type=int,
        metavar="S",
        help="the Retry-After of --fault-throttle-rate answers (default 1)",
    )
    faults.add_argument(
        "--fault-error-rate", type=float, metavar="SHARE", help="share answered 500 or 503 (nothing committed)"
    )
    faults.add_argument(
        "--fault-timeout-after-commit-rate",
        type=float,
        metavar="SHARE",
        help="share committed and then not answered in time: the answer waits --fault-hang-s "
        "(or the connection drops, --fault-after-commit-action drop)",
    )
    faults.add_argument(
        "--fault-hang-s", type=float, metavar="S", help="how long a timeout-after-commit answer waits (default 30)"
    )
    faults.add_argument(
        "--fault-after-commit-action", choices=["hang", "drop"], help="what a timeout-after-commit does (default hang)"
    )
    faults.add_argument(
        "--fault-latency-ms", type=float, metavar="MS", help="delay added to every answer of the granting endpoints"
    )
    faults.add_argument(
        "--fault-rate-limit-rps",
        type=float,
        metavar="RPS",
        help="token-bucket limit in requests/s: beyond it 429 with Retry-After (0: off)",
    )
    faults.add_argument("--fault-seed", type=int, metavar="N", help="seed of the fault draws, for reproducible runs")
    return parser


class _JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _configure_logging(json_log: bool, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonLogFormatter() if json_log else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def _fault_settings(args: argparse.Namespace) -> FaultSettings:
    changes = {
        name: getattr(args, f"fault_{name}")
        for name in (
            "drop_rate",
            "throttle_rate",
            "retry_after_s",
            "error_rate",
            "timeout_after_commit_rate",
            "hang_s",
            "after_commit_action",
            "latency_ms",
            "rate_limit_rps",
            "seed",
        )
        if getattr(args, f"fault_{name}") is not None
    }
    return FaultSettings().updated(changes)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until interrupted; the exit code (0, or 2 for a usage or configuration error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= PORT_MAX:
        parser.error(f"--port must be in 0..{PORT_MAX}, got {args.port}")
    if args.tokens_file is not None and not args.tokens_file.strip():
        parser.error(f"--tokens-file (or {TOKENS_FILE_ENV}) is set but empty; name the tokens file")
    if args.tokens_file is None and not args.no_auth:
        parser.error(
            f"give --tokens-file PATH (or {TOKENS_FILE_ENV}) so that every client needs a token, "
            "or --no-auth to trust every client (tests on loopback only)"
        )
    if args.tokens_file is not None and args.no_auth:
        parser.error("--no-auth and --tokens-file exclude each other")
    _configure_logging(args.json_log, args.log_level)
    log = logging.getLogger("issuer_service")
    # Imported here so that --help answers without loading the web stack.
    from issuer_service.app import create_app
    from issuer_service.auth import Credentials
    from issuer_service.server import bind, build_server
    from issuer_service.store import IssuerStore

    try:
        settings = _fault_settings(args)
        credentials = None if args.tokens_file is None else Credentials(Path(args.tokens_file))
        store = IssuerStore.open(args.store)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            sock = bind(args.host, args.port)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if credentials is None:
            log.warning(NO_TOKENS_WARNING)
            if not _is_loopback(args.host):
                log.warning("listening on %s: anyone who reaches the port can grant, revoke and export", args.host)
        else:
            count = credentials.token_count
            log.info("tokens file %s read: %d token%s in force", credentials.path, count, "" if count == 1 else "s")
            if credentials.readable_by_others():
                log.warning("tokens file %s is readable by other users than its owner (chmod 600)", credentials.path)
        app = create_app(store, FaultInjector(settings), credentials=credentials)
        server = build_server(app, access_log=not args.no_access_log)
        host, port = sock.getsockname()[:2]
        shown_host = f"[{host}]" if ":" in host else host
        log.info("store %s, faults %s", store.url, json.dumps(settings.as_dict()))
        print(f"issuer service listening on http://{shown_host}:{port}", flush=True)
        # uvicorn re-raises the signal that stopped it once it has shut down; make that a clean exit.
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, lambda _signum, _frame: None)
        server.run(sockets=[sock])
    finally:
        store.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
