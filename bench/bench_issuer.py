"""Benchmark of the reference entitlement service: grants/s through batch calls over real HTTP.

    .venv/bin/python bench/bench_issuer.py --grants 200000 --connections 4

Starts ``python -m issuer_service`` as a child process (SQLite store in
a temporary folder unless --store is given; no faults; no access log), then
sends every grant in batches of --batch from --connections concurrent
keep-alive connections (httpx, one asyncio loop), twice: first every grant is
``created``, then the same bodies again (a client's replay) and every grant is
``exists``. Request bodies are encoded before the clock starts (that cost is
printed on its own line); each answer is decoded and every outcome checked.
The client and the service share the machine, so next to the wall-clock rate
each phase prints the CPU time the service process and the client spent per
grant (Linux /proc), which other load on the machine does not inflate much.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SKUS = ("emoticon-permanent", "emoticon-90d-a", "emoticon-90d-b", "coupon-2000", "coupon-3000")
AMOUNTS_KRW = (None, None, None, 2000, 3000)
CAMPAIGN_ID = "bench-campaign"
START_TIMEOUT_S = 30
REQUEST_TIMEOUT_S = 60
TARGET_GRANTS_PER_S = 40_000  # the service alone; the pipeline end to end must reach 20,000/s


def batch_bodies(grants: int, batch: int) -> list[bytes]:
    """The request bodies of ``grants`` grants (5 items per user), ``batch`` per body."""
    bodies = []
    items: list[dict[str, object]] = []
    for n in range(grants):
        user_id, item = divmod(n, len(SKUS))
        user_id += 1
        sku = SKUS[item]
        items.append(
            {
                "grant_id": f"{CAMPAIGN_ID}:{user_id}:{sku}:0",
                "campaign_id": CAMPAIGN_ID,
                "user_id": user_id,
                "item_sku": sku,
                "issue_no": 0,
                "amount_krw": AMOUNTS_KRW[item],
                "valid_from": "2023-01-05T00:00:00+09:00",
                "valid_until": None if item == 0 else "2023-04-05T00:00:00+09:00",
            }
        )
        if len(items) == batch:
            bodies.append(json.dumps({"grants": items}, separators=(",", ":")).encode())
            items = []
    if items:
        bodies.append(json.dumps({"grants": items}, separators=(",", ":")).encode())
    return bodies


async def send_all(base_url: str, bodies: list[bytes], connections: int, expected: str) -> float:
    """Send every body from ``connections`` concurrent connections; seconds taken. Raises on a wrong outcome."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                response = await client.post("/v1/grants:batch", content=body, headers=headers)
                response.raise_for_status()
                results = response.json()["results"]
                wrong = [r for r in results if r["status"] != expected]
                if wrong:
                    raise RuntimeError(f"expected every grant {expected}, got {wrong[:3]}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return time.perf_counter() - started


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grants", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1_000, help="grants per request (1..1000)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent client connections")
    parser.add_argument("--store", default=None, help="store URL or SQLite path (default: a temporary SQLite file)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-issuer-") as work:
        store = args.store or str(Path(work) / "issuer.sqlite")
        started = time.perf_counter()
        bodies = batch_bodies(args.grants, args.batch)
        encode_s = time.perf_counter() - started
        mib = sum(map(len, bodies)) / 2**20
        print(f"client encode: {args.grants:,} grants in {len(bodies):,} bodies ({mib:,.1f} MiB) in {encode_s:.2f} s")
        service = subprocess.Popen(
            [sys.executable, "-m", "issuer_service", "--store", store, "--port", "0", "--no-access-log", "--no-auth"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert service.stdout is not None
            line = service.stdout.readline()
            match = re.search(r"listening on (http://\S+)", line)
            if match is None:
                print(f"the service did not start: {line!r}", file=sys.stderr)
                return 1
            base_url = match.group(1)
            print(f"service {base_url}, store {store}, batch {args.batch}, {args.connections} connections")
            for phase, expected in (("created", "created"), ("replay (exists)", "exists")):
                service_cpu_before, client_cpu_before = process_cpu_s(service.pid), time.process_time()
                seconds = asyncio.run(send_all(base_url, bodies, args.connections, expected))
                service_cpu_after, client_cpu_after = process_cpu_s(service.pid), time.process_time()
                rate = args.grants / seconds
                verdict = "ok" if rate >= TARGET_GRANTS_PER_S else "BELOW TARGET"
                cpu = ""
                if service_cpu_before is not None and service_cpu_after is not None:
                    service_us = (service_cpu_after - service_cpu_before) / args.grants * 1e6
                    client_us = (client_cpu_after - client_cpu_before) / args.grants * 1e6
                    cpu = f"; CPU per grant: service {service_us:.1f} µs, client {client_us:.1f} µs"
                print(
                    f"{phase:16} {args.grants:>10,} grants in {seconds:6.2f} s = {rate:>9,.0f} grants/s "
                    f"(target {TARGET_GRANTS_PER_S:,}/s: {verdict}){cpu}"
                )
            stats = httpx.get(f"{base_url}/v1/stats").json()
            print(f"stored {stats['grants_stored']:,} grants; outcomes {stats['outcomes']}")
        finally:
            service.terminate()
            service.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
