"""bench.py --stages: chosen stages one by one, each with its time and its own peak RSS.

    .venv/bin/python bench/bench.py --users 480000000 --partitions 1024 \\
        --stages generate,freeze,partition,grant,reconcile,notify --partitions-sample 0.05

generate, freeze and partition run on every user; grant, reconcile and notify on a
sample of the snapshot's partitions spread evenly over its buckets (every k-th
partition), one partition at a time in bucket order, printing the rate of each
tenth of the sample so a rate that falls as the ledger grows shows.  Stages left
out reuse the work folder a previous run kept (--keep): e.g. ``--stages grant``
after ``--stages generate,freeze,partition --keep``.  Peak RSS is this process's
high-water mark, reset before each stage (Linux: /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import reset_peak_rss  # bench/machine.py, beside this script

STAGES = ("generate", "freeze", "partition", "grant", "reconcile", "notify")
SAMPLED = ("grant", "reconcile", "notify")
TENTHS = 10

Report = Callable[[str, int, float, float, str], None]


def parse(text: str) -> list[str]:
    """The stages named in ``text`` (comma-separated), in pipeline order; SystemExit on an unknown one."""
    named = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(named) - set(STAGES))
    if unknown:
        raise SystemExit(f"--stages: unknown {', '.join(unknown)}; choose from {','.join(STAGES)}")
    return [name for name in STAGES if name in named]


def run(args: argparse.Namespace, home: Path, env: dict[str, str], report: Report, rss: Callable[[], float]) -> int:
    """Run the chosen stages; 0, or 1 when a stage's result is wrong."""
    from pipeline.config import load_settings
    from pipeline.grants import runs
    from pipeline.grants.demo_users import write_demo_users
    from pipeline.grants.snapshot import load_snapshot_report

    stages = parse(args.stages)
    users_file = home / "users.parquet"
    home.mkdir(parents=True, exist_ok=True)
    if "generate" in stages:
        reset_peak_rss()
        started = time.perf_counter()
        write_demo_users(args.users, users_file)
        report("generate users", args.users, time.perf_counter() - started, rss(), "")
    pipeline = runs.open_pipeline(load_settings(env))
    runs.register(pipeline)
    if "freeze" in stages:
        reset_peak_rss()
        started = time.perf_counter()
        frozen = runs.freeze(pipeline, users_file)
        seconds = time.perf_counter() - started
        (home / "frozen.json").write_text(json.dumps({"directory": frozen.directory}))
        report("freeze snapshot", frozen.rows_read, seconds, rss(), _target(args.users))
    if "partition" in stages:
        frozen = load_snapshot_report(Path(json.loads((home / "frozen.json").read_text())["directory"]))
        for written in Path(frozen.directory).glob("partitions-*"):  # else a complete set is reused, not timed
            shutil.rmtree(written)
        reset_peak_rss()
        started = time.perf_counter()
        runs.partition(pipeline, frozen)
        seconds = time.perf_counter() - started
        report("partition", frozen.eligible_users, seconds, rss(), _target(args.users))
    sampled = [stage for stage in stages if stage in SAMPLED]
    if not sampled:
        return 0
    run_handle = runs.start_run(pipeline, trigger="bench")
    every = max(1, round(1 / args.partitions_sample))
    entries = list(run_handle.entries)[::every]
    print(
        f"sample: {len(entries)} of {len(run_handle.entries)} partitions (one in {every}), "
        f"{sum(e.rows for e in entries):,} users",
        flush=True,
    )
    for stage in sampled:
        reset_peak_rss()
        rates = _STAGE_RUNNERS[stage](pipeline, run_handle, entries)
        _report_rates(stage, rates, report, rss())
    return 0


def _target(users: int) -> str:
    if users >= 400_000_000:
        return "freeze + partition <= 240 s together, peak RSS <= 2,048 MB"
    return "freeze + partition <= 20 s together for 48M, peak RSS <= 1,536 MB"


def _grant(pipeline: Any, run_handle: Any, entries: list[Any]) -> list[tuple[int, float]]:
    from pipeline.grants import runs

    rates = []
    for entry in entries:
        started = time.perf_counter()
        outcomes = runs.grant(pipeline, run_handle, [entry])
        runs.require_all_done(outcomes)
        rates.append((sum(o.written for o in outcomes), time.perf_counter() - started))
    return rates


def _reconcile(pipeline: Any, run_handle: Any, entries: list[Any]) -> list[tuple[int, float]]:
    """Each sampled partition checked as `entitle reconcile` checks it (by checksum)."""
    from pipeline import storage
    from pipeline.grants.snapshot import EXCLUDED_FILE_NAME
    from pipeline.reconciliation.campaign import _known_skus
    from pipeline.reconciliation.checksums import item_terms
    from pipeline.reconciliation.compare import PartitionTask, check_partition, dispose_engines

    snapshot_dir = Path(run_handle.entries[0].path).parent.parent
    excluded = snapshot_dir / EXCLUDED_FILE_NAME
    excluded_file = excluded if storage.exists(excluded) else None
    terms, known = item_terms(pipeline), _known_skus(pipeline)
    rates = []
    for entry in entries:
        task = PartitionTask(
            pipeline.settings.ledger_url,
            pipeline.keys.campaign_key,
            run_handle.snapshot_id,
            terms,
            known,
            entry,
            True,
            "checksum",
            excluded_file,
        )
        started = time.perf_counter()
        check = check_partition(task)
        seconds = time.perf_counter() - started
        if check.state != "matched":
            raise SystemExit(f"{entry.label}: reconciliation says {check.state} ({check.error or check.counts})")
        rates.append((entry.rows * len(pipeline.campaign.items), seconds))
    dispose_engines()
    return rates


def _notify(pipeline: Any, run_handle: Any, entries: list[Any]) -> list[tuple[int, float]]:
    """Each sampled partition's granted notices, as `entitle notices granted` exports them."""
    import tempfile

    from pipeline.grants.notices import _export_aggregated, _GrantedQuery

    query = _GrantedQuery.of(pipeline, run_handle.run_key)
    if query is None:
        raise SystemExit("the campaign has too many items for the aggregate notice export")
    rates = []
    with tempfile.TemporaryDirectory() as out:
        for entry in entries:
            started = time.perf_counter()
            users = _export_aggregated(pipeline.engine, query, entry, Path(out))
            rates.append((users or 0, time.perf_counter() - started))
    return rates


_STAGE_RUNNERS: dict[str, Callable[[Any, Any, list[Any]], list[tuple[int, float]]]] = {
    "grant": _grant,
    "reconcile": _reconcile,
    "notify": _notify,
}


def _report_rates(stage: str, rates: list[tuple[int, float]], report: Report, rss_mb: float) -> None:
    """Print the stage's total, the rate of each tenth of the sample and the last tenth against the first."""
    rows = sum(r for r, _ in rates)
    seconds = sum(s for _, s in rates)
    size = max(1, len(rates) // TENTHS)
    tenths = [rates[i : i + size] for i in range(0, len(rates), size)][:TENTHS]
    per_tenth = [sum(r for r, _ in part) / max(sum(s for _, s in part), 1e-9) for part in tenths]
    trend = " ".join(f"{rate / 1e6:.2f}" for rate in per_tenth)
    unit = "users" if stage == "notify" else "grants"
    report(
        f"{stage} (sample)",
        rows,
        seconds,
        rss_mb,
        f"{len(rates)} partitions; M {unit}/s by tenth of the sample, in ledger order: {trend} "
        f"(last tenth {per_tenth[-1] / per_tenth[0]:.0%} of the first)",
    )
