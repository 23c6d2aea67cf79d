"""A DAG run's progress, counted from its task instances' states in Airflow's metadata DB.

``ops/run_dag.py --progress`` prints a line every few seconds while ``dag.test`` runs, and a
last one when it ends::

    entitlement_grant: 12/53 task instances done (grant 10/48); running: grant [1m05s]
    entitlement_grant: 53/53 task instances done (grant 48/48) in 3m12s: success

A mapped task instance counts on its own (``grant`` is mapped over partitions); before a
mapped task expands it counts as one. Only reads, on its own connections: no Airflow import
here, so the line is testable without a DAG run (run_dag.py passes the reader).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

POLL_INTERVAL_S = 3.0  # a line at most this often, and only when something changed
QUIET_LINE_S = 30.0  # ... or when this long passed without one (the run is alive)

# Airflow's terminal task-instance states (airflow.utils.state.State.finished).
FINISHED_STATES = frozenset({"success", "failed", "skipped", "upstream_failed", "removed"})
FAILED_STATES = frozenset({"failed", "upstream_failed"})

TaskInstanceRow = tuple[str, int, str | None]  # task_id, map_index (-1: not mapped), state
ReadStates = Callable[[], Sequence[TaskInstanceRow]]


def elapsed_text(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def progress_text(dag_id: str, rows: Sequence[TaskInstanceRow]) -> str:
    """``entitlement_grant: 12/53 task instances done (grant 10/48), 1 failed; running: grant``."""
    done = sum(1 for _task, _index, state in rows if state in FINISHED_STATES)
    mapped_tasks = sorted({task for task, index, _state in rows if index >= 0})
    per_task = []
    for task in mapped_tasks:
        instances = [state for name, index, state in rows if name == task and index >= 0]
        per_task.append(f"{task} {sum(1 for s in instances if s in FINISHED_STATES)}/{len(instances)}")
    text = f"{dag_id}: {done}/{len(rows)} task instances done"
    if per_task:
        text += f" ({', '.join(per_task)})"
    failed = sum(1 for _task, _index, state in rows if state in FAILED_STATES)
    if failed:
        text += f", {failed} failed"
    running = Counter(task for task, _index, state in rows if state == "running")
    if running:
        text += "; running: " + ", ".join(f"{task} ×{n}" if n > 1 else task for task, n in sorted(running.items()))
    return text


class ProgressReporter:
    """Polls ``read_states`` in a thread and writes a progress line when it changed (at most every few seconds)."""

    def __init__(
        self,
        dag_id: str,
        read_states: ReadStates,
        write: Callable[[str], None],
        interval_s: float = POLL_INTERVAL_S,
        quiet_line_s: float = QUIET_LINE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dag_id = dag_id
        self.read_states = read_states
        self.write = write
        self.interval_s = interval_s
        self.quiet_line_s = quiet_line_s
        self.clock = clock
        self.started = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dag-progress", daemon=True)
        self._last_text = ""
        self._last_line_at = self.started

    def start(self) -> None:
        """Start polling (in a daemon thread: it never keeps the process alive)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; no more lines."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 10)

    def _read(self) -> Sequence[TaskInstanceRow] | None:
        try:
            return self.read_states()
        except Exception:  # noqa: BLE001 - a busy metadata DB skips one line; it never stops the run
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rows = self._read()
            if not rows:  # the run is not created yet (dag.test parses and syncs the DAGs first)
                continue
            text = progress_text(self.dag_id, rows)
            now = self.clock()
            if text != self._last_text or now - self._last_line_at >= self.quiet_line_s:
                self.write(f"{text} [{elapsed_text(now - self.started)}]")
                self._last_text, self._last_line_at = text, now

    def finish(self, run_state: str) -> str:
        """Stop polling and write the last line: every task instance as the run left it, and the run's state."""
        self.stop()
        rows = self._read() or []
        line = f"{progress_text(self.dag_id, rows)} in {elapsed_text(self.clock() - self.started)}: {run_state}"
        self.write(line)
        return line
