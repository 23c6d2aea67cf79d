"""Merchant cash claims: intake from CSV or Parquet, one case per merchant, payouts as ledger grants.

Intake (:mod:`~pipeline.programs.merchant_cash.intake`) validates every row, quarantines
the malformed ones and records each claim once under its claim id. A case
(:mod:`~pipeline.programs.merchant_cash.cases`) merges a merchant's accepted claims and
takes its tier from the program file. Payouts (:mod:`~pipeline.programs.merchant_cash.payouts`)
are grants of the program's cash item, at most one per merchant: the ledger's primary key
makes a second payout impossible, and each batch of payouts commits with the cases it marks
``paid``. :mod:`~pipeline.programs.merchant_cash.context` opens a program on the ledger.

This module gathers the names the command line, the DAG tasks, review and reconciliation use.
"""

from pipeline.programs.merchant_cash.cases import (
    CasePlan,
    accepted_contents,
    assign_cases,
    case_id,
    parse_case_id,
    plan_case,
    refresh_cases,
)
from pipeline.programs.merchant_cash.context import OpenProgram, open_program, register
from pipeline.programs.merchant_cash.intake import (
    CLAIM_FILE_SUFFIXES,
    Claim,
    ClaimsFile,
    ClaimsInputError,
    IngestReport,
    Problem,
    ingest_file,
    read_claims_file,
)
from pipeline.programs.merchant_cash.payouts import (
    PAYOUT_BATCH_CASES_MAX,
    PayReport,
    live_payouts,
    pay,
    voided_payouts,
)

__all__ = [
    "CLAIM_FILE_SUFFIXES",
    "PAYOUT_BATCH_CASES_MAX",
    "CasePlan",
    "Claim",
    "ClaimsFile",
    "ClaimsInputError",
    "IngestReport",
    "OpenProgram",
    "PayReport",
    "Problem",
    "accepted_contents",
    "assign_cases",
    "case_id",
    "ingest_file",
    "live_payouts",
    "open_program",
    "register",
    "parse_case_id",
    "pay",
    "plan_case",
    "read_claims_file",
    "refresh_cases",
    "voided_payouts",
]
