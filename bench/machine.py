"""What a benchmark ran on: cores, CPU, memory, kernel, Python and the libraries that set the pace."""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import sqlite3
from importlib import metadata
from pathlib import Path
from typing import Any


def describe(pg_url: str | None = None) -> dict[str, Any]:
    """The machine and software versions, for a benchmark record."""
    machine: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "polars": metadata.version("polars"),
        "sqlite": sqlite3.sqlite_version,
        "measured_on": dt.datetime.now(dt.UTC).date().isoformat(),
    }
    if pg_url is not None:
        machine["postgresql"] = _postgres_version(pg_url)
    return machine


def summary(machine: dict[str, Any]) -> str:
    """One line: ``2 cores (…), 24 GiB, Linux 6.1, Python 3.11.2, …``."""
    parts = [
        f"{machine['cores']} cores ({machine['cpu']})",
        f"{machine['memory_gib']} GiB memory",
        str(machine["os"]),
        f"Python {machine['python']}",
        f"Polars {machine['polars']}",
        f"SQLite {machine['sqlite']}",
    ]
    if "postgresql" in machine:
        parts.append(str(machine["postgresql"]))
    return ", ".join(parts)


def _cpuinfo(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        return None
    return None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        return None
    return None


def _postgres_version(pg_url: str) -> str:
    import psycopg

    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        row = connection.execute("SHOW server_version").fetchone()
        settings = {
            name: connection.execute(f"SHOW {name}").fetchone()
            for name in ("shared_buffers", "max_wal_size", "synchronous_commit")
        }
    tuned = ", ".join(f"{k} {v[0]}" for k, v in settings.items() if v)
    return f"PostgreSQL {row[0] if row else '?'} ({tuned})"


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement for this process (VmHWM); False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset (VmHWM), in MB.

    ru_maxrss would carry the parent's peak over exec; it is the fallback off Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
