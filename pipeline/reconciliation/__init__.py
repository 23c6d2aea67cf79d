"""Reconciliation: a campaign's snapshot and items, and its issuers' exports, against the ledger.

``reconcile(pipeline)`` recomputes what the ledger should hold from the data alone
(snapshot users x campaign items, with the items' terms), compares it with the live
grants partition by partition (checksums first, rows only where they differ), compares
every delivering issuer's export with the ledger, and ends in one :class:`Verdict`
(RECONCILED, BREAKS or INCOMPLETE, with the bridge from expected to actual and the open
breaks by class). The run, its counts and its breaks are stored in the ledger and
exported; ``load_result`` reads a stored result back.

Modules:

- :mod:`~pipeline.reconciliation.verdict`: the verdict every reconciliation of the
  pipeline returns (campaigns, issuers, merchant cash, passes), and how its status is decided;
- :mod:`~pipeline.reconciliation.campaign`: :func:`reconcile` and its :class:`Reconciliation` result;
- :mod:`~pipeline.reconciliation.checksums`: row hashes and partition checksums, in SQL and in Polars;
- :mod:`~pipeline.reconciliation.compare`: one partition checked (in a worker process), differences
  classified as breaks, the partitions added up;
- :mod:`~pipeline.reconciliation.three_way`: each issuer's export against the ledger;
- :mod:`~pipeline.reconciliation.store`: the stored run, the break register, the exports and ``load_result``.
"""

from pipeline.reconciliation import three_way
from pipeline.reconciliation.campaign import Reconciliation, reconcile
from pipeline.reconciliation.checksums import ItemTerms, expected_checksum, item_terms
from pipeline.reconciliation.compare import PartitionCheck
from pipeline.reconciliation.store import load_result
from pipeline.reconciliation.verdict import BREAKS, INCOMPLETE, RECONCILED, STATUSES, Bridge, Step, Verdict

__all__ = [
    "BREAKS",
    "INCOMPLETE",
    "RECONCILED",
    "STATUSES",
    "Bridge",
    "ItemTerms",
    "PartitionCheck",
    "Reconciliation",
    "Step",
    "Verdict",
    "expected_checksum",
    "item_terms",
    "load_result",
    "reconcile",
    "three_way",
]
