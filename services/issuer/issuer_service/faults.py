"""Fault injection for the reference entitlement service: settings, the per-request decision, the counters.

Faults apply to the two granting endpoints only (``PUT /v1/grants/{id}`` and
``POST /v1/grants:batch``); health, stats, export, the spec and the admin
endpoints always answer. Per request the injector draws one number ``u`` in
[0, 1) and partitions it by the shares, so each share is exactly the
probability of its fault and at most one of them happens:

    u < drop_rate                              connection closed, no answer, nothing committed
      < … + throttle_rate                      429 with Retry-After, nothing committed
      < … + error_rate                         500 or 503 (half each), nothing committed
      < … + timeout_after_commit_rate          committed, then no timely answer (hang_s) or the connection drops

Independently, ``rate_limit_rps`` is a token bucket (burst: one second's
worth): a request beyond it gets 429 with the seconds until the next token in
Retry-After. ``latency_ms`` delays every answer of a granting endpoint. With a
``seed`` the sequence of decisions is reproducible: two draws per request,
whatever the settings.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Mapping
from typing import Any, Literal

from issuer_service.errors import ConfigError

AfterCommitAction = Literal["hang", "drop"]
LATENCY_MS_MAX = 60_000
HANG_S_MAX = 3_600.0
RETRY_AFTER_S_MAX = 3_600
RATE_LIMIT_RPS_MAX = 1_000_000.0


class FaultKind(enum.StrEnum):
    """The faults the service injects, as counted in ``/v1/stats``."""

    DROPPED_CONNECTION = "dropped_connection"
    THROTTLED = "throttled"
    RATE_LIMITED = "rate_limited"
    ERROR_500 = "error_500"
    ERROR_503 = "error_503"
    TIMEOUT_AFTER_COMMIT = "timeout_after_commit"
    DROPPED_AFTER_COMMIT = "dropped_after_commit"
    LATENCY = "latency"


class FaultSettingsError(ConfigError):
    """A fault setting has a value we cannot use; ``field`` names it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


_RATE_FIELDS = ("drop_rate", "throttle_rate", "error_rate", "timeout_after_commit_rate")


@dataclasses.dataclass(frozen=True)
class FaultSettings:
    """The fault knobs; every one is off by default."""

    error_rate: float = 0.0
    latency_ms: float = 0.0
    timeout_after_commit_rate: float = 0.0
    hang_s: float = 30.0
    after_commit_action: AfterCommitAction = "hang"
    throttle_rate: float = 0.0
    retry_after_s: int = 1
    rate_limit_rps: float = 0.0
    drop_rate: float = 0.0
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The settings as the admin endpoint shows them."""
        return dataclasses.asdict(self)

    def updated(self, changes: Mapping[str, object]) -> FaultSettings:
        """These settings with ``changes`` applied, checked; FaultSettingsError names the first bad field."""
        known = {f.name for f in dataclasses.fields(self)}
        for name in changes:
            if name not in known:
                raise FaultSettingsError(f"unknown fault setting {name!r}; known: {', '.join(sorted(known))}", name)
        values = self.as_dict()
        for name in _RATE_FIELDS:
            if name in changes:
                values[name] = _number(changes, name, 0.0, 1.0)
        if "latency_ms" in changes:
            values["latency_ms"] = _number(changes, "latency_ms", 0.0, LATENCY_MS_MAX)
        if "hang_s" in changes:
            values["hang_s"] = _number(changes, "hang_s", 0.0, HANG_S_MAX)
        if "rate_limit_rps" in changes:
            values["rate_limit_rps"] = _number(changes, "rate_limit_rps", 0.0, RATE_LIMIT_RPS_MAX)
        if "retry_after_s" in changes:
            retry_after = changes["retry_after_s"]
            if type(retry_after) is not int or not 0 <= retry_after <= RETRY_AFTER_S_MAX:
                raise FaultSettingsError(
                    f"retry_after_s must be whole seconds in 0..{RETRY_AFTER_S_MAX}, got {retry_after!r}",
                    "retry_after_s",
                )
            values["retry_after_s"] = retry_after
        if "after_commit_action" in changes:
            action = changes["after_commit_action"]
            if action not in ("hang", "drop"):
                raise FaultSettingsError(
                    f"after_commit_action must be 'hang' or 'drop', got {action!r}", "after_commit_action"
                )
            values["after_commit_action"] = action
        if "seed" in changes:
            seed = changes["seed"]
            if seed is not None and type(seed) is not int:
                raise FaultSettingsError(f"seed must be an integer or null, got {seed!r}", "seed")
            values["seed"] = seed
        shares = sum(float(values[name]) for name in _RATE_FIELDS)
        if shares > 1.0 + 1e-9:
            raise FaultSettingsError(
                f"{' + '.join(_RATE_FIELDS)} is {shares:g}; at most one of these faults happens per request, "
                "so their shares must add up to at most 1",
                "error_rate" if "error_rate" in changes else next(n for n in _RATE_FIELDS if n in changes),
            )
        return FaultSettings(**values)


def _number(changes: Mapping[str, object], name: str, low: float, high: float) -> float:
    value = changes[name]
    if type(value) not in (int, float) or not low <= value <= high:  # type: ignore[operator]
        raise FaultSettingsError(f"{name} must be a number in {low:g}..{high:g}, got {value!r}", name)
    return float(value)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True, slots=True)
class FaultDecision:
    """What the injector decided for one granting request."""

    before_commit: FaultKind | None = None  # dropped_connection, throttled, rate_limited, error_500 or error_503
    after_commit: FaultKind | None = None  # timeout_after_commit or dropped_after_commit
    retry_after_s: int = 0
    latency_s: float = 0.0
    hang_s: float = 0.0


NO_FAULT = FaultDecision()


class FaultInjector:
    """Decides, per granting request, which fault (if any) to inject, and counts the injected ones."""

    def __init__(self, settings: FaultSettings | None = None) -> None:
        self.settings = settings or FaultSettings()
        self.counts: dict[str, int] = {kind.value: 0 for kind in FaultKind}
        self._rng = random.Random(self.settings.seed)
        self._tokens = 0.0
        self._tokens_at: float | None = None

    def update(self, changes: Mapping[str, object]) -> FaultSettings:
        """Apply ``changes`` (checked); a ``seed`` key restarts the random sequence, a new rate limit a full bucket."""
        settings = self.settings.updated(changes)
        if "seed" in changes:
            self._rng = random.Random(settings.seed)
        if settings.rate_limit_rps != self.settings.rate_limit_rps:
            self._tokens_at = None
        self.settings = settings
        return settings

    def count(self, kind: FaultKind) -> None:
        """Record one injected fault of ``kind``."""
        self.counts[kind.value] += 1

    def decide(self, now_s: float) -> FaultDecision:
        """The faults for the next granting request at monotonic time ``now_s``."""
        s = self.settings
        share = self._rng.random()
        coin = self._rng.random()  # drawn always, so the sequence does not depend on the settings
        if not (s.drop_rate or s.throttle_rate or s.error_rate or s.timeout_after_commit_rate or s.rate_limit_rps):
            return NO_FAULT if not s.latency_ms else FaultDecision(latency_s=s.latency_ms / 1000)
        latency_s = s.latency_ms / 1000
        wait_s = self._take_token(now_s)
        if wait_s is not None:
            return FaultDecision(
                before_commit=FaultKind.RATE_LIMITED, retry_after_s=max(1, math.ceil(wait_s)), latency_s=latency_s
            )
        edge = s.drop_rate
        if share < edge:
            return FaultDecision(before_commit=FaultKind.DROPPED_CONNECTION)
        edge += s.throttle_rate
        if share < edge:
            return FaultDecision(before_commit=FaultKind.THROTTLED, retry_after_s=s.retry_after_s, latency_s=latency_s)
        edge += s.error_rate
        if share < edge:
            kind = FaultKind.ERROR_500 if coin < 0.5 else FaultKind.ERROR_503
            return FaultDecision(before_commit=kind, latency_s=latency_s)
        edge += s.timeout_after_commit_rate
        if share < edge:
            kind = FaultKind.TIMEOUT_AFTER_COMMIT if s.after_commit_action == "hang" else FaultKind.DROPPED_AFTER_COMMIT
            return FaultDecision(after_commit=kind, latency_s=latency_s, hang_s=s.hang_s)
        return FaultDecision(latency_s=latency_s)

    def _take_token(self, now_s: float) -> float | None:
        """None when the token bucket lets the request through, else the seconds until it would."""
        rps = self.settings.rate_limit_rps
        if not rps:
            return None
        capacity = max(1.0, rps)
        if self._tokens_at is None:
            self._tokens = capacity
        else:
            self._tokens = min(capacity, self._tokens + (now_s - self._tokens_at) * rps)
        self._tokens_at = now_s
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / rps
