"""``entitle report`` and ``query``: a reconciliation's HTML page and chart, and the named analyst queries."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pipeline import reconciliation, schemas
from pipeline.cli.output import emit
from pipeline.config import Settings
from pipeline.errors import QueryError
from pipeline.grants import runs
from pipeline.ledger import queries


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    """Render a stored reconciliation as HTML and PNG."""
    from pipeline import report

    with runs.open_pipeline(settings) as pipeline:
        document = reconciliation.load_result(pipeline, args.reconciliation)
        out_dir = args.out or Path(document["export_dir"])
        html, png = report.write_report(document, out_dir)
        emit(
            args,
            {"reconciliation_id": document["reconciliation_id"], "html": str(html), "png": str(png)},
            [f"report of {document['reconciliation_id']} ({document['verdict']}): {html}", f"chart: {png}"],
        )
        return 0


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    """Named queries."""
    if args.list or not args.name:
        names = queries.list_queries()
        described = [(n, queries.load_query(n, "sqlite")) for n in names]
        emit(
            args,
            {
                "queries": [
                    {
                        "name": n,
                        "parameters": list(q.parameters),
                        "declared": [{"name": d.name, "type": d.type, "required": d.required} for d in q.declared],
                        "description": q.description,
                    }
                    for n, q in described
                ]
            },
            [
                f"{n}  ({', '.join(d.describe() for d in q.declared) or 'no parameters'})\n    {q.description}"
                for n, q in described
            ],
        )
        return 0
    params: dict[str, str] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QueryError(f"--param {item!r} must look like KEY=VALUE")
        params[key] = value
    from sqlalchemy.engine import make_url

    from pipeline.ledger import open_ledger

    url = make_url(settings.ledger_url)
    query = queries.load_query(args.name, url.get_backend_name())
    queries.bind_parameters(query, params)  # a wrong parameter exits 2 before the ledger is read
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise QueryError(f"no ledger at {url.database} yet; run `entitle run --users FILE` first")
    fmt = "json" if args.json else args.format
    if fmt == "parquet" and args.out is None:
        raise QueryError("--format parquet writes a binary file: give --out FILE.parquet")
    with open_ledger(settings.ledger_url) as opened:
        result = queries.run_query(opened.engine, query, params)
    if fmt == "parquet":
        rows = queries.write_parquet(result, args.out)
        print(f"wrote {rows:,} rows to {args.out}", file=sys.stderr)
        return 0
    with _output(args.out) as stream:
        records = ({c: v for c, v in zip(result.columns, row, strict=True)} for row in result.rows)
        if fmt == "json":  # one array of records, columns in the query's order
            print(json.dumps(list(records), default=str, ensure_ascii=False), file=stream)
        elif fmt == "ndjson":  # one record a line
            for record in records:
                print(json.dumps(record, default=str, ensure_ascii=False), file=stream)
        elif fmt == "csv":
            writer = csv.writer(stream)
            writer.writerow(result.columns)
            writer.writerows(result.rows)
        else:
            print(_table(result.columns, result.rows), file=stream)
    return 0


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    """Standard output, or a file written atomically."""
    if path is None:
        yield sys.stdout
        return
    with schemas.replaced_atomically(path) as temporary, open(temporary, "w", encoding="utf-8", newline="") as handle:
        yield handle


def _table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells)
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)
