"""The rate budget's slots: a request goes within SLOT_LATE_S_MAX of its slot or gives the slot up.

What an issuer sees follows from that (pipeline/delivery/rate_budget.py): any one-second window of
departures holds at most ⌈rate × (1 + SLOT_LATE_S_MAX)⌉ requests, however late the senders wake.
The ledger's side (slots one interval apart across processes) is tested in tests/ledger.
"""

from __future__ import annotations

import math
import random
import threading
import time

from hypothesis import given
from hypothesis import strategies as st
from support.delivery import most_in_one_second

from pipeline import delivery
from pipeline.delivery import rate_budget
from pipeline.delivery.rate_budget import SLOT_LATE_S_MAX, SLOT_MISSES_MAX

# (seconds until the slot as reserve answers it, how much later than asked the sleep then wakes)
lateness = st.floats(0.0, 0.5).filter(lambda s: abs(s - SLOT_LATE_S_MAX) > 1e-6)
tries = st.tuples(st.floats(-0.5, 1.0).filter(lambda w: abs(w + SLOT_LATE_S_MAX) > 1e-6), lateness)


class ScriptedClock:
    """A clock, a sleep that wakes as late as scripted and a reserve that answers as scripted."""

    def __init__(self, script: list[tuple[float, float]]) -> None:
        self.now = 0.0
        self.script = iter(script)
        self.slot = 0.0
        self.late_s = 0.0

    def reserve(self) -> float:
        wait_s, self.late_s = next(self.script)
        self.slot = self.now + wait_s
        return wait_s

    def sleep(self, seconds: float) -> None:
        self.now += seconds + self.late_s


@given(st.lists(tries, max_size=30))
def test_a_request_goes_within_slot_late_s_max_of_its_slot_or_takes_the_next_free_one(
    script: list[tuple[float, float]],
) -> None:
    script = [*script, (0.1, 0.0)]  # the last slot is met on time
    clock = ScriptedClock(script)
    departure = rate_budget.depart_in_slot(clock.reserve, lambda: clock.now, clock.sleep)
    late = [-wait_s if wait_s <= 0 else late_s for wait_s, late_s in script]
    assert departure.slots_missed == next(i for i, s in enumerate(late) if s <= SLOT_LATE_S_MAX)
    assert departure.at == clock.now
    assert 0.0 <= departure.at - clock.slot <= SLOT_LATE_S_MAX + 1e-9


def test_a_sender_that_is_always_late_goes_after_slot_misses_max() -> None:
    clock = ScriptedClock([(0.1, 0.5)] * (SLOT_MISSES_MAX + 1))
    departure = rate_budget.depart_in_slot(clock.reserve, lambda: clock.now, clock.sleep)
    assert departure.slots_missed == SLOT_MISSES_MAX
    assert departure.at - clock.slot > SLOT_LATE_S_MAX, "no request waits forever"


def test_senders_that_wake_late_never_crowd_a_second_of_departures() -> None:
    """8 threads on one budget of 40 req/s, a third of their sleeps waking up to 150 ms late: a late
    sender would otherwise go beside the next slot's request; it gives its slot up instead."""
    requests_per_s = 40
    rng = random.Random(11)
    rng_lock = threading.Lock()

    def oversleep(seconds: float) -> None:
        with rng_lock:
            extra_s = rng.uniform(0.0, 0.15) if rng.random() < 0.3 else 0.0
        time.sleep(seconds + extra_s)

    budget = delivery.RateBudget(requests_per_s, 8, sleep=oversleep)

    def sender() -> None:
        for _ in range(13):
            budget.acquire()

    threads = [threading.Thread(target=sender) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(budget.starts) == 8 * 13
    assert budget.slots_missed > 0, "some sleeps woke too late and gave their slot up"
    bound = math.ceil(requests_per_s * (1 + SLOT_LATE_S_MAX))
    assert most_in_one_second(budget.starts) <= bound == requests_per_s + 1
