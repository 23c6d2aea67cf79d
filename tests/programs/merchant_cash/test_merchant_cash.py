"""Merchant cash compensation: program file, claims intake, tiers, review, payouts, reconciliation, DAG.

Real SQLite and PostgreSQL ledgers, real CSV and Parquet claims files, the real
``entitle`` console script and a real Airflow run of ``merchant_cash``.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError
from support import REPO_ROOT
from support.cli import ENTITLE_SCRIPT, cli_environment, run_entitle
from support.merchant_cash import EVIDENCE, TIER_1_KRW, TIER_2_KRW, claim, write_claims

from pipeline import ledger
from pipeline.errors import CampaignError, CorrectionError
from pipeline.grants import corrections
from pipeline.ledger import queries
from pipeline.programs.merchant_cash import claims, reconciliation
from pipeline.programs.merchant_cash import payouts as merchant_payouts
from pipeline.programs.merchant_cash import review as merchant_review
from pipeline.programs.merchant_cash.claims import ClaimsInputError, OpenProgram
from pipeline.programs.merchant_cash.program import load_program, parse_program
from pipeline.programs.merchant_cash.review import ReviewRefusedError

ROOT = REPO_ROOT
BUNDLED = ROOT / "pipeline" / "campaigns" / "merchant_cash_2022.toml"
SEOUL = dt.timezone(dt.timedelta(hours=9))
KILL_WAIT_S = 60


@pytest.fixture
def op(open_merchant_program: Callable[..., OpenProgram]) -> OpenProgram:
    """The bundled program on this test's ledger."""
    return open_merchant_program()


def cases(op: OpenProgram) -> dict[int, dict[str, Any]]:
    """Every case of the program by merchant id."""
    with op.engine.connect() as connection:
        rows = connection.execute(
            sa.select(ledger.merchant_cases).where(ledger.merchant_cases.c.campaign_key == op.campaign_key)
        ).all()
    return {int(r.merchant_id): dict(r._mapping) for r in rows}


def claim_statuses(op: OpenProgram) -> dict[str, str]:
    """Every recorded claim's intake status by claim id."""
    with op.engine.connect() as connection:
        rows = connection.execute(
            sa.select(ledger.merchant_claims.c.claim_id, ledger.merchant_claims.c.status).where(
                ledger.merchant_claims.c.campaign_key == op.campaign_key
            )
        ).all()
    return {str(c): str(s) for c, s in rows}


def payouts(op: OpenProgram) -> list[tuple[int, int, int]]:
    """Every payout grant row of the program: (merchant id, issue_no, amount), in merchant order."""
    with op.engine.connect() as connection:
        rows = connection.execute(
            sa.select(ledger.grants.c.user_id, ledger.grants.c.issue_no, ledger.grants.c.amount_krw)
            .where(ledger.grants.c.campaign_key == op.campaign_key)
            .order_by(ledger.grants.c.user_id)
        ).all()
    return [(int(u), int(i), int(a)) for u, i, a in rows]


def count(op: OpenProgram, table: sa.Table) -> int:
    with op.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


# --------------------------------------------------------------------------- the program file


def test_bundled_program_tiers_and_windows() -> None:
    program = load_program(None)
    assert program.program_id == "merchant-cash-2022" and program.evidence == EVIDENCE
    assert [(t.up_to_krw, t.amount_krw, t.review) for t in program.tiers] == [
        (300_000, TIER_1_KRW, False),
        (500_000, TIER_2_KRW, False),
        (None, None, True),
    ]
    assert [(w.name, w.opens_at.isoformat(), w.closes_at.isoformat()) for w in program.windows] == [
        ("initial", "2022-10-19T00:00:00+09:00", "2022-11-07T00:00:00+09:00"),
        ("extension", "2023-01-02T00:00:00+09:00", "2023-01-16T00:00:00+09:00"),
    ]
    assert load_program(BUNDLED) == parse_program(BUNDLED.read_text(encoding="utf-8"), str(BUNDLED))


def _program_text(tiers: str | None = None, intake: str | None = None) -> str:
    text = BUNDLED.read_text(encoding="utf-8")
    head, _, _ = text.partition("[[intake]]")
    default_intake = '[[intake]]\nname = "initial"\nopens = 2022-10-19\ncloses = 2022-11-06\n'
    default_tiers = (
        '[[tiers]]\nname = "a"\nup_to_krw = 300000\namount_krw = 30000\n'
        '[[tiers]]\nname = "b"\nup_to_krw = 500000\namount_krw = 50000\n'
        '[[tiers]]\nname = "c"\nreview = true\n'
    )
    return head + (intake or default_intake) + (tiers or default_tiers)


@pytest.mark.parametrize(
    ("tiers", "intake", "message"),
    [
        (
            '[[tiers]]\nname = "a"\nup_to_krw = 500000\namount_krw = 50000\n'
            '[[tiers]]\nname = "b"\nup_to_krw = 300000\namount_krw = 30000\n[[tiers]]\nname = "c"\nreview = true\n',
            None,
            r"tiers\[1\]\.up_to_krw 300,000 is not above the previous tier's 500,000",
        ),
        (
            '[[tiers]]\nname = "a"\nup_to_krw = 300000\namount_krw = 30000\n'
            '[[tiers]]\nname = "b"\nup_to_krw = 300000\namount_krw = 50000\n[[tiers]]\nname = "c"\nreview = true\n',
            None,
            r"tiers\[1\]\.up_to_krw 300,000 is not above",
        ),
        (
            '[[tiers]]\nname = "a"\nup_to_krw = 300000\namount_krw = 30000\n',
            None,
            r"tiers\[0\] is the last tier and must have no up_to_krw",
        ),
        ('[[tiers]]\nname = "a"\namount_krw = 30000\nreview = true\n', None, r"both review = true and amount_krw"),
        ('[[tiers]]\nname = "a"\n', None, r"tiers\[0\]\.amount_krw is required"),
        (
            None,
            '[[intake]]\nname = "a"\nopens = 2022-10-19\ncloses = 2022-11-06\n'
            '[[intake]]\nname = "b"\nopens = 2022-11-06\ncloses = 2022-11-20\n',
            r"intake\[1\] opens 2022-11-06, before 'a' closes",
        ),
        (None, '[[intake]]\nname = "a"\nopens = 2022-11-19\ncloses = 2022-11-06\n', r"intake\[0\] closes"),
        (None, '[[intake]]\nname = "a"\nopens = "soon"\ncloses = 2022-11-06\n', r"intake\[0\]\.opens must be a date"),
    ],
    ids=[
        "unsorted",
        "overlap",
        "no-open-ended-tier",
        "review-and-amount",
        "no-amount",
        "window-overlap",
        "window-reversed",
        "window-not-a-date",
    ],
)
def test_invalid_program_files_are_refused_naming_the_field(
    tiers: str | None, intake: str | None, message: str
) -> None:
    assert parse_program(_program_text(), "ok.toml").tiers  # the base text itself is valid
    with pytest.raises(CampaignError, match=message):
        parse_program(_program_text(tiers, intake), "bad.toml")


# --------------------------------------------------------------------------- tiers


TIER_CASES = [
    # (merchant id, reported loss, state, tier, amount)
    (1, 1, "auto_tier", "up-to-300k", TIER_1_KRW),
    (2, 299_999, "auto_tier", "up-to-300k", TIER_1_KRW),
    (3, 300_000, "auto_tier", "up-to-300k", TIER_1_KRW),
    (4, 300_001, "auto_tier", "up-to-500k", TIER_2_KRW),
    (5, 499_999, "auto_tier", "up-to-500k", TIER_2_KRW),
    (6, 500_000, "auto_tier", "up-to-500k", TIER_2_KRW),
    (7, 500_001, "needs_review", "above-500k", None),
    (8, 90_000_000, "needs_review", "above-500k", None),
]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tier_boundaries_are_inclusive_and_zero_loss_is_rejected(op: OpenProgram, tmp_path: Path, suffix: str) -> None:
    rows = [claim(f"c{m}", m, loss) for m, loss, *_ in TIER_CASES] + [claim("c9", 9, 0)]
    report = claims.ingest_file(op, write_claims(tmp_path / f"claims{suffix}", rows))
    assert report.by_status == {"accepted": len(TIER_CASES), "below_minimum_loss": 1}
    assert report.quarantined_rows == 0 and report.quarantine_file is None
    found = cases(op)
    assert {m: (c["state"], c["tier"], c["amount_krw"]) for m, c in found.items()} == {
        m: (state, tier, amount) for m, _, state, tier, amount in TIER_CASES
    }, "merchant 9 reported no loss: its claim is rejected and it has no case"
    assert {m: found[m]["review_reason"] for m in (7, 8)} == {7: "tier_review", 8: "tier_review"}
    assert claim_statuses(op)["c9"] == "below_minimum_loss"

    paid = claims.pay(op)
    assert (paid.paid, paid.paid_krw) == (6, 3 * TIER_1_KRW + 3 * TIER_2_KRW)
    assert payouts(op) == [(m, 0, amount) for m, _, state, _, amount in TIER_CASES if amount is not None]
    assert reconciliation.reconcile(op).verdict == "RECONCILED"


# --------------------------------------------------------------------------- intake window


def test_claims_outside_every_intake_window_are_rejected_with_that_reason(op: OpenProgram, tmp_path: Path) -> None:
    submitted = {
        "before-open": "2022-10-18T23:59:59+09:00",
        "at-open": "2022-10-19T00:00:00+09:00",
        "open-in-utc": "2022-10-18T15:00:00Z",  # = 2022-10-19T00:00+09:00
        "naive-is-seoul": "2022-10-19 00:00:00",
        "last-instant": "2022-11-06T23:59:59.999999+09:00",
        "at-close": "2022-11-07T00:00:00+09:00",
        "between-windows": "2022-12-15T12:00:00+09:00",
        "extension-open": "2023-01-02T00:00:00+09:00",
        "in-extension": "2023-01-10T09:30:00+09:00",
        "extension-last": "2023-01-15T23:59:59+09:00",
        "after-extension": "2023-01-16T00:00:00+09:00",
    }
    rows = [claim(name, 100 + i, 1000, at) for i, (name, at) in enumerate(submitted.items())]
    claims.ingest_file(op, write_claims(tmp_path / "claims.csv", rows))
    outside = {"before-open", "at-close", "between-windows", "after-extension"}
    assert claim_statuses(op) == {n: "outside_intake_window" if n in outside else "accepted" for n in submitted}
    with op.engine.connect() as connection:
        windows = dict(
            connection.execute(
                sa.select(ledger.merchant_claims.c.claim_id, ledger.merchant_claims.c.intake_window)
            ).all()
        )
    assert windows["in-extension"] == "extension" and windows["at-open"] == "initial" and windows["at-close"] is None
    assert len(cases(op)) == len(submitted) - len(outside), "an outside-window claim opens no case"
    claims.pay(op)
    assert len(payouts(op)) == len(submitted) - len(outside)
    result = reconciliation.reconcile(op)
    assert result.verdict == "RECONCILED" and result.claims_by_status["outside_intake_window"] == len(outside)


# --------------------------------------------------------------------------- duplicates


def test_identical_claims_merge_and_conflicting_ones_go_to_review(op: OpenProgram, tmp_path: Path) -> None:
    rows = [
        claim("a1", 11, 250_000, "2022-10-20T10:00:00+09:00"),
        claim("a2", 11, 250_000, "2022-10-25T16:00:00+09:00"),  # the same report again, days later
        claim("b1", 12, 250_000),
        claim("b2", 12, 450_000),  # same merchant, another loss
        claim("c1", 13, 100_000, evidence=("yes", "no", "yes")),  # no proof of lost sales
        claim("a1", 11, 250_000, "2022-10-20T10:00:00+09:00"),  # the same row twice in the file
    ]
    first = claims.ingest_file(op, write_claims(tmp_path / "claims.csv", rows))
    assert (first.claims_new, first.duplicate_rows, first.quarantined_rows) == (5, 1, 0)
    found = cases(op)
    assert (found[11]["state"], found[11]["claim_count"], found[11]["amount_krw"]) == ("auto_tier", 2, TIER_1_KRW)
    assert (found[12]["state"], found[12]["review_reason"], found[12]["loss_krw"]) == (
        "needs_review",
        "conflicting_claims",
        450_000,
    )
    assert (found[13]["state"], found[13]["review_reason"]) == ("needs_review", "incomplete_evidence")
    reviews = {r.case_id: r for r in merchant_review.open_reviews(op)}
    assert sorted(reviews) == ["mc-12", "mc-13"] and reviews["mc-12"].claim_ids == ["b1", "b2"]

    again = claims.ingest_file(op, tmp_path / "claims.csv")
    assert again.already_ingested and again.claims_new == 0
    # Another file: a known claim id with the same content is known; with changed content it is quarantined.
    second = claims.ingest_file(
        op,
        write_claims(
            tmp_path / "later.csv",
            [claim("a1", 11, 250_000, "2022-10-20T10:00:00+09:00"), claim("b1", 12, 999_999)]
            + [claim(f"n{i}", 200 + i, 1000) for i in range(40)],
        ),
    )
    assert (second.claims_new, second.claims_known, second.quarantined_rows) == (40, 1, 1)
    quarantined = pl.read_parquet(second.quarantine_file)
    assert quarantined.select("row_number", "claim_id", "field").rows() == [(2, "b1", "claim_id")]
    assert "already recorded with different content" in quarantined["reason"][0]
    assert count(op, ledger.merchant_claims) == 45

    claims.pay(op)
    assert [m for m, *_ in payouts(op)] == [11] + list(range(200, 240)), "merged: one payout; review: none yet"


def test_a_claim_after_the_decision_is_recorded_but_not_merged(op: OpenProgram, tmp_path: Path) -> None:
    claims.ingest_file(op, write_claims(tmp_path / "one.csv", [claim("x1", 21, 100_000)]))
    claims.pay(op)
    report = claims.ingest_file(op, write_claims(tmp_path / "two.csv", [claim("x2", 21, 400_000)]))
    assert report.by_status == {"after_decision": 1} and report.after_decision == ["mc-21"]
    assert cases(op)[21]["state"] == "paid" and payouts(op) == [(21, 0, TIER_1_KRW)]
    assert reconciliation.reconcile(op).verdict == "RECONCILED"


# --------------------------------------------------------------------------- malformed rows


def test_malformed_rows_are_quarantined_naming_row_field_and_reason(op: OpenProgram, tmp_path: Path) -> None:
    good = [claim(f"g{i}", 1000 + i, 1000 * (i + 1)) for i in range(200)]
    bad = [
        claim("", 31, 1000),
        claim("m1", "abc", 1000),
        claim("m2", -5, 1000),
        claim("m3", 33, -1),
        claim("m4", 34, ""),
        claim("m5", 35, "1,000"),
        claim("m6", 36, 1000, "20/10/2022"),
        claim("m7", 37, 1000, evidence=("yes", "maybe", "yes")),
        claim("m8", 38, 1000, evidence=("yes", "yes", "")),
    ]
    report = claims.ingest_file(op, write_claims(tmp_path / "claims.csv", good + bad))
    assert (report.claims_new, report.quarantined_rows) == (200, 9)
    quarantined = pl.read_parquet(report.quarantine_file)
    assert quarantined.columns == ["source_file", "row_number", "claim_id", "field", "raw_value", "reason"]
    found = {(r, f): reason for r, f, reason in quarantined.select("row_number", "field", "reason").iter_rows()}
    assert found == {
        (201, "claim_id"): "missing",
        (202, "merchant_id"): "not a whole number (digits only, no separators or currency signs)",
        (203, "merchant_id"): "out of range: a merchant id is a positive 64-bit integer",
        (204, "loss_krw"): "negative: a reported loss is 0 or more won",
        (205, "loss_krw"): "missing",
        (206, "loss_krw"): "not a whole number (digits only, no separators or currency signs)",
        (207, "submitted_at"): "not an ISO 8601 timestamp such as 2022-10-20T14:03:00+09:00",
        (208, "proof_of_lost_sales"): "unknown value: use yes or no",
        (209, "proof_of_service_use"): "missing: say yes or no",
    }
    assert set(claim_statuses(op)) == {f"g{i}" for i in range(200)}


def test_too_many_malformed_rows_refuse_the_whole_file(op: OpenProgram, tmp_path: Path) -> None:
    rows = [claim(f"g{i}", 1000 + i, 1000) for i in range(10)] + [claim("bad", 1, "lots")]
    with pytest.raises(
        ClaimsInputError, match=r"claims\.csv: 1 of 11 rows are malformed .*nothing was recorded"
    ) as err:
        claims.ingest_file(op, write_claims(tmp_path / "claims.csv", rows))
    assert "row 11 loss_krw" in str(err.value) and err.value.exit_code == 3
    assert count(op, ledger.merchant_claims) == count(op, ledger.merchant_cases) == 0
    assert count(op, ledger.merchant_intake_files) == 0
    rejected = list((op.folder / "rejected").glob("claims.csv.*.quarantine.parquet"))
    assert len(rejected) == 1 and pl.read_parquet(rejected[0])["row_number"].to_list() == [11]


def test_a_file_without_a_column_is_refused(op: OpenProgram, tmp_path: Path) -> None:
    path = tmp_path / "claims.csv"
    path.write_text("claim_id,merchant_id,submitted_at,loss_krw\nc1,1,2022-10-20T10:00:00+09:00,1000\n")
    with pytest.raises(ClaimsInputError, match=r"missing column\(s\) \['merchant_certificate'"):
        claims.ingest_file(op, path)
    assert count(op, ledger.merchant_claims) == 0


# --------------------------------------------------------------------------- review


def test_a_review_decision_recorded_twice(op: OpenProgram, tmp_path: Path) -> None:
    claims.ingest_file(
        op, write_claims(tmp_path / "claims.csv", [claim("r1", 41, 800_000), claim("r2", 42, 900_000)])
    )
    first = merchant_review.decide(op, "mc-41", "approve", 120_000, "kim", "proof of 800k loss checked")
    assert not first.already_recorded
    repeated = merchant_review.decide(op, "mc-41", "approve", 120_000, "kim", "proof of 800k loss checked")
    assert repeated.already_recorded and repeated.decided_at == first.decided_at
    with pytest.raises(
        ReviewRefusedError, match=r"case mc-41 was already decided: approved 120,000 KRW by kim at"
    ) as e:
        merchant_review.decide(op, "mc-41", "reject", None, "lee", "no proof")
    assert e.value.exit_code == 5
    with pytest.raises(ReviewRefusedError, match="already decided"):
        merchant_review.decide(op, "41", "approve", 130_000, "kim", "proof of 800k loss checked")
    assert count(op, ledger.merchant_decisions) == 1, "one decision row, however often it is sent"

    merchant_review.decide(op, "mc-42", "reject", None, "lee", "no proof of service use")
    with pytest.raises(ReviewRefusedError, match=r"has no case mc-404"):
        merchant_review.decide(op, "mc-404", "approve", 1, "kim", "x")
    claims.pay(op)
    assert payouts(op) == [(41, 0, 120_000)]
    assert cases(op)[42]["state"] == "rejected"
    with op.engine.connect() as connection:
        audit = connection.execute(
            sa.select(ledger.merchant_decisions.c.merchant_id, ledger.merchant_decisions.c.actor).order_by(
                ledger.merchant_decisions.c.merchant_id
            )
        ).all()
    assert [tuple(r) for r in audit] == [(41, "kim"), (42, "lee")]
    with pytest.raises(DBAPIError, match="append-only"), op.engine.begin() as connection:
        connection.execute(ledger.merchant_decisions.update().values(actor="someone else"))
    with pytest.raises(DBAPIError, match="append-only"), op.engine.begin() as connection:
        connection.execute(ledger.merchant_decisions.delete())
    assert reconciliation.reconcile(op).verdict == "RECONCILED"


@pytest.mark.parametrize(
    ("case", "decision", "amount", "message"),
    [
        ("mc-51", "approve", 0, r"--amount 0 must be between 1 and 700,000 KRW"),
        ("mc-51", "approve", 700_001, r"--amount 700001 must be between 1 and 700,000"),
        ("mc-51", "reject", 5, r"a rejection has no --amount"),
        ("mc-52", "approve", 10_000, r"case mc-52 is auto_tier, not in review"),
        ("mc-999", "reject", None, r"has no case mc-999"),
        ("merchant 51", "reject", None, r"not a case id"),
    ],
)
def test_decisions_that_do_not_fit_are_refused(
    op: OpenProgram, tmp_path: Path, case: str, decision: str, amount: int | None, message: str
) -> None:
    claims.ingest_file(
        op, write_claims(tmp_path / "claims.csv", [claim("p1", 51, 700_000), claim("p2", 52, 1000)])
    )
    with pytest.raises(ReviewRefusedError, match=message):
        merchant_review.decide(op, case, decision, amount, "kim", "reason")
    assert count(op, ledger.merchant_decisions) == 0


# --------------------------------------------------------------------------- payouts


def test_payouts_are_idempotent_at_most_one_per_merchant(op: OpenProgram, tmp_path: Path) -> None:
    claims.ingest_file(
        op, write_claims(tmp_path / "claims.csv", [claim(f"k{m}", m, m * 1000) for m in range(1, 401)])
    )
    first = claims.pay(op, batch_cases_max=64)
    assert (first.paid, first.batches) == (400, 7)
    second = claims.pay(op)
    assert (second.paid, second.paid_krw, second.batches) == (0, 0, 0)
    planned = [(m, 0, TIER_1_KRW if m <= 300 else TIER_2_KRW) for m in range(1, 401)]
    assert payouts(op) == planned
    with pytest.raises(IntegrityError), op.engine.begin() as connection:
        connection.execute(ledger.grants.insert().values(**_grant_row(op, 7, 30_000)))
    assert payouts(op) == planned


def _grant_row(op: OpenProgram, merchant: int, amount: int) -> dict[str, Any]:
    with op.engine.connect() as connection:
        run_key = connection.execute(sa.select(sa.func.max(ledger.runs.c.run_key))).scalar_one()
    from pipeline.grants.partitioning import user_bucket

    return {
        "campaign_key": op.campaign_key,
        "user_bucket": user_bucket(merchant),
        "user_id": merchant,
        "item_key": op.item_key,
        "issue_no": 0,
        "partition_id": 0,
        "run_key": run_key,
        "amount_krw": amount,
        "valid_from": op.program.starts_at,
        "valid_until": None,
        "granted_at": dt.datetime.now(dt.UTC),
    }


class Crash(Exception):
    pass


def test_a_crash_between_batches_then_a_rerun_pays_exactly_the_plan(op: OpenProgram, tmp_path: Path) -> None:
    claims.ingest_file(
        op, write_claims(tmp_path / "claims.csv", [claim(f"k{m}", m, 400_000) for m in range(1, 101)])
    )

    def crash(batch: int) -> None:
        raise Crash(f"killed after batch {batch}")

    with pytest.raises(Crash):
        claims.pay(op, run_id="pay-1", batch_cases_max=30, after_batch=crash)
    assert len(payouts(op)) == 30
    assert reconciliation.reconcile(op).verdict == "BREAKS", "70 cases due and not paid yet"
    rerun = claims.pay(op, run_id="pay-1", batch_cases_max=30)
    assert rerun.paid == 70
    assert payouts(op) == [(m, 0, TIER_2_KRW) for m in range(1, 101)]
    assert reconciliation.reconcile(op).verdict == "RECONCILED"


def test_a_failure_inside_a_batch_writes_nothing_of_it(
    op: OpenProgram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims.ingest_file(
        op, write_claims(tmp_path / "claims.csv", [claim(f"k{m}", m, 1000) for m in range(1, 11)])
    )
    real_granted = merchant_payouts._granted

    def granted_then_die(*args: Any) -> set[int]:
        raise Crash("the process dies before the batch commits")

    monkeypatch.setattr(merchant_payouts, "_granted", granted_then_die)
    with pytest.raises(Crash):
        claims.pay(op)
    assert payouts(op) == [] and {c["state"] for c in cases(op).values()} == {"auto_tier"}
    monkeypatch.setattr(merchant_payouts, "_granted", real_granted)
    assert claims.pay(op).paid == 10 and len(payouts(op)) == 10


# --------------------------------------------------------------------------- reconciliation and queries


def test_reconciliation_finds_every_kind_of_break(op: OpenProgram, tmp_path: Path) -> None:
    claims.ingest_file(
        op,
        write_claims(
            tmp_path / "claims.csv",
            [
                claim("a", 61, 1000),
                claim("b", 62, 1000),
                claim("c", 63, 900_000),
                claim("late", 64, 1000, "2022-12-01T00:00:00+09:00"),
            ],
        ),
    )
    claims.pay(op)
    with op.engine.begin() as connection:
        # Behind the program's back: a payout to a merchant in review, one to a claim outside the window;
        # and merchant 62's payout voided (a void, however written, is explained: it says who and why).
        connection.execute(ledger.grants.insert(), [_grant_row(op, 63, 50_000), _grant_row(op, 64, 30_000)])
        row = _grant_row(op, 62, 0)
        connection.execute(
            ledger.grant_voids.insert().values(
                **{k: row[k] for k in ("campaign_key", "user_bucket", "user_id", "item_key", "issue_no")},
                reason="test",
                actor="tester",
                voided_at=dt.datetime.now(dt.UTC),
            )
        )
    result = reconciliation.reconcile(op)
    assert result.verdict == "BREAKS"
    assert sorted((b.break_class, b.case_id) for b in result.breaks) == [
        ("case_state", "mc-63"),
        ("unexpected", "mc-63"),
        ("unexpected", "mc-64"),
    ]
    tiers = {t.tier: (t.cases, t.expected_payouts, t.paid, t.paid_krw, t.voided, t.voided_krw) for t in result.tiers}
    assert tiers["up-to-300k"] == (2, 2, 1, TIER_1_KRW, 1, TIER_1_KRW)
    assert tiers["review-pending"] == (1, 0, 1, 50_000, 0, 0)
    stored = queries.run_query(op.engine, "program_reconciliations", {})
    latest = dict(zip(stored.columns, stored.rows[0], strict=True))
    assert (latest["program"], latest["verdict"], latest["breaks"]) == ("merchant_cash", "BREAKS", 3)
    assert latest["explanation"] == result.explanation, "each reconciliation is stored for the analysts"


def test_a_voided_payout_is_explained_and_never_paid_again(op: OpenProgram, tmp_path: Path) -> None:
    rows = [claim("a", 91, 1000), claim("b", 92, 400_000), claim("c", 93, 1), claim("d", 94, 900_000)]
    claims.ingest_file(op, write_claims(tmp_path / "claims.csv", rows))
    claims.pay(op)
    with op.engine.begin() as connection:  # a payout to a case in review, behind the program's back
        connection.execute(ledger.grants.insert(), [_grant_row(op, 94, 70_000)])
    assert [b.break_class for b in reconciliation.reconcile(op).breaks] == ["unexpected", "case_state"]
    now = op.settings.clock()
    voided = corrections.void_grants(
        op, [corrections.VoidRequest("fraud case 118", 92), corrections.VoidRequest("paid by mistake", 94)], "kim", now
    )
    assert [(v.user_id, v.amount_krw, v.issue_no) for v in voided] == [(92, TIER_2_KRW, 0), (94, 70_000, 0)]

    result = reconciliation.reconcile(op)
    assert (result.verdict, result.breaks) == ("RECONCILED", []), result.breaks
    assert "2 due payouts is paid exactly once" in result.explanation
    assert "voided on purpose: 2 payout(s), 1 of them due" in result.explanation
    tiers = {t.tier: (t.expected_payouts, t.paid, t.voided, t.voided_krw, t.voided_due) for t in result.tiers}
    assert tiers["up-to-500k"] == (1, 0, 1, TIER_2_KRW, 1)
    assert tiers["up-to-300k"] == (2, 2, 0, 0, 0)
    assert tiers["review-pending"] == (0, 0, 1, 70_000, 0)

    again = claims.pay(op)
    assert (again.paid, again.paid_krw) == (0, 0), "a voided payout is never paid again"
    assert payouts(op) == [(91, 0, TIER_1_KRW), (92, 0, TIER_2_KRW), (93, 0, TIER_1_KRW), (94, 0, 70_000)]
    with pytest.raises(CorrectionError, match=r"already voided: issue 0 voided .* by kim"):
        corrections.void_grants(op, [corrections.VoidRequest("twice", 92)], "ops-lee", now)
    with pytest.raises(CorrectionError, match="nothing was voided: .*user 95 has no live grant"):
        corrections.void_grants(
            op, [corrections.VoidRequest("x", 91), corrections.VoidRequest("x", 95)], "ops-lee", now
        )
    assert reconciliation.reconcile(op).verdict == "RECONCILED", "the refused batch wrote nothing"

    by_tier = queries.run_query(op.engine, "payouts_per_tier", {"program_id": "merchant-cash-2022"})
    rows = {r[1]: dict(zip(by_tier.columns, r, strict=True)) for r in by_tier.rows}
    assert {t: (r["paid"], r["paid_krw"], r["voided"], r["voided_krw"]) for t, r in rows.items()} == {
        "up-to-300k": (2, 2 * TIER_1_KRW, 0, 0),
        "up-to-500k": (0, 0, 1, TIER_2_KRW),
        "above-500k": (0, 0, 1, 70_000),
    }


def test_analyst_queries(op: OpenProgram, tmp_path: Path) -> None:
    claims.ingest_file(
        op,
        write_claims(
            tmp_path / "claims.csv",
            [
                claim("a", 71, 1000),
                claim("b", 72, 400_000),
                claim("c", 73, 900_000),
                claim("d", 74, 800_000),
                claim("e", 75, 1000, "2023-02-01T00:00:00+09:00"),
            ],
        ),
    )
    merchant_review.decide(op, "mc-73", "approve", 200_000, "kim", "proof checked")
    claims.pay(op)
    by_tier = queries.run_query(op.engine, "payouts_per_tier", {"program_id": "merchant-cash-2022"})
    rows = {(r[1], r[2]): dict(zip(by_tier.columns, r, strict=True)) for r in by_tier.rows}
    assert {k: (v["cases"], v["decisions"], v["payable_krw"], v["paid"], v["paid_krw"]) for k, v in rows.items()} == {
        ("up-to-300k", "paid"): (1, 0, TIER_1_KRW, 1, TIER_1_KRW),
        ("up-to-500k", "paid"): (1, 0, TIER_2_KRW, 1, TIER_2_KRW),
        ("above-500k", "paid"): (1, 1, 200_000, 1, 200_000),
        ("above-500k", "needs_review"): (1, 0, 0, 0, 0),
    }
    open_items = queries.run_query(op.engine, "open_reviews", {})
    listed = [dict(zip(open_items.columns, r, strict=True)) for r in open_items.rows]
    assert [(r["case_id"], r["review_reason"], r["loss_krw"]) for r in listed] == [("mc-74", "tier_review", 800_000)]
    assert 0 <= float(listed[0]["age_days"]) < 1
    states = queries.run_query(op.engine, "claims_by_state", {})
    by_state = {(r[1], r[3]): r[4] for r in states.rows}
    assert by_state == {("accepted", "paid"): 3, ("accepted", "needs_review"): 1, ("outside_intake_window", None): 1}


# --------------------------------------------------------------------------- the console script


def test_cli_end_to_end(tmp_path: Path) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    path = write_claims(
        tmp_path / "claims.parquet",
        [claim("a", 81, 300_000), claim("b", 82, 500_001), claim("c", 83, 2_000_000)],
    )
    ingested = run_entitle(["claims", "ingest", "--from", str(path), "--json"], env)
    assert ingested.returncode == 0, ingested.stderr
    assert json.loads(ingested.stdout)["by_status"] == {"accepted": 3}
    listed = run_entitle(["review", "list", "--json"], env)
    assert [r["case_id"] for r in json.loads(listed.stdout)["open_reviews"]] == ["mc-82", "mc-83"]
    before = run_entitle(["claims", "reconcile"], env)
    assert before.returncode == 8 and "unpaid" in before.stdout
    approve = ["review", "approve", "mc-82", "--amount", "70000", "--actor", "kim", "--reason", "sales proof ok"]
    assert run_entitle(approve, env).returncode == 0
    again = run_entitle(approve, env)
    assert again.returncode == 0 and "already recorded" in again.stdout
    refused = run_entitle(["review", "reject", "mc-82", "--actor", "lee", "--reason", "no", "--json"], env)
    assert refused.returncode == 5 and "already decided: approved 70,000 KRW by kim at" in refused.stderr
    assert json.loads(refused.stdout)["exit_code"] == 5 and "Traceback" not in refused.stderr
    paid = run_entitle(["claims", "pay", "--json"], env)
    assert paid.returncode == 0 and json.loads(paid.stdout)["paid_krw"] == TIER_1_KRW + 70_000
    reconciled = run_entitle(["claims", "--json", "reconcile"], env)
    assert reconciled.returncode == 0, reconciled.stdout
    assert json.loads(reconciled.stdout)["verdict"] == "RECONCILED"
    query = run_entitle(["query", "open_reviews", "--format", "csv"], env)
    assert query.returncode == 0 and query.stdout.splitlines()[1].startswith("merchant-cash-2022,mc-83,83,tier_review")

    # Taking a payout back: all-or-nothing, audited, explained by the reconciliation, never paid again.
    refused = run_entitle(["claims", "void", "mc-81", "mc-83", "--actor", "lee", "--reason", "fraud case 118"], env)
    assert refused.returncode == 5 and "case mc-83: user 83 has no live grant to void" in refused.stderr
    assert "nothing was voided" in refused.stderr and "Traceback" not in refused.stderr
    assert run_entitle(["claims", "void", "81x", "--actor", "lee", "--reason", "r"], env).returncode == 5
    voided = run_entitle(["claims", "void", "mc-81", "--actor", "lee", "--reason", "fraud case 118", "--json"], env)
    assert voided.returncode == 0, voided.stderr
    assert [(v["user_id"], v["amount_krw"]) for v in json.loads(voided.stdout)["voided"]] == [(81, TIER_1_KRW)]
    twice = run_entitle(["claims", "void", "mc-81", "--actor", "kim", "--reason", "again"], env)
    assert twice.returncode == 5 and "already voided: issue 0 voided" in twice.stderr and "by lee" in twice.stderr
    after = run_entitle(["claims", "reconcile"], env)
    assert after.returncode == 0 and "voided on purpose: 1 payout(s), 1 of them due" in after.stdout, after.stdout
    assert json.loads(run_entitle(["claims", "pay", "--json"], env).stdout)["paid"] == 0
    broken = tmp_path / "broken.csv"
    broken.write_text("claim_id\nx\n")
    bad = run_entitle(["claims", "ingest", "--from", str(broken)], env)
    assert bad.returncode == 3 and bad.stderr.startswith("entitle: error: ") and "missing column" in bad.stderr


# --------------------------------------------------------------------------- the DAG, run by Airflow

_RUN_MERCHANT_DAG = r"""
import json, os, sys, importlib.util
import pendulum
sys.path.append(os.path.dirname(sys.argv[1]))  # as Airflow does: the dags folder is importable
spec = importlib.util.spec_from_file_location("merchant_cash_dagfile", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
run = module.merchant_cash().test(logical_date=pendulum.parse(sys.argv[2]))
print(json.dumps({"run_id": run.run_id, "state": str(run.state)}))
"""


@pytest.mark.airflow
@pytest.mark.slow
def test_dag_ingests_assigns_pays_and_reconciles(tmp_path: Path, airflow_env: dict[str, str]) -> None:  # noqa: F811
    env = dict(airflow_env)
    env["ENTITLE_HOME"] = str(tmp_path / "var")
    incoming = tmp_path / "var" / "incoming" / "merchant-cash-2022"
    write_claims(incoming / "day1.csv", [claim("a", 91, 300_000), claim("b", 92, 300_001), claim("c", 93, 600_000)])
    write_claims(incoming / "day1-more.parquet", [claim("d", 94, 10, "2022-10-01T00:00:00+09:00")])

    def run(logical_date: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", _RUN_MERCHANT_DAG, str(ROOT / "dags" / "merchant_cash.py"), logical_date],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    assert run("2022-10-21T03:00:00+09:00")["state"] == "success"
    env_entitle = cli_environment(ENTITLE_HOME=env["ENTITLE_HOME"])
    paid = run_entitle(["query", "payouts_per_tier", "--format", "json"], env_entitle)
    rows = json.loads(paid.stdout)  # records
    assert {(r["tier"], r["state"]): (r["paid"], r["paid_krw"]) for r in rows} == {
        ("up-to-300k", "paid"): (1, TIER_1_KRW),
        ("up-to-500k", "paid"): (1, TIER_2_KRW),
        ("above-500k", "needs_review"): (0, 0),
    }
    decided = ["review", "approve", "mc-93", "--amount", "100000", "--actor", "kim", "--reason", "checked"]
    assert run_entitle(decided, env_entitle).returncode == 0
    assert run("2022-10-22T03:00:00+09:00")["state"] == "success"
    reconciled = run_entitle(["claims", "reconcile", "--json"], env_entitle)
    assert reconciled.returncode == 0, reconciled.stdout
    document = json.loads(reconciled.stdout)
    assert document["claims_by_status"] == {"accepted": 3, "outside_intake_window": 1}
    assert sum(t["paid_krw"] for t in document["tiers"]) == TIER_1_KRW + TIER_2_KRW + 100_000


_DAG_BOUNDS = r"""
import json, os, runpy, sys
sys.path.append(os.path.dirname(sys.argv[1]))  # as Airflow does: the dags folder is importable
dag = runpy.run_path(sys.argv[1])["merchant_cash_dag"]
print(json.dumps({"start": dag.start_date.isoformat(), "end": dag.end_date.isoformat(),
                  "schedule": str(dag.schedule), "timezone": str(dag.timezone)}))
"""


@pytest.mark.airflow
def test_dag_runs_daily_within_the_program_intake_windows(
    tmp_path: Path,
    airflow_env: dict[str, str],  # noqa: F811
) -> None:
    custom = tmp_path / "program.toml"
    custom.write_text(
        _program_text(intake='[[intake]]\nname = "only"\nopens = 2023-03-01\ncloses = 2023-03-14\n'), encoding="utf-8"
    )
    for program_file in (None, custom):
        env = dict(airflow_env)
        if program_file is not None:
            env["ENTITLE_MERCHANT_PROGRAM"] = str(program_file)
        done = subprocess.run(
            [sys.executable, "-c", _DAG_BOUNDS, str(ROOT / "dags" / "merchant_cash.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        bounds = json.loads(done.stdout.strip().splitlines()[-1])
        program = load_program(program_file)
        assert dt.datetime.fromisoformat(bounds["start"]) == program.starts_at
        # The last run, at 03:00 the day after the last window closes, picks up that day's claims.
        assert dt.datetime.fromisoformat(bounds["end"]) == program.ends_at + dt.timedelta(hours=3)
        assert "0 3 * * *" in bounds["schedule"] and "Asia/Seoul" in bounds["timezone"]


def test_a_typed_parquet_file_is_read_as_well(op: OpenProgram, tmp_path: Path) -> None:
    path = tmp_path / "typed.parquet"
    pl.DataFrame(
        {
            "claim_id": ["t1", "t2", "t3"],
            "merchant_id": [301, 302, 303],
            "submitted_at": [
                dt.datetime(2022, 10, 20, 1, 0, tzinfo=dt.UTC),
                dt.datetime(2022, 10, 18, 14, 59, tzinfo=dt.UTC),  # 23:59 in Seoul, the day before opening
                dt.datetime(2022, 10, 21, 9, 0),  # naive: Seoul time
            ],
            "loss_krw": [300_000, 300_000, 500_001],
            "merchant_certificate": [True, True, True],
            "proof_of_lost_sales": [True, True, False],
            "proof_of_service_use": [True, True, True],
            "note": ["extra columns are ignored", None, None],
        }
    ).write_parquet(path)
    report = claims.ingest_file(op, path)
    assert report.by_status == {"accepted": 2, "outside_intake_window": 1} and report.quarantined_rows == 0
    found = {m: (c["state"], c["review_reason"], c["amount_krw"]) for m, c in cases(op).items()}
    assert found == {301: ("auto_tier", None, TIER_1_KRW), 303: ("needs_review", "incomplete_evidence", None)}


@pytest.mark.slow
def test_entitle_claims_pay_killed_mid_way_then_rerun_pays_exactly_the_plan(tmp_path: Path) -> None:
    merchants = 20_000
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    path = write_claims(tmp_path / "claims.csv", [claim(f"k{m}", m, 100_000 + m) for m in range(1, merchants + 1)])
    assert run_entitle(["claims", "ingest", "--from", str(path)], env).returncode == 0
    database = tmp_path / "var" / "ledger.sqlite"

    def paid_rows() -> int:
        with sqlite3.connect(database, timeout=60) as connection:
            return int(connection.execute("SELECT count(*) FROM grants").fetchone()[0])

    process = subprocess.Popen(
        [str(ENTITLE_SCRIPT), "claims", "pay", "--batch-cases", "50", "--run-id", "killed"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + KILL_WAIT_S
    while paid_rows() == 0 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    partial = paid_rows()
    assert 0 < partial < merchants, f"the kill should land mid-way; {partial} of {merchants} paid"

    rerun = run_entitle(["claims", "pay", "--run-id", "killed", "--json"], env)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["paid"] == merchants - partial
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT user_id, issue_no, amount_krw FROM grants ORDER BY user_id").fetchall()
    assert rows == [(m, 0, TIER_1_KRW if 100_000 + m <= 300_000 else TIER_2_KRW) for m in range(1, merchants + 1)]
    assert run_entitle(["claims", "reconcile"], env).returncode == 0
