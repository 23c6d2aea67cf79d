"""A small pool of worker processes started as fresh interpreters, for CPU- or database-bound maps.

Why not ``multiprocessing`` / ``ProcessPoolExecutor``: its "spawn" and
"forkserver" children re-import the parent's ``__main__`` (by path or by
module name).  Under Airflow's task supervisor that ``__main__`` is the
``airflow`` console script, and importing Airflow in the child fails (the
supervisor points its metadata database at ``airflow-db-not-allowed:///``),
so the pool breaks.  And a daemonic process (a Celery prefork worker's child)
may not start multiprocessing children at all.  "fork" is no way out either:
Polars' thread pool must not be forked.

Here every worker is ``[sys.executable, "-P", "-m", "pipeline.worker_processes"]``
started with :mod:`subprocess`: nothing of the parent's ``__main__`` is
imported, and it works the same from daemonic processes, Airflow's task
supervisor, Celery, ``dag.test`` and the command line.

Protocol, over the child's stdin (jobs) and stdout (replies), one
length-prefixed pickle frame at a time:

* parent → child, once: ``{"sys_path": [...], "pythonpath": str | None}``, so
  the child imports the same code as the parent;
* parent → child, per item: ``(module name, qualified function name, item)``;
* child → parent, per item: ``("ok", result)`` or
  ``("error", pickled exception or None, traceback text)``.

The parent closes a child's stdin to stop it (the child exits 0 at EOF).  The
children's stderr is the parent's, so their logs land where the parent's do
(the task log under Airflow).  POSIX only (the parent waits on the pipes with
:mod:`selectors`).
"""

from __future__ import annotations

import importlib
import os
import pickle
import selectors
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

FRAME_HEADER = struct.Struct("!Q")  # 8-byte big-endian length in bytes before each pickle frame
DEFAULT_STOP_TIMEOUT_S = 10.0  # how long a stopped child may take to finish before it is killed
KILL_WAIT_TIMEOUT_S = 5.0  # how long to wait for a killed child to be reaped
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL  # parent and child are the same interpreter

# The module name the children run with ``-m``.  Under ``-m`` this module is ``__main__`` but its spec
# still carries the real name.
WORKER_MODULE = __spec__.name if __spec__ is not None else "pipeline.worker_processes"
# The sys.path entry that holds this module's top-level package: given to the children in PYTHONPATH so
# that ``-m`` finds this module even when the parent found it through a sys.path it built itself (pytest,
# a script that inserts its folder).  The first frame then gives them the parent's whole sys.path.
_IMPORT_ROOT = str(Path(__file__).resolve().parents[WORKER_MODULE.count(".")])


class WorkerProcessError(RuntimeError):
    """A worker process died, broke the protocol or could not be started."""


class RemoteTaskError(RuntimeError):
    """The mapped function raised in a worker and its exception could not be brought back as it was."""


# --------------------------------------------------------------------------- frames


def _write_frame(stream: IO[bytes], payload: bytes) -> None:
    stream.write(FRAME_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    """``size`` bytes, or None at EOF before the first byte; a frame cut short is an error."""
    # A buffered reader's read(size) blocks until it has size bytes or meets EOF.
    data = stream.read(size)
    if not data:
        return None
    if len(data) < size:
        raise EOFError(f"frame cut short after {len(data)} of {size} bytes")
    return data


def _read_frame(stream: IO[bytes]) -> bytes | None:
    """One frame's payload, or None at a clean EOF (between frames)."""
    header = _read_exactly(stream, FRAME_HEADER.size)
    if header is None:
        return None
    (size,) = FRAME_HEADER.unpack(header)
    payload = _read_exactly(stream, size) if size else b""
    if payload is None:
        raise EOFError(f"frame of {size} bytes missing after its header")
    return payload


# --------------------------------------------------------------------------- parent side


def _function_reference(function: Callable[..., Any]) -> tuple[str, str]:
    """Module and qualified name the child can import the function by; refuse what it cannot."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(f"{function!r} has no module and qualified name to import it by in a worker process")
    if module == "__main__":
        # The whole point: the children never import the parent's __main__.
        raise ValueError(
            f"{qualname} is defined in __main__; worker processes import the function by module, "
            "so define it in an importable module"
        )
    if "<" in qualname:
        raise ValueError(f"{module}.{qualname} is a lambda or a local function; worker processes cannot import it")
    return module, qualname


class _Worker:
    """One child process and its two pipes."""

    def __init__(self, number: int, stop_timeout_s: float) -> None:
        self.number = number
        self.stop_timeout_s = stop_timeout_s
        if not sys.executable:
            raise WorkerProcessError("sys.executable is unknown: cannot start a worker interpreter")
        environ = dict(os.environ)
        original_pythonpath = environ.get("PYTHONPATH")
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (_IMPORT_ROOT, original_pythonpath) if p)
        self._setup = {"sys_path": list(sys.path), "pythonpath": original_pythonpath}
        # stderr is inherited on purpose: the child's logs and tracebacks land in the parent's log.
        # Buffered pipes are safe with select below: a child writes one reply per item and nothing
        # until it is sent the next, so a reply read in full leaves no bytes behind in the buffer.
        # -P: the working folder is not put first on sys.path, where a same-named package could shadow ours.
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-m", WORKER_MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environ
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin: IO[bytes] = self.process.stdin
        self.stdout: IO[bytes] = self.process.stdout

    def start(self) -> None:
        """Send the first frame: the parent's sys.path, so the child imports the same code."""
        self._send(pickle.dumps(self._setup, PICKLE_PROTOCOL), "while starting")

    def describe(self) -> str:
        return f"worker process {self.number} (pid {self.process.pid})"

    def died(self, what: str, detail: str) -> WorkerProcessError:
        """The error for a child that stopped answering ``what`` ("while running item 3", say)."""
        # Give a dying child a moment to be reaped, so the message can carry its exit code.
        try:
            code: int | None = self.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        how = "is still running" if code is None else f"exited with code {code}"
        return WorkerProcessError(f"{self.describe()} {how} {what} ({detail}); see its output above for why")

    def _send(self, payload: bytes, what: str) -> None:
        try:
            _write_frame(self.stdin, payload)
        except (ValueError, OSError) as exc:  # BrokenPipeError, mostly: the child is gone
            raise self.died(what, f"it stopped reading: {type(exc).__name__}") from exc

    def send(self, module: str, qualname: str, index: int, item: Any) -> None:
        """Give the child one item (pickled here, so an item that does not pickle fails in the parent)."""
        self._send(pickle.dumps((module, qualname, item), PICKLE_PROTOCOL), f"while running item {index}")

    def receive(self, index: int) -> Any:
        """The child's reply for item ``index``: its result, or its exception raised here."""
        try:
            payload = _read_frame(self.stdout)
        except (EOFError, OSError) as exc:
            raise self.died(f"while running item {index}", str(exc)) from exc
        if payload is None:
            raise self.died(f"while running item {index}", "its output ended")
        reply = pickle.loads(payload)
        if reply[0] == "ok":
            return reply[1]
        _, exception_bytes, child_traceback = reply
        header = f"in {self.describe()}, item {index}"
        exception: BaseException | None = None
        if exception_bytes is not None:
            try:
                exception = pickle.loads(exception_bytes)
            except Exception:  # an exception class whose __init__ takes other arguments, say
                exception = None
        if isinstance(exception, BaseException):
            exception.add_note(f"{header}:\n{child_traceback.rstrip()}")
            raise exception
        raise RemoteTaskError(
            f"the mapped function raised {header}, and the exception did not pickle:\n{child_traceback}"
        )

    def close_input(self) -> None:
        """Closing stdin tells the child to exit once it has finished its current item."""
        try:
            self.stdin.close()
        except OSError:
            pass  # a child that is gone already: nothing to tell

    def wait_or_kill(self, deadline: float) -> None:
        """Wait for the child until ``deadline`` (a monotonic time in seconds), then kill it."""
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            try:
                self.process.wait(timeout=KILL_WAIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass  # unkillable (stuck in the kernel): nothing more a parent can do
        self.stdout.close()


def _stop(workers: list[_Worker], stop_timeout_s: float) -> None:
    # All stdins first, so every child finishes at the same time; then one shared deadline.
    for worker in workers:
        worker.close_input()
    deadline = time.monotonic() + stop_timeout_s
    for worker in workers:
        worker.wait_or_kill(deadline)


def map_in_processes(
    function: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    *,
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
) -> Generator[R, None, None]:
    """``function(item)`` for every item in up to ``workers`` fresh worker processes, in input order.

    Like ``pool.map``: results come in the order of ``items``.  Items are handed
    out one at a time (a worker takes the next item when it has finished one),
    and read from ``items`` only as workers need them; workers are started only
    as there are items for them.  ``function`` must be a module-level function
    of an importable module (it is imported by name in the workers), and items
    and results must pickle.

    An exception raised by ``function`` is raised here (with the worker's
    traceback as a note), or a :class:`RemoteTaskError` with the traceback text
    when it does not pickle.  A worker that dies raises
    :class:`WorkerProcessError` naming the worker, its exit code and the item.

    Every worker is stopped (stdin closed, then up to ``stop_timeout_s`` seconds
    to finish its item, then killed) when the iterator is exhausted, closed or
    fails.  Close it (``contextlib.closing``) when you may stop iterating early.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if stop_timeout_s < 0:
        raise ValueError(f"stop_timeout_s must not be negative, got {stop_timeout_s}")
    module, qualname = _function_reference(function)
    # Validated eagerly above; the processes start on the first next().
    return _map(module, qualname, iter(items), workers, stop_timeout_s)


def _map(
    module: str, qualname: str, items: Iterator[Any], workers: int, stop_timeout_s: float
) -> Generator[Any, None, None]:
    started: list[_Worker] = []
    idle: list[_Worker] = []
    busy: dict[_Worker, int] = {}  # worker → index of the item it is running
    results: dict[int, Any] = {}  # finished out of order, waiting for their turn
    next_index = 0  # of the next item to read from ``items``
    next_to_yield = 0
    exhausted = False
    selector = selectors.DefaultSelector()
    try:
        while True:
            while not exhausted and (idle or len(started) < workers):
                try:
                    item = next(items)
                except StopIteration:
                    exhausted = True
                    break
                if idle:
                    worker = idle.pop()
                else:
                    worker = _Worker(len(started) + 1, stop_timeout_s)
                    started.append(worker)  # before anything can fail: stopped in the finally below
                    selector.register(worker.stdout, selectors.EVENT_READ, worker)
                    worker.start()
                worker.send(module, qualname, next_index, item)
                busy[worker] = next_index
                next_index += 1
            while next_to_yield in results:
                # Every worker has its next item before the caller gets control.
                yield results.pop(next_to_yield)
                next_to_yield += 1
            if not busy:
                return
            for key, _ in selector.select():
                worker = key.data
                index = busy.pop(worker, None)
                if index is None:
                    # An idle child has nothing to say: its pipe is readable only because it ended.
                    raise worker.died("while idle", "its output ended")
                results[index] = worker.receive(index)
                idle.append(worker)
    finally:
        selector.close()
        _stop(started, stop_timeout_s)


# --------------------------------------------------------------------------- child side


def _resolve(module_name: str, qualname: str) -> Callable[[Any], Any]:
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{module_name}.{qualname} is not callable")
    return target  # type: ignore[no-any-return]


def _error_reply(exc: BaseException) -> bytes:
    child_traceback = traceback.format_exc()
    try:
        exception_bytes: bytes | None = pickle.dumps(exc, PICKLE_PROTOCOL)
    except Exception:  # an exception holding a connection or a lock, say: the traceback text still goes
        exception_bytes = None
    return pickle.dumps(("error", exception_bytes, child_traceback), PICKLE_PROTOCOL)


def serve() -> int:
    """The worker's main loop: read jobs from stdin, write replies to stdout, exit 0 at EOF."""
    # Take the real stdin and stdout for frames, then point fds 0 and 1 elsewhere: nothing the mapped
    # function (or a C library) reads or prints may touch the frames.  Printed output goes to stderr.
    frames_in = os.fdopen(os.dup(0), "rb")
    frames_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    setup_frame = _read_frame(frames_in)
    if setup_frame is None:
        return 0
    setup = pickle.loads(setup_frame)
    sys.path[:] = setup["sys_path"]
    # PYTHONPATH was widened only to find this module; the function's own subprocesses get the parent's.
    if setup["pythonpath"] is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = setup["pythonpath"]
    while True:
        job = _read_frame(frames_in)
        if job is None:
            return 0  # the parent closed our stdin: no more items
        try:
            module_name, qualname, item = pickle.loads(job)
            result = _resolve(module_name, qualname)(item)
            reply = pickle.dumps(("ok", result), PICKLE_PROTOCOL)
        except Exception as exc:  # reported to the parent, which raises it; the worker serves on
            reply = _error_reply(exc)
        try:
            _write_frame(frames_out, reply)
        except BrokenPipeError:
            return 1  # the parent is gone: nobody to reply to


if __name__ == "__main__":
    sys.exit(serve())
