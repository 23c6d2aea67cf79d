"""The verdict every reconciliation ends in: a status, the bridge from expected to actual, and the breaks.

Every reconciliation of the pipeline answers with a :class:`Verdict`: a campaign's
snapshot against the ledger (:mod:`pipeline.reconciliation.campaign`), an issuer's export
against the ledger (:mod:`pipeline.reconciliation.three_way`), a merchant cash program's
payouts (:mod:`pipeline.programs.merchant_cash.reconciliation`) and a pass program's
passes (:mod:`pipeline.programs.drawer_pass.reconciliation`).

``status``
    Exactly one of :data:`RECONCILED` (everything expected is there as expected, and
    nothing else), :data:`BREAKS` (the comparison is complete and found differences that
    need a repair or a decision) and :data:`INCOMPLETE` (part of a side could not be
    compared, or the numbers do not add up: the comparison proves nothing either way).
``bridge``
    The ordered steps from the expected figure to the actual one, each a label and a
    number: a *change* is signed and moves the running total (``missing -2``,
    ``unexpected +1``); a *checkpoint* is a figure counted on its own that the running
    total must equal at that point (``matched``). The bridge adds up when every
    checkpoint and the actual figure equal the running total there.
``breaks``
    The open breaks by class: every class the reconciliation looks for, zeros included.
``incomplete``
    Why the comparison is incomplete, one sentence each (empty when it is complete).

:func:`judge` is the one place a status is decided (:func:`derive_status`): INCOMPLETE
when there is a reason or the bridge does not add up, else BREAKS when a class has a
break, else RECONCILED. The explanation is the reconciliation's own sentence for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import invariant

RECONCILED = "RECONCILED"
BREAKS = "BREAKS"
INCOMPLETE = "INCOMPLETE"
STATUSES = (RECONCILED, BREAKS, INCOMPLETE)

# The commands that correct breaks, as messages suggest them, complete: each parses as written once
# NAME (who acts; recorded), ID (a break id) and WHY (the audited reason) are filled in.
REPAIR_COMMAND = "entitle repair --actor NAME"
VOID_BREAK_COMMAND = "entitle void --break ID --reason WHY --actor NAME"

Explain = Callable[[str, tuple[str, ...]], str]  # (status, reasons it is incomplete) -> the explanation


@dataclass(frozen=True)
class Step:
    """One line of a bridge: a signed change of the running total, or a checkpoint it must equal."""

    label: str
    value: int
    checkpoint: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return {"label": self.label, "value": self.value, "checkpoint": self.checkpoint}


@dataclass(frozen=True)
class Bridge:
    """From the expected figure, step by step, to the actual one (all in ``unit``)."""

    unit: str
    expected: Step
    steps: tuple[Step, ...]
    actual: Step

    def residuals(self) -> tuple[tuple[str, int], ...]:
        """(label, counted minus running total) at every checkpoint and at the actual figure.

        After a checkpoint the running total carries on from the counted figure, so each
        residual says what is unexplained between its checkpoint and the one before.
        """
        running = self.expected.value
        found: list[tuple[str, int]] = []
        for step in self.steps:
            if step.checkpoint:
                found.append((step.label, step.value - running))
                running = step.value
            else:
                running += step.value
        found.append((self.actual.label, self.actual.value - running))
        return tuple(found)

    def adds_up(self) -> bool:
        """True when every checkpoint and the actual figure equal the running total."""
        return all(residual == 0 for _, residual in self.residuals())

    def mismatch(self) -> str:
        """What does not add up, as a sentence ('' when the bridge adds up)."""
        off = [f"{label} {residual:+,}" for label, residual in self.residuals() if residual]
        if not off:
            return ""
        return f"the bridge of {self.unit} does not add up (counted minus bridged: {', '.join(off)})"

    def text(self) -> str:
        """The bridge on one line, e.g. ``expected 10 - missing 2 = matched 8 + unexpected 1 = ledger 9 (grants)``."""
        parts = [f"{self.expected.label} {self.expected.value:,}"]
        for step in self.steps:
            if step.checkpoint:
                parts.append(f"= {step.label} {step.value:,}")
            else:
                parts.append(f"{'-' if step.value < 0 else '+'} {step.label} {abs(step.value):,}")
        parts.append(f"= {self.actual.label} {self.actual.value:,}")
        return " ".join(parts) + f" ({self.unit})"

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON: the steps, whether they add up and the residual at each checkpoint."""
        return {
            "unit": self.unit,
            "expected": {"label": self.expected.label, "value": self.expected.value},
            "steps": [step.as_dict() for step in self.steps],
            "actual": {"label": self.actual.label, "value": self.actual.value},
            "adds_up": self.adds_up(),
            "residuals": [{"label": label, "value": residual} for label, residual in self.residuals()],
        }


@dataclass(frozen=True)
class Verdict:
    """A reconciliation's verdict: its status, the explanation, the bridge, the open breaks by class."""

    status: str
    explanation: str
    bridge: Bridge
    breaks: dict[str, int]
    incomplete: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        invariant(self.status in STATUSES, f"unknown verdict status {self.status!r}")
        invariant(all(count >= 0 for count in self.breaks.values()), f"negative break counts: {self.breaks}")
        derived = derive_status(self.bridge, self.breaks, self.incomplete)
        invariant(self.status == derived, f"verdict {self.status} where the bridge and breaks give {derived}")

    @property
    def open_breaks(self) -> int:
        """Open breaks of every class together."""
        return sum(self.breaks.values())

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON, XCom and the stored result documents."""
        return {
            "status": self.status,
            "explanation": self.explanation,
            "bridge": self.bridge.as_dict(),
            "breaks": dict(self.breaks),
            "open_breaks": self.open_breaks,
            "incomplete": list(self.incomplete),
        }


def derive_status(bridge: Bridge, breaks: Mapping[str, int], incomplete: Sequence[str] = ()) -> str:
    """INCOMPLETE with a reason or a bridge that does not add up, else BREAKS with a break, else RECONCILED."""
    if incomplete or not bridge.adds_up():
        return INCOMPLETE
    if any(breaks.values()):
        return BREAKS
    return RECONCILED


def judge(bridge: Bridge, breaks: Mapping[str, int], incomplete: Sequence[str] = (), *, explain: Explain) -> Verdict:
    """The verdict of a comparison: the status derived here, the explanation from ``explain(status, reasons)``.

    ``incomplete`` holds the reconciliation's reasons why part of a side was not compared; a
    bridge that does not add up is one more reason, given in its own words.
    """
    reasons = tuple(incomplete)
    if not bridge.adds_up():
        reasons += (bridge.mismatch(),)
    status = derive_status(bridge, breaks, reasons)
    return Verdict(status, explain(status, reasons), bridge, dict(breaks), reasons)


class Judged:
    """A reconciliation result that carries its :class:`Verdict` as ``outcome``.

    The result documents keep ``verdict`` (the status) and ``explanation`` as their first-class
    fields; both are read from the one verdict.
    """

    outcome: Verdict

    @property
    def verdict(self) -> str:
        """RECONCILED, BREAKS or INCOMPLETE."""
        return self.outcome.status

    @property
    def explanation(self) -> str:
        """The verdict in one sentence (or the reasons it is incomplete)."""
        return self.outcome.explanation
