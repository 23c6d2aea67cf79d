"""pipeline.worker_processes: a map over fresh worker interpreters, run for real (no mocks).

The mapped functions live at module level here: the workers import them by
module name, with the parent's sys.path (pytest puts this folder on it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from pipeline.worker_processes import RemoteTaskError, WorkerProcessError, map_in_processes

TESTS_DIR = Path(__file__).resolve().parent
SLOW_ITEM_S = 0.3  # long enough that two workers both get items while one is busy
SCRIPT_TIMEOUT_S = 120
DAEMON_ANSWER_TIMEOUT_S = 120
MARKER_WAIT_S = 60  # a helper waiting for another worker's marker file gives up after this


# --------------------------------------------------------------------------- mapped functions


def square_once_the_last_is_done(item: tuple[str, int, int]) -> tuple[int, int]:
    """(folder, number, last): number squared and the worker's pid; item 0 waits until item ``last`` is done."""
    folder, number, last = item
    marker = Path(folder, "last-done")
    if number == 0:
        deadline = time.monotonic() + MARKER_WAIT_S
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    if number == last:
        marker.touch()
    return number * number, os.getpid()


def slow_pid(delay_s: float) -> int:
    """The pid of the worker, after ``delay_s`` seconds."""
    time.sleep(delay_s)
    return os.getpid()


def fail_on_three(number: int) -> int:
    """Raise ValueError for 3, else echo."""
    if number == 3:
        raise ValueError(f"bad item {number}")
    return number


class TwoArgumentError(Exception):
    """Pickles, but cannot be unpickled: Exception pickles args only, and __init__ wants two."""

    def __init__(self, left: str, right: str) -> None:
        super().__init__(f"{left} and {right}")


def fail_with_unpicklable_exception(number: int) -> int:
    """Raise an exception that does not come back through pickle."""
    raise TwoArgumentError("left", f"right {number}")


def record_pid_then_maybe_die(item: tuple[str, int]) -> int:
    """Write this worker's pid into a folder; item 2 kills its worker with exit code 3."""
    folder, number = item
    Path(folder, str(os.getpid())).touch()
    if number == 2:
        os._exit(3)
    time.sleep(SLOW_ITEM_S)
    return number


def die_when_idle_or_outlive_it(item: tuple[str, bool]) -> int:
    """(folder, True): reply at once, then mark the folder and end this worker (exit code 7) while it is idle.

    (folder, False): stay busy until that worker has died, and a while longer, so the parent sees the death first.
    """
    folder, die = item
    marker = Path(folder, "dying")
    if die:
        threading.Thread(target=lambda: (time.sleep(0.2), marker.touch(), os._exit(7)), daemon=True).start()
    else:
        deadline = time.monotonic() + MARKER_WAIT_S
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
    return os.getpid()


def chatty(number: int) -> int:
    """Print to stdout (which in a worker must not reach the reply frames)."""
    print(f"chatty says {number}")
    sys.stdout.flush()
    os.write(1, b"straight to fd 1\n")
    return number + 1


def _alive(pid: int) -> bool:
    # A reaped child is gone; an unreaped (zombie) one would still answer signal 0.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids_in(folder: Path) -> list[int]:
    return [int(p.name) for p in folder.iterdir()]


# --------------------------------------------------------------------------- the map


def test_results_come_in_input_order_from_several_workers(tmp_path: Path) -> None:
    # Item 0 blocks its worker until item 7 is done: the other worker must take every later item
    # meanwhile (dynamic dispatch), and the results still come in input order.
    items = [(str(tmp_path), n, 7) for n in range(8)]
    results = list(map_in_processes(square_once_the_last_is_done, items, workers=2))
    assert [value for value, _ in results] == [n * n for n in range(8)]
    pids = [pid for _, pid in results]
    assert os.getpid() not in pids
    assert len(set(pids)) == 2
    assert pids[0] not in pids[1:]


def test_an_exception_in_a_child_is_raised_in_the_parent_with_its_type_and_message() -> None:
    with pytest.raises(ValueError) as raised:
        list(map_in_processes(fail_on_three, range(6), workers=2))
    assert str(raised.value) == "bad item 3"
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "item 3" in notes and "Traceback" in notes and "fail_on_three" in notes


def test_an_exception_that_does_not_unpickle_is_a_runtime_error_with_the_childs_traceback() -> None:
    with pytest.raises(RemoteTaskError, match="TwoArgumentError: left and right 0"):
        list(map_in_processes(fail_with_unpicklable_exception, [0], workers=1))


def test_a_child_that_dies_names_its_exit_code_and_no_child_is_left_running(tmp_path: Path) -> None:
    items = [(str(tmp_path), n) for n in range(6)]
    with pytest.raises(WorkerProcessError, match=r"worker process \d \(pid \d+\) exited with code 3") as raised:
        list(map_in_processes(record_pid_then_maybe_die, items, workers=2))
    assert "item 2" in str(raised.value)
    pids = _pids_in(tmp_path)
    assert len(pids) == 2
    assert not [pid for pid in pids if _alive(pid)]


def test_a_child_that_dies_while_idle_is_an_error_too(tmp_path: Path) -> None:
    # Item 0 keeps the first worker busy; the second replies to item 1, has nothing left to do, then dies.
    items = [(str(tmp_path), False), (str(tmp_path), True)]
    with pytest.raises(WorkerProcessError, match=r"exited with code 7 while idle"):
        list(map_in_processes(die_when_idle_or_outlive_it, items, workers=2))


def test_closing_the_iterator_early_stops_every_child(tmp_path: Path) -> None:
    items = [(str(tmp_path), n) for n in (0, 1, 3, 4, 5, 6)]
    with closing(map_in_processes(record_pid_then_maybe_die, items, workers=2)) as results:
        assert next(results) == 0
    pids = _pids_in(tmp_path)
    assert pids
    assert not [pid for pid in pids if _alive(pid)]


def test_what_the_function_prints_goes_to_stderr_and_not_into_the_frames(capfd: pytest.CaptureFixture[str]) -> None:
    assert list(map_in_processes(chatty, range(4), workers=2)) == [1, 2, 3, 4]
    captured = capfd.readouterr()
    assert "chatty says 3" in captured.err and "straight to fd 1" in captured.err
    assert "chatty" not in captured.out


def test_no_items_start_no_workers_and_bad_arguments_fail_at_the_call() -> None:
    assert list(map_in_processes(slow_pid, [], workers=4)) == []
    with pytest.raises(ValueError, match="lambda or a local function"):
        map_in_processes(lambda x: x, [1], workers=2)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        map_in_processes(slow_pid, [0.0], workers=0)


# --------------------------------------------------------------------------- the regression: where spawn broke

MAIN_THAT_MUST_NOT_BE_IMPORTED = """\
# Like the ``airflow`` console script under the task supervisor: importing it anywhere but as the
# program itself fails.  multiprocessing's "spawn" children import it as __mp_main__.
if __name__ != "__main__":
    raise RuntimeError(f"the parent's __main__ was imported as {{__name__!r}}")

import json
import os
import sys

sys.path.insert(0, {tests_dir!r})
import test_worker_processes as helpers  # noqa: E402

from pipeline.worker_processes import map_in_processes  # noqa: E402

pids = list(map_in_processes(helpers.slow_pid, [{slow_item_s!r}] * 6, workers=2))
print(json.dumps({{"caller": os.getpid(), "pids": pids}}))
"""


def test_a_main_that_must_not_be_imported_maps_in_real_worker_processes(tmp_path: Path) -> None:
    """Airflow's LocalExecutor: ProcessPoolExecutor(spawn) re-imported the airflow script and broke."""
    script = tmp_path / "airflow_like_main.py"
    script.write_text(
        textwrap.dedent(MAIN_THAT_MUST_NOT_BE_IMPORTED.format(tests_dir=str(TESTS_DIR), slow_item_s=SLOW_ITEM_S))
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "imported as" not in result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["caller"] not in answer["pids"]
    assert len(set(answer["pids"])) == 2


def map_in_a_daemon(answers: Any) -> None:
    """Body of a daemonic process (like a Celery prefork worker's child): map with two workers."""
    try:
        pids = list(map_in_processes(slow_pid, [SLOW_ITEM_S] * 6, workers=2))
        answers.put({"caller": os.getpid(), "pids": pids})
    except BaseException as exc:  # reported to the test, not lost in the child
        answers.put({"error": f"{type(exc).__name__}: {exc}"})


def test_a_daemonic_process_maps_in_real_worker_processes() -> None:
    """multiprocessing refuses children in a daemonic process; fresh interpreters are not its children."""
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=map_in_a_daemon, args=(answers,), daemon=True)
    child.start()
    answer = answers.get(timeout=DAEMON_ANSWER_TIMEOUT_S)
    child.join(timeout=30)
    assert "error" not in answer, answer["error"]
    assert answer["caller"] not in answer["pids"] and os.getpid() not in answer["pids"]
    assert len(set(answer["pids"])) == 2
    assert child.exitcode == 0
