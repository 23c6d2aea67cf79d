r"""Benchmark of delivery: grants per second from the ledger to the reference entitlement service, end to end.

    .venv/bin/python bench/bench_delivery.py --users 200000

Starts the reference service (its own SQLite store, no faults) on a free
loopback port, grants USERS synthetic users the bundled campaign with its two
coupons (``--all-items``: every item) routed to an http issuer, then times
``entitle deliver`` (batch calls) and prints grants/s delivered, the request
rate achieved against the issuer's budget, and a check that the service holds
exactly the planned grants, then times the three-way ``entitle reconcile`` (the
ledger against the service's export). Targets are printed beside the figures.

``--processes N`` splits the partitions between N ``entitle deliver`` processes
started together: the issuer's rate budget is shared through the ledger, so the
rate the service saw (from its request arrival times) must stay within the
budget however many processes deliver. ``--busy-cpu N`` keeps N busy-loop
processes running while they deliver, and ``--runs N`` repeats the whole
benchmark from scratch. Each run prints the most requests the service received
in any one-second window (sliding, from its own arrival times) against the
budget + 1 that pipeline/delivery/rate_budget.py bounds it by:

    .venv/bin/python bench/bench_delivery.py --users 20000 --batch-size 100 --requests-per-s 20 \
        --processes 2 --busy-cpu 2 --runs 4

That bound holds at the issuer while each request reaches it within one interval
(1 / requests_per_s) less 20 ms of leaving its sender.  An issuer is another machine;
here the service shares the busy cores, and a service starved of CPU reads two
requests late and together, which is the stand-in's delay, not the senders'.  So
with ``--busy-cpu`` the service runs at a higher scheduling priority (nice
``ISSUER_NICE``, when this user may raise it; the run says so when it may not):
the busy loops load the senders and the ledger, and the service's arrival times
measure what the senders did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from pipeline.delivery import rate_budget

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGET_GRANTS_PER_S = 20_000
BUDGET_TOLERANCE = 0.05
WINDOW_S = 1.0  # the sliding window the busiest second is counted in
ISSUER_NICE = -10  # the issuer service stands for another machine: the busy loops must not starve it
CPU_BURNER = "while True: pass"

CAMPAIGN = """
[campaign]
id = "kakao-outage-2022"
name = "Kakao outage compensation (delivery benchmark)"
time_zone = "Asia/Seoul"
start = 2023-01-05T00:00:00

[issuers.shop]
kind = "http"
url = "http://127.0.0.1:9"   # ENTITLE_ISSUER_SHOP_URL points it at the service started here
requests_per_s = {requests_per_s}
concurrency = {concurrency}
batch_size = {batch_size}
timeout_s = 30

[[items]]
sku = "emoticon-permanent"
kind = "emoticon"
validity = "permanent"
{emoticon_issuer}

[[items]]
sku = "emoticon-90d-a"
kind = "emoticon"
validity = "90d"
{emoticon_issuer}

[[items]]
sku = "emoticon-90d-b"
kind = "emoticon"
validity = "90d"
{emoticon_issuer}

[[items]]
sku = "coupon-2000"
kind = "coupon"
amount_krw = 2000
validity = "90d"
issuer = "shop"

[[items]]
sku = "coupon-3000"
kind = "coupon"
amount_krw = 3000
validity = "90d"
issuer = "shop"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--requests-per-s", type=float, default=25.0, help="the issuer's rate budget (default 25)")
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument(
        "--processes", type=int, default=1, help="entitle deliver processes at once, partitions split between them"
    )
    parser.add_argument("--busy-cpu", type=int, default=0, help="busy-loop processes running while delivering")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole benchmark from scratch (default 1)")
    parser.add_argument("--all-items", action="store_true", help="route every item to the issuer, not only coupons")
    parser.add_argument("--home", type=Path, default=ROOT / "var" / "bench-delivery")
    args = parser.parse_args()
    print("command: " + shlex.join([".venv/bin/python", "bench/bench_delivery.py", *sys.argv[1:]]))
    busiest: list[int] = []
    for run in range(1, args.runs + 1):
        if args.runs > 1:
            print(f"--- run {run} of {args.runs}")
        most = bench_once(args)
        if most is None:
            return 1
        busiest.append(most)
    if args.runs > 1:
        bound = int(args.requests_per_s) + 1
        print(
            f"busiest one-second window at the service over {args.runs} runs: {', '.join(map(str, busiest))} "
            f"requests, budget {args.requests_per_s:g} + 1 = {bound}: "
            f"{'held' if max(busiest) <= bound else 'EXCEEDED'} (largest {max(busiest)})"
        )
    return 0


def bench_once(args: argparse.Namespace) -> int | None:
    """One run from scratch; the most requests the service received in one second, None when delivery failed."""
    shutil.rmtree(args.home, ignore_errors=True)
    args.home.mkdir(parents=True)
    campaign_file = args.home / "campaign.toml"
    campaign_file.write_text(
        CAMPAIGN.format(
            requests_per_s=args.requests_per_s,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            emoticon_issuer='issuer = "shop"' if args.all_items else "",
        ),
        encoding="utf-8",
    )
    service = subprocess.Popen(
        [str(BIN / "python"), "-m", "issuer_service", "--store", str(args.home / "issuer.sqlite"), "--port", "0"]
        + ["--no-access-log", "--log-level", "warning", "--no-auth"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_as_another_machine if args.busy_cpu else None,
    )
    try:
        assert service.stdout is not None
        url = service.stdout.readline().strip().rsplit(" ", 1)[-1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITLE_")}
        env.update(
            ENTITLE_HOME=str(args.home / "var"),
            ENTITLE_CAMPAIGN=str(campaign_file),
            ENTITLE_PARTITIONS=str(args.partitions),
            ENTITLE_ISSUER_SHOP_URL=url,
        )
        users = args.home / "users.parquet"
        entitle = str(BIN / "entitle")
        subprocess.run([entitle, "demo-users", "--count", str(args.users), "--out", str(users)], env=env, check=True)
        started = time.perf_counter()
        subprocess.run([entitle, "run", "--users", str(users), "--no-progress"], env=env, check=True)
        grant_s = time.perf_counter() - started
        with busy_cpu(args.busy_cpu):
            started = time.perf_counter()
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            service_before = _cpu_s(service.pid)
            shares = [list(range(i, args.partitions, args.processes)) for i in range(args.processes)]
            deliveries = [
                subprocess.Popen(
                    [entitle, "deliver", "--json", "--no-progress"]
                    + (["--partitions", ",".join(map(str, share))] if args.processes > 1 else []),
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for share in shares
            ]
            outputs = [process.communicate() for process in deliveries]
            deliver_s = time.perf_counter() - started
            children_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # before the burners are reaped
            service_cpu_s = _cpu_s(service.pid) - service_before
        client_cpu_s = (children_after.ru_utime + children_after.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        for process, (stdout, stderr) in zip(deliveries, outputs, strict=True):
            if process.returncode != 0:
                print(stdout[-3000:], stderr[-3000:], file=sys.stderr)
                return None
        documents: list[dict[str, Any]] = [json.loads(stdout) for stdout, _ in outputs]
        stats = httpx.get(url + "/v1/stats").json()
        # Three-way reconciliation: snapshot x campaign vs ledger vs the service's export.
        started = time.perf_counter()
        checked, reconcile_rss_kib = _run_measured([entitle, "reconcile", "--json", "--no-progress"], env, args.home)
        reconcile_s = time.perf_counter() - started
        reconciled: dict[str, Any] = json.loads(checked)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
    totals = {key: sum(d["totals"][key] for d in documents) for key in documents[0]["totals"]}
    requests = sum(d["budgets"]["shop"]["requests"] for d in documents)
    delivered = totals["created"] + totals["exists"]
    rate = delivered / deliver_s
    # The rate the service saw, from its arrival times: every process's requests together.
    arrivals = sorted(stats["arrivals"])
    achieved = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    most = rate_budget.busiest_window(arrivals, WINDOW_S)
    own = ", ".join(f"{d['budgets']['shop']['requests_per_s'] or 0:.2f}" for d in documents)
    slots_missed = sum(d["budgets"]["shop"]["slots_missed"] for d in documents)
    # The budget is a ceiling: it is held when the rate never goes above it by more than 5 %. It is
    # reached only when the service keeps up (tests/test_delivery.py measures it at 20 req/s).
    held = achieved <= (1 + BUDGET_TOLERANCE) * args.requests_per_s
    print(f"users {args.users:,}; grants to deliver {totals['planned']:,} (granted in {grant_s:.1f} s)")
    print(
        f"deliver: {delivered:,} grants in {deliver_s:.2f} s = {rate:,.0f} grants/s end to end "
        f"(process start to exit)   target >= {TARGET_GRANTS_PER_S:,} grants/s: {'met' if rate >= 20_000 else 'MISSED'}"
    )
    print(
        f"requests: {requests:,} from {args.processes} process(es), {achieved:.2f} req/s together as the service saw "
        f"them, against a budget of {args.requests_per_s:g} ({(achieved / args.requests_per_s - 1) * 100:+.1f} %)   "
        f"target: not above the budget by more than 5 %: {'met' if held else 'MISSED'}"
    )
    print(
        f"  busiest one-second window at the service: {most} requests against a budget of {args.requests_per_s:g} "
        f"(bound: budget + 1, with {args.busy_cpu} busy-loop process(es) beside); slots given up by senders "
        f"that woke too late: {slots_missed:,}"
    )
    print(f"  each process's own rate: {own} req/s")
    print(
        f"CPU per grant delivered: client (entitle deliver) {client_cpu_s / delivered * 1e6:.1f} µs, "
        f"service {service_cpu_s / delivered * 1e6:.1f} µs (2 cores shared by both)"
    )
    print(
        f"service: {stats['grants_stored']:,} grants stored, outcomes {stats['outcomes']}; "
        f"exactly the plan: {stats['grants_stored'] == totals['planned'] == delivered}"
    )
    issuer = reconciled["issuers"][0]
    print(
        f"three-way reconcile: {reconciled['verdict']} in {reconcile_s:.1f} s (process start to exit; "
        f"{reconciled['bridge']['ledger']:,} ledger grants checked, issuer {issuer['issuer']!r}: "
        f"{issuer['issuer_held']:,} exported grants compared in {issuer['duration_s']:.1f} s); "
        f"peak memory {reconcile_rss_kib / 1024:,.0f} MiB"
    )
    return most


def _as_another_machine() -> None:
    """In the service's process before it starts: a higher priority than the busy loops and senders."""
    try:
        os.nice(ISSUER_NICE)
    except PermissionError:
        note = f"note: cannot raise the issuer service's priority (nice {ISSUER_NICE}); it shares the busy cores"
        print(note, file=sys.stderr)


@contextlib.contextmanager
def busy_cpu(processes: int) -> Iterator[None]:
    """``processes`` busy-loop processes running for the duration, always stopped at the end."""
    burners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(processes):
            burners.append(subprocess.Popen([sys.executable, "-c", CPU_BURNER]))
        yield
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


def _run_measured(command: list[str], env: dict[str, str], home: Path) -> tuple[str, int]:
    """Run ``command``; its standard output and its own peak resident memory (KiB, from wait4)."""
    out = home / "measured.out"
    with out.open("w") as stdout:
        process = subprocess.Popen(command, env=env, stdout=stdout)
        _pid, _status, usage = os.wait4(process.pid, 0)
    return out.read_text(), int(usage.ru_maxrss)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
