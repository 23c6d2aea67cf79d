"""``entitle db``: migrate the ledger's schema, show its version, create its roles."""

from __future__ import annotations

import argparse

from pipeline import ledger
from pipeline.cli.output import emit
from pipeline.config import Settings


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    """Ledger administration."""
    where = settings.describe_ledger()
    with ledger.open_ledger(settings.ledger_url) as opened:
        engine = opened.engine
        if args.action == "roles":
            roles = ledger.apply_roles(engine)
            emit(
                args,
                {"roles": list(roles), "ledger": where},
                [
                    f"roles applied on {where}: {', '.join(roles)}",
                    "give them to login users, e.g. GRANT entitle_analyst TO alice;",
                ],
            )
        elif args.action == "upgrade":
            done = ledger.upgrade(engine)
            if done.from_version is None:
                text = f"{where}: new ledger created at schema version {done.to_version}"
            elif done.migrations:
                text = (
                    f"{where}: upgraded from schema version {done.from_version} to {done.to_version} "
                    f"(migrations {', '.join(done.migrations)})"
                )
            else:
                text = f"{where}: already at schema version {done.to_version}; nothing to do"
            emit(args, {"ledger": where, **done.as_dict()}, [text])
        else:
            found = ledger.recorded_version(engine)
            current = found == ledger.SCHEMA_VERSION
            advice = "up to date" if current else "run `entitle db upgrade`" if found is not None else "empty"
            emit(
                args,
                {"ledger": where, "schema_version": found, "program_schema_version": ledger.SCHEMA_VERSION},
                [
                    f"{where}: schema version {found if found is not None else '-'}, this program "
                    f"{ledger.SCHEMA_VERSION} ({advice})"
                ],
            )
    return 0
