"""Delivery of ledger grants to their issuers, with an exactly-once effect at the issuer.

Why no grant is issued twice, and none is lost:

- Every grant has a deterministic id, ``{campaign_id}:{user_id}:{item_sku}:{issue_no}``,
  which the issuer uses as its idempotency key: sending it again cannot grant again.
- Outbox: before a batch is sent, its row in ``delivery_batches`` (status ``in_flight``,
  its first and last grant key) commits; after the issuer answers, every grant's
  answer commits in ``delivery_answers`` with the batch's new status, in one
  transaction. A crash between the two leaves grants without a final answer.
- A run sends exactly the live grants of the partition with no final answer
  (``created``, ``exists`` or ``conflict``): never-sent, failed and in-flight ones,
  again with the same ids. One the issuer had committed answers ``exists``.
- A final answer is never overwritten (the upsert only replaces ``failed``); a
  ``conflict`` (the issuer holds a different payload under the id) is surfaced
  for a person to decide and never sent again.

The modules: :mod:`~pipeline.delivery.planning` (what a delivery will take),
:mod:`~pipeline.delivery.transport` (grant ids, rate budget, circuit breaker, one
batch with retries), :mod:`~pipeline.delivery.outbox` (one partition to one issuer),
:mod:`~pipeline.delivery.revocation` (voided grants revoked at the issuer),
:mod:`~pipeline.delivery.partitions` (many partitions, and their latest reports) and
:mod:`~pipeline.delivery.issuers` (the issuer clients).
"""

from pipeline.delivery.outbox import (
    ERROR_TEXT_CHARS_MAX,
    OUTCOME_COUNTS,
    DeliveryContext,
    DeliveryReport,
    count_outcomes,
    deliver_partition,
)
from pipeline.delivery.partitions import (
    deliver,
    issuer_totals,
    partition_states,
    report_totals,
    require_delivered,
)
from pipeline.delivery.planning import IssuerPlan, grants_to_deliver, plan_delivery
from pipeline.delivery.revocation import partitions_with_pending_revocations, revoke_voided
from pipeline.delivery.transport import (
    CIRCUIT_OPEN,
    BatchResult,
    CircuitBreaker,
    IssuerRuntime,
    RateBudget,
    SharedRateBudget,
    budget_usage,
    grant_id,
    has_downstream_issuers,
    open_issuers,
    send_batch,
)

__all__ = [
    "CIRCUIT_OPEN",
    "ERROR_TEXT_CHARS_MAX",
    "OUTCOME_COUNTS",
    "BatchResult",
    "CircuitBreaker",
    "DeliveryContext",
    "DeliveryReport",
    "IssuerPlan",
    "IssuerRuntime",
    "RateBudget",
    "SharedRateBudget",
    "budget_usage",
    "count_outcomes",
    "deliver",
    "deliver_partition",
    "grant_id",
    "grants_to_deliver",
    "has_downstream_issuers",
    "issuer_totals",
    "open_issuers",
    "partition_states",
    "partitions_with_pending_revocations",
    "plan_delivery",
    "report_totals",
    "require_delivered",
    "revoke_voided",
    "send_batch",
]
