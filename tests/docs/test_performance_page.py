"""The performance page is generated from the benchmark records, and the records say how to repeat them."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path
from types import ModuleType

from support import REPO_ROOT

BENCH = REPO_ROOT / "bench"


def bench_module(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_the_page_is_exactly_what_the_records_render() -> None:
    page = bench_module("performance_page")
    records = page.load_records()
    assert (REPO_ROOT / "docs" / "performance.md").read_text(encoding="utf-8") == page.render(records), (
        "docs/performance.md was edited by hand or a record changed: run .venv/bin/python bench/performance_page.py"
    )


def test_there_is_one_record_per_backend_at_full_scale_with_its_command_and_machine() -> None:
    records = bench_module("performance_page").load_records()
    full = [r for r in records if r.get("benchmark") == "grant pipeline"]
    assert sorted(r["backend"] for r in full) == ["postgresql", "sqlite"]
    for record in records:
        assert record["users"] >= 48_000_000
        words = shlex.split(record["command"])
        assert words[:2] == [".venv/bin/python", "bench/bench.py"]
        assert words[words.index("--users") + 1] == str(record["users"])
        assert words[words.index("--backend") + 1] == record["backend"]
        assert record["machine"]["cores"] and record["machine"]["memory_gib"]
        assert all(stage["peak_rss_mb"] >= 0 for stage in record["stages"])
    for record in full:
        stages = {s["stage"] for s in record["stages"]}
        assert {"partition", "grant (all partitions)", "rerun (nothing to do)", "reconcile (clean)"} <= stages


def test_the_stage_by_stage_record_runs_every_stage_at_ten_times_the_users() -> None:
    records = bench_module("performance_page").load_records()
    staged = [r for r in records if r.get("benchmark") == "grant pipeline, stage by stage"]
    assert [r["users"] for r in staged] == [480_000_000]
    words = shlex.split(staged[0]["command"])
    assert words[words.index("--stages") + 1] == "generate,freeze,partition,grant,reconcile,notify"
    assert "--partitions-sample" in words
    stages = [s["stage"] for s in staged[0]["stages"]]
    assert stages[:3] == ["generate users", "freeze snapshot", "partition"]
    assert {"grant (sample)", "reconcile (sample)", "notify (sample)"} <= set(stages)


def test_render_puts_each_figure_of_a_record_in_its_table(tmp_path: Path) -> None:
    page = bench_module("performance_page")
    record = {
        "command": ".venv/bin/python bench/bench.py --users 10 --backend sqlite",
        "machine": {
            "cores": 2,
            "cpu": "Test CPU",
            "memory_gib": 24.0,
            "os": "Linux 6",
            "python": "3.11.2",
            "polars": "1.0",
            "sqlite": "3.40.1",
            "measured_on": "2026-12-05",
        },
        "backend": "sqlite",
        "users": 10,
        "partitions": 1,
        "writers": 1,
        "stages": [
            {
                "stage": "grant (all partitions)",
                "rows": 50,
                "seconds": 0.5,
                "rows_per_s": 100,
                "peak_rss_mb": 7,
                "target": ">= 1,000,000 grants/s",
            },
        ],  # fmt: skip
        "lookup": {"median_ms": 0.25, "p99_ms": 1.5},
        "lookups": 1000,
        "ratio_vs_naive": 2.5,
    }
    text = page.render([record])
    assert "| grant (all partitions) | 50 | 0.50 | 100 | 7 | ≥ 1,000,000 grants/s |" in text
    assert "2 cores (Test CPU), 24.0 GiB memory" in text
    assert ".venv/bin/python bench/bench.py --users 10 --backend sqlite" in text
    assert "median 0.250 ms, p99 1.500 ms over 1,000 random users" in text


def test_bench_stages_run_each_stage_and_record_what_the_page_renders(tmp_path: Path) -> None:
    import json
    import os
    import subprocess

    record = tmp_path / "records" / "staged.json"
    command = [sys.executable, str(BENCH / "bench.py"), "--users", "20000", "--partitions", "4"]
    command += ["--stages", "generate,freeze,partition,grant,reconcile,notify", "--partitions-sample", "0.5"]
    command += ["--home", str(tmp_path / "home"), "--record", str(record)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITLE_")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sample: 2 of 4 partitions (one in 2)" in result.stdout
    document = json.loads(record.read_text(encoding="utf-8"))
    by_stage = {s["stage"]: s for s in document["stages"]}
    assert list(by_stage) == [
        "generate users",
        "freeze snapshot",
        "partition",
        "grant (sample)",
        "reconcile (sample)",
        "notify (sample)",
    ]
    assert by_stage["freeze snapshot"]["rows"] > 20_000  # the demo file's bad and duplicate rows too
    assert by_stage["grant (sample)"]["rows"] == by_stage["reconcile (sample)"]["rows"] > 0
    assert all(s["peak_rss_mb"] > 0 for s in document["stages"])
    page = bench_module("performance_page")
    assert "## 20,000 users, stage by stage, SQLite ledger" in page.render(page.load_records(record.parent))
