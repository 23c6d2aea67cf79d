"""Sending to an issuer: the grant id, the rate budget, the circuit breaker and one batch with its retries.

Per issuer and process there is one rate budget (a token bucket of
``requests_per_s`` with a burst of one request, plus ``concurrency`` requests in
flight) and one circuit breaker, shared by every partition the process delivers.
With the ledger's engine the budget is shared through the ledger with every other
delivering process (:class:`SharedRateBudget`). How many requests an issuer can then
see in one second is worked out in :mod:`pipeline.delivery.rate_budget`.

A batch is sent again with the same grant ids after a failure (backoff with full
jitter, an issuer's Retry-After honoured): the issuer uses the id as its idempotency
key, so sending again cannot grant again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from pipeline.campaigns import Campaign, IssuerSpec
from pipeline.delivery import rate_budget
from pipeline.delivery.issuers import (
    RETRY_AFTER_S_MAX,
    Answer,
    GrantPayload,
    Issuer,
    IssuerRejected,
    IssuerUnavailable,
    build_issuer,
)

CIRCUIT_OPEN = "circuit open"


def grant_id(campaign_id: str, user_id: int, item_sku: str, issue_no: int) -> str:
    """The grant's idempotency key at every issuer: the same grant always has the same id."""
    return f"{campaign_id}:{user_id}:{item_sku}:{issue_no}"


class RateBudget:
    """A token bucket (``requests_per_s``, burst of one) and a bound on requests in flight; thread-safe.

    Each request reserves the next slot, one interval after the previous one, and goes in it
    (:func:`rate_budget.depart_in_slot`: a slot woken up too late is given up for the next free one).
    """

    def __init__(
        self,
        requests_per_s: float,
        concurrency: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval_s = 1.0 / requests_per_s
        self.in_flight = threading.BoundedSemaphore(concurrency)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_at = 0.0
        self.starts: list[float] = []  # the instant each request was let through
        self.slots_missed = 0  # slots given up because their sender woke too late

    def hold(self, seconds: float) -> None:
        """Let no request through for ``seconds`` (an issuer's Retry-After)."""
        with self._lock:
            self._next_at = max(self._next_at, self._clock() + seconds)

    def acquire(self) -> None:
        """Wait for this request's turn."""
        departure = rate_budget.depart_in_slot(self._reserve, self._clock, self._sleep)
        with self._lock:
            self.starts.append(departure.at)
            self.slots_missed += departure.slots_missed

    def _reserve(self) -> float:
        """Reserve the next free slot; seconds until it."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next_at)
            self._next_at = start + self.interval_s
        return start - now

    def achieved_requests_per_s(self) -> float | None:
        """Requests per second between the first and the last request let through."""
        if len(self.starts) < 2:
            return None
        return (len(self.starts) - 1) / (self.starts[-1] - self.starts[0])


class SharedRateBudget(RateBudget):
    """The issuer's request rate shared by every process delivering from the ledger.

    The next free instant lives in the ledger's ``issuer_budgets`` row for the issuer's name: each
    request reserves its slot with one upsert and sleeps until it, so two ``entitle deliver``
    processes, or the deliver tasks of two DAG runs, together stay within ``requests_per_s``; a
    Retry-After holds every process. Requests in flight are bounded per process.
    """

    def __init__(self, engine: Engine, issuer: str, requests_per_s: float, concurrency: int) -> None:
        super().__init__(requests_per_s, concurrency)
        self.engine = engine
        self.issuer = issuer

    def hold(self, seconds: float) -> None:
        rate_budget.hold_issuer(self.engine, self.issuer, seconds)

    def _reserve(self) -> float:
        # No real wait exceeds the longest Retry-After plus a thousand queued requests.
        wait_max_s = RETRY_AFTER_S_MAX + 1_000 * self.interval_s
        return rate_budget.take_issuer_slot(self.engine, self.issuer, self.interval_s, wait_max_s)


class CircuitBreaker:
    """Opens after ``failures_max`` consecutive failed calls; lets one trial call through after the cooldown."""

    def __init__(self, failures_max: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_max = failures_max
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def is_open(self) -> bool:
        """True while calls are refused (open and cooling down)."""
        with self._lock:
            return self._opened_at is not None and self._clock() - self._opened_at < self.cooldown_s

    def allow(self) -> bool:
        """May a call go out now? After the cooldown one trial call goes (half-open)."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._clock() - self._opened_at < self.cooldown_s or self._trial:
                return False
            self._trial = True
            return True

    def succeeded(self) -> None:
        """A call got an answer: close."""
        with self._lock:
            self._failures, self._opened_at, self._trial = 0, None, False

    def failed(self) -> None:
        """A call failed (network, timeout, 5xx): count it; open at the threshold (or when a trial fails)."""
        with self._lock:
            self._failures += 1
            if self._trial or self._failures >= self.failures_max:
                self._opened_at, self._trial = self._clock(), False


@dataclass
class IssuerRuntime:
    """One issuer in this process: the client, its rate budget, its breaker and its sender threads."""

    spec: IssuerSpec
    issuer: Issuer
    budget: RateBudget
    breaker: CircuitBreaker
    pool: ThreadPoolExecutor
    sleep: Callable[[float], None] = time.sleep
    jitter: random.Random = field(default_factory=random.Random)

    def close(self) -> None:
        """Stop the sender threads and close the client."""
        self.pool.shutdown(wait=True)
        self.issuer.close()


def has_downstream_issuers(campaign: Campaign) -> bool:
    """Whether any of the campaign's items is delivered to a downstream issuer (not the ledger alone)."""
    return any(campaign.items_of(spec.name) for spec in campaign.issuers)


def open_issuers(
    campaign: Campaign, only: Iterable[str] | None = None, engine: Engine | None = None
) -> dict[str, IssuerRuntime]:
    """A runtime per declared issuer that has items (``only``: these names).

    With the ledger's ``engine`` each issuer's rate budget is shared through the ledger with every
    other process delivering from it (:class:`SharedRateBudget`); without, it holds in this process only.
    """
    wanted = None if only is None else set(only)
    runtimes = {}
    for spec in campaign.issuers:
        if not campaign.items_of(spec.name) or (wanted is not None and spec.name not in wanted):
            continue
        runtimes[spec.name] = IssuerRuntime(
            spec,
            build_issuer(spec),
            RateBudget(spec.requests_per_s, spec.concurrency)
            if engine is None
            else SharedRateBudget(engine, spec.name, spec.requests_per_s, spec.concurrency),
            CircuitBreaker(spec.breaker_failures, spec.breaker_cooldown_s),
            ThreadPoolExecutor(max_workers=spec.concurrency, thread_name_prefix=f"issuer-{spec.name}"),
        )
    return runtimes


def budget_usage(runtimes: dict[str, IssuerRuntime]) -> dict[str, dict[str, Any]]:
    """Per issuer: the requests its budget let through, the rate achieved, the budget's rate and the slots given up."""
    return {
        name: {
            "requests": len(r.budget.starts),
            "requests_per_s": r.budget.achieved_requests_per_s(),
            "budget_requests_per_s": r.spec.requests_per_s,
            "slots_missed": r.budget.slots_missed,
        }
        for name, r in runtimes.items()
    }


# --------------------------------------------------------------------------- one batch


@dataclass(frozen=True)
class BatchResult:
    """What sending one batch came to: answers, or the error that failed it."""

    answers: list[Answer] | None
    error: str | None
    attempts: int
    circuit_open: bool = False


def send_batch(
    runtime: IssuerRuntime,
    batch: Sequence[GrantPayload],
    call: Callable[[], list[Answer]] | None = None,
) -> BatchResult:
    """Send one batch with retries: the same keys every time; backoff with full jitter; Retry-After honoured.

    ``call`` replaces ``runtime.issuer.deliver(batch)`` (revocations go through the same retries,
    budget and breaker).
    """
    spec = runtime.spec
    error = "not sent"
    for attempt in range(1, spec.max_attempts + 1):
        if not runtime.breaker.allow():
            return BatchResult(
                None, f"{CIRCUIT_OPEN} after {spec.breaker_failures} failures ({error})", attempt - 1, True
            )
        runtime.budget.acquire()
        try:
            with runtime.budget.in_flight:
                answers = runtime.issuer.deliver(batch) if call is None else call()
        except IssuerUnavailable as exc:
            error = str(exc)
            if exc.throttled:
                wait_s = exc.retry_after_s if exc.retry_after_s is not None else _backoff_s(runtime, attempt)
                runtime.budget.hold(wait_s)  # every request to this issuer waits, not only this one
                runtime.sleep(wait_s)
                continue
            runtime.breaker.failed()
            if attempt < spec.max_attempts:
                runtime.sleep(_backoff_s(runtime, attempt))
            continue
        except IssuerRejected as exc:
            runtime.breaker.succeeded()  # the issuer is up; this batch is refused
            return BatchResult(None, f"refused: {exc}", attempt)
        runtime.breaker.succeeded()
        return BatchResult(answers, None, attempt)
    return BatchResult(None, f"gave up after {spec.max_attempts} attempts: {error}", spec.max_attempts)


def _backoff_s(runtime: IssuerRuntime, attempt: int) -> float:
    """Full jitter: uniform in [0, min(cap, base × 2^(attempt-1))]."""
    spec = runtime.spec
    return runtime.jitter.uniform(0.0, min(spec.backoff_cap_s, spec.backoff_base_s * 2 ** (attempt - 1)))
