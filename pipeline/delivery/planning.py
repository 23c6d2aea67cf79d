"""How much a delivery will take, before it starts: grants, requests and time per issuer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.campaigns import Campaign
from pipeline.grants.partitioning import PartitionEntry

ASSUMED_ISSUER_LATENCY_S = 0.25  # one batch request's round trip, for the plan's estimate only


@dataclass(frozen=True)
class IssuerPlan:
    """One issuer's share of a delivery: its grants, the batch requests they take and the time that needs."""

    issuer: str
    url: str | None
    items: list[str]
    grants: int
    requests: int
    requests_per_s: float
    concurrency: int
    batch_size: int
    estimated_s: float
    assumed_latency_s: float

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        return asdict(self)


def plan_delivery(campaign: Campaign, users: int) -> list[IssuerPlan]:
    """Per declared issuer: grants to deliver to ``users`` users, requests, and the time its rate budget allows."""
    plans = []
    for spec in campaign.issuers:
        grants = users * len(campaign.items_of(spec.name))
        requests = -(-grants // spec.batch_size)
        # The budget allows requests_per_s; concurrency allows concurrency / latency per second.
        rate = min(spec.requests_per_s, spec.concurrency / ASSUMED_ISSUER_LATENCY_S)
        plans.append(
            IssuerPlan(
                issuer=spec.name,
                url=spec.url,
                items=[i.sku for i in campaign.items_of(spec.name)],
                grants=grants,
                requests=requests,
                requests_per_s=spec.requests_per_s,
                concurrency=spec.concurrency,
                batch_size=spec.batch_size,
                estimated_s=requests / rate,
                assumed_latency_s=ASSUMED_ISSUER_LATENCY_S,
            )
        )
    return plans


def grants_to_deliver(campaign: Campaign, entries: Iterable[PartitionEntry], issuers: Iterable[str]) -> int:
    """The grants a delivery of these partitions to these issuers plans: each user times the issuer's items."""
    names = list(issuers)
    return sum(e.rows * len(campaign.items_of(name)) for e in entries for name in names)
