"""pipeline.reconciliation.verdict: one verdict for every reconciliation, its status derived in one place.

The shared type on its own (status derivation, bridge arithmetic, the invariants a verdict
keeps), then each of the four reconciliations (a campaign, an issuer's export, merchant cash,
the pass program) on a real ledger, clean and broken: each returns the same type, with the
status its bridge and breaks call for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support.delivery import CAMPAIGN, delivery_settings, write_campaign
from support.drawer_pass import synthetic, write_applications
from support.ledger_state import Prepared, prepare_pipeline
from support.merchant_cash import TIER_1_KRW, claim, write_claims
from support.reconciliation import STRANGER, USERS, tamper_for
from support.settings import ITEMS_PER_USER, build_settings

from pipeline import ledger, reconciliation
from pipeline.campaigns import IssuerSpec
from pipeline.config import Settings
from pipeline.delivery.issuers import Answer, IssuerUnavailable
from pipeline.errors import InvariantViolation
from pipeline.grants import runs
from pipeline.grants.partitioning import user_bucket
from pipeline.programs.drawer_pass import allocation as pass_allocation
from pipeline.programs.drawer_pass import intake
from pipeline.programs.drawer_pass import reconciliation as pass_reconciliation
from pipeline.programs.merchant_cash import claims
from pipeline.programs.merchant_cash import reconciliation as merchant_reconciliation
from pipeline.reconciliation import three_way
from pipeline.reconciliation.verdict import (
    BREAKS,
    INCOMPLETE,
    RECONCILED,
    STATUSES,
    Bridge,
    Step,
    Verdict,
    derive_status,
    judge,
)


def bridge_of(expected: int, *steps: Step, actual: int) -> Bridge:
    return Bridge("grants", Step("expected", expected), steps, Step("actual", actual))


def say_status(status: str, reasons: tuple[str, ...]) -> str:
    return f"{status}: {'; '.join(reasons)}"


def checkpoints(verdict: Verdict) -> dict[str, int]:
    """The counted figures of a bridge: the expected one, every checkpoint and the actual one."""
    bridge = verdict.bridge
    found = {bridge.expected.label: bridge.expected.value, bridge.actual.label: bridge.actual.value}
    found.update({s.label: s.value for s in bridge.steps if s.checkpoint})
    return found


def assert_is_the_shared_verdict(verdict: object, status: str) -> Verdict:
    assert isinstance(verdict, Verdict)
    assert verdict.status == status, verdict.explanation
    assert verdict.status == derive_status(verdict.bridge, verdict.breaks, verdict.incomplete)
    json.dumps(verdict.as_dict())  # plain values
    return verdict


# --------------------------------------------------------------------------- the type


def test_the_status_is_incomplete_first_then_breaks_then_reconciled() -> None:
    adds_up = bridge_of(10, Step("missing", -2), actual=8)
    off = bridge_of(10, Step("missing", -2), actual=9)
    assert STATUSES == (RECONCILED, BREAKS, INCOMPLETE)
    assert derive_status(adds_up, {"missing": 0, "unexpected": 0}) == RECONCILED
    assert derive_status(adds_up, {"missing": 2, "unexpected": 0}) == BREAKS
    assert derive_status(adds_up, {"missing": 2}, ["partition 3 unreadable"]) == INCOMPLETE
    assert derive_status(off, {"missing": 0}) == INCOMPLETE, "numbers that do not add up prove nothing"
    assert derive_status(off, {"missing": 2}) == INCOMPLETE


def test_a_bridge_adds_up_step_by_step_and_names_the_step_that_does_not() -> None:
    bridge = bridge_of(
        100,
        Step("missing", -3),
        Step("voided", -1),
        Step("matched", 96, checkpoint=True),
        Step("unexpected", 2),
        actual=98,
    )
    assert bridge.residuals() == (("matched", 0), ("actual", 0)) and bridge.adds_up()
    assert bridge.mismatch() == ""
    assert bridge.text() == "expected 100 - missing 3 - voided 1 = matched 96 + unexpected 2 = actual 98 (grants)"

    wrong = bridge_of(100, Step("missing", -3), Step("matched", 95, checkpoint=True), Step("unexpected", 2), actual=99)
    # After a checkpoint the running total carries on from the counted figure: each residual stands alone.
    assert wrong.residuals() == (("matched", -2), ("actual", 2))
    assert not wrong.adds_up()
    assert wrong.mismatch() == "the bridge of grants does not add up (counted minus bridged: matched -2, actual +2)"
    document = wrong.as_dict()
    assert document["adds_up"] is False
    assert document["residuals"] == [{"label": "matched", "value": -2}, {"label": "actual", "value": 2}]
    assert [s["checkpoint"] for s in document["steps"]] == [False, True, False]


def test_a_verdict_cannot_disagree_with_its_bridge_and_breaks() -> None:
    bridge = bridge_of(10, Step("missing", -1), actual=9)
    assert Verdict(BREAKS, "1 missing", bridge, {"missing": 1}).open_breaks == 1
    with pytest.raises(InvariantViolation, match="verdict RECONCILED where the bridge and breaks give BREAKS"):
        Verdict(RECONCILED, "all fine", bridge, {"missing": 1})
    with pytest.raises(InvariantViolation, match="unknown verdict status 'OK'"):
        Verdict("OK", "all fine", bridge, {"missing": 0})
    with pytest.raises(InvariantViolation, match="negative break counts"):
        Verdict(BREAKS, "?", bridge, {"missing": -1})


def test_judge_adds_a_bridge_that_does_not_add_up_to_the_reasons() -> None:
    clean = judge(bridge_of(5, actual=5), {"missing": 0}, explain=say_status)
    assert (clean.status, clean.explanation, clean.incomplete) == (RECONCILED, "RECONCILED: ", ())
    broken = judge(bridge_of(5, Step("missing", -1), actual=4), {"missing": 1}, explain=say_status)
    assert (broken.status, broken.open_breaks) == (BREAKS, 1)
    off = judge(bridge_of(5, actual=4), {"missing": 0}, ["issuer down"], explain=say_status)
    assert off.status == INCOMPLETE
    assert off.incomplete == ("issuer down", "the bridge of grants does not add up (counted minus bridged: actual -1)")
    assert off.explanation == "INCOMPLETE: " + "; ".join(off.incomplete)
    assert off.as_dict() == {
        "status": INCOMPLETE,
        "explanation": off.explanation,
        "bridge": off.bridge.as_dict(),
        "breaks": {"missing": 0},
        "open_breaks": 0,
        "incomplete": list(off.incomplete),
    }


# --------------------------------------------------------------------------- a campaign


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """None for the SQLite ledger under the test's home, else a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
def campaign(
    prepare: Callable[..., Prepared], tmp_path: Path, backend_url: str | None, write_users: Callable[..., Path]
) -> Prepared:
    """The bundled campaign for USERS minus one excluded user, frozen and partitioned (not granted yet)."""
    users = write_users(tmp_path / "users.parquet", USERS)
    blocked = write_users(tmp_path / "blocked.parquet", [USERS[-1]])
    return prepare(build_settings(tmp_path / "var", ledger_url=backend_url), users, blocked)


def test_a_campaign_reconciliation_carries_the_shared_verdict_clean_and_broken(campaign: Prepared) -> None:
    pipeline = campaign.pipeline
    runs.require_all_done(runs.grant(pipeline, campaign.run, campaign.run.entries))
    eligible = (len(USERS) - 1) * ITEMS_PER_USER
    clean = reconciliation.reconcile(pipeline)
    verdict = assert_is_the_shared_verdict(clean.outcome, RECONCILED)
    assert (clean.verdict, clean.explanation) == (verdict.status, verdict.explanation)
    assert checkpoints(verdict) == {
        "snapshot users x items": len(USERS) * ITEMS_PER_USER,
        "expected": eligible,
        "matched": eligible,
        "ledger": eligible,
    }
    assert verdict.bridge.steps[0] == Step("excluded users x items", -ITEMS_PER_USER)
    assert verdict.breaks == {"missing": 0, "unexpected": 0, "terms_mismatch": 0, "duplicate": 0}
    document = clean.as_dict()
    assert list(document)[7:11] == ["duration_s", "verdict", "explanation", "bridge"], "the document's order stays"
    assert list(document)[-1] == "outcome" and document["outcome"]["status"] == document["verdict"]

    tamper = tamper_for(campaign)
    tamper.delete(USERS[0], "coupon-2000")
    tamper.set_amount(USERS[1], "coupon-3000", 1)
    tamper.copy_grant(USERS[2], STRANGER, "coupon-2000")
    broken = reconciliation.reconcile(pipeline)
    verdict = assert_is_the_shared_verdict(broken.outcome, BREAKS)
    assert verdict.breaks == {"missing": 1, "unexpected": 1, "terms_mismatch": 1, "duplicate": 0}
    assert verdict.open_breaks == broken.open_breaks == 3
    assert checkpoints(verdict) == {
        "snapshot users x items": len(USERS) * ITEMS_PER_USER,
        "expected": eligible,
        "matched": eligible - 2,
        "ledger": eligible,  # one deleted, one unexpected
    }
    steps = {s.label: s.value for s in verdict.bridge.steps if not s.checkpoint}
    assert (steps["missing"], steps["unexpected"], steps["terms_mismatch: other terms"]) == (-1, 1, 1)
    assert verdict.bridge.adds_up()


def test_a_campaign_not_granted_yet_is_incomplete_with_the_reason(campaign: Prepared) -> None:
    runs.grant(campaign.pipeline, campaign.run, campaign.run.entries[:6])
    result = reconciliation.reconcile(campaign.pipeline)
    verdict = assert_is_the_shared_verdict(result.outcome, INCOMPLETE)
    assert verdict.incomplete == (result.explanation,)
    assert "2 partition(s) not granted yet ([6, 7]" in result.explanation
    assert verdict.open_breaks == 0, "work to do is not a break"
    assert verdict.bridge.adds_up(), "the missing grants are bridged; the reason is the ungranted partitions"


# --------------------------------------------------------------------------- an issuer's export

MIRROR: dict[str, Any] = {"export": [], "down": False}  # what MirrorIssuer exports; set by the tests


class MirrorIssuer:
    """A python issuer that exports MIRROR["export"], or is down."""

    def deliver(self, batch: Any) -> list[Answer]:
        return [Answer(g.grant_id, "created") for g in batch]

    def export(self, campaign_id: str) -> Iterator[dict[str, Any]]:
        if MIRROR["down"]:
            raise IssuerUnavailable("the shop is down")
        return iter(MIRROR["export"])

    def close(self) -> None:
        pass


def make_mirror(spec: IssuerSpec) -> MirrorIssuer:
    """``factory = "test_verdict:make_mirror"``."""
    return MirrorIssuer()


@pytest.fixture
def shop(
    tmp_path: Path, backend_url: str | None, write_users: Callable[..., Path], open_pipeline: Callable[..., Any]
) -> Iterator[runs.Pipeline]:
    """The delivery tests' campaign (coupons delivered by issuer "shop", here a MirrorIssuer), granted."""
    text = write_campaign(tmp_path / "c.toml").read_text(encoding="utf-8")
    text = text.replace(
        'kind = "http"\nurl = "http://127.0.0.1:9"', 'kind = "python"\nfactory = "test_verdict:make_mirror"'
    )
    campaign_file = tmp_path / "mirror.toml"
    campaign_file.write_text(text, encoding="utf-8")
    settings: Settings = delivery_settings(tmp_path, backend_url, campaign_file, "http://127.0.0.1:9")
    pipeline = open_pipeline(settings)
    prepared = prepare_pipeline(pipeline, write_users(tmp_path / "users.parquet", USERS[:200]))
    runs.require_all_done(runs.grant(pipeline, prepared.run, prepared.run.entries))
    with pipeline.engine.connect() as connection:
        held = connection.execute(
            sa.text(
                "SELECT g.user_id, i.item_sku, g.issue_no FROM grants AS g JOIN campaign_items AS i "
                "ON i.campaign_key = g.campaign_key AND i.item_key = g.item_key WHERE i.item_sku LIKE 'coupon-%'"
            )
        ).all()
    MIRROR["export"] = [
        {"grant_id": f"{CAMPAIGN}:{u}:{sku}:{n}", "user_id": int(u), "item_sku": str(sku), "issue_no": int(n)}
        for u, sku, n in held
    ]
    MIRROR["down"] = False
    yield pipeline
    MIRROR["export"], MIRROR["down"] = [], False


def test_an_issuers_check_carries_the_shared_verdict_clean_broken_and_unreadable(shop: runs.Pipeline) -> None:
    spec = shop.campaign.issuers[0]
    coupons = 200 * 2
    clean = three_way.check_issuer(shop, spec, 4)
    verdict = assert_is_the_shared_verdict(clean.outcome, RECONCILED)
    assert checkpoints(verdict) == {
        "live in the ledger, items issuer 'shop' delivers": coupons,
        "matched": coupons,
        "held by issuer 'shop'": coupons,
    }
    assert verdict.explanation == f"issuer 'shop' holds exactly the {coupons:,} live grants it delivers"
    whole = reconciliation.reconcile(shop)
    assert_is_the_shared_verdict(whole.outcome, RECONCILED)
    assert whole.issuers[0]["outcome"] == verdict.as_dict(), "the campaign's result carries each issuer's verdict"

    lost = MIRROR["export"].pop()
    MIRROR["export"].append({**lost, "grant_id": "foreign-1"})
    broken = three_way.check_issuer(shop, spec, 4)
    verdict = assert_is_the_shared_verdict(broken.outcome, BREAKS)
    assert verdict.breaks == {"issuer_missing": 1, "issuer_unexpected": 1}
    assert verdict.bridge.text() == (
        f"live in the ledger, items issuer 'shop' delivers {coupons} - issuer_missing 1 = matched {coupons - 1} "
        f"+ issuer_unexpected 1 = held by issuer 'shop' {coupons} (grants)"
    )
    whole = reconciliation.reconcile(shop)
    verdict = assert_is_the_shared_verdict(whole.outcome, BREAKS)
    assert verdict.breaks == {
        "missing": 0,
        "unexpected": 0,
        "terms_mismatch": 0,
        "duplicate": 0,
        "issuer_missing": 1,
        "issuer_unexpected": 1,
    }

    MIRROR["down"] = True
    unreadable = three_way.check_issuer(shop, spec, 4)
    verdict = assert_is_the_shared_verdict(unreadable.outcome, INCOMPLETE)
    [reason] = verdict.incomplete
    assert "the shop is down" in reason and f"its {coupons} live ledger grants could not be compared" in reason
    assert verdict.bridge.adds_up(), "what was not compared is a step of the bridge"
    whole = reconciliation.reconcile(shop)
    assert_is_the_shared_verdict(whole.outcome, INCOMPLETE)
    assert reason in whole.outcome.incomplete and whole.explanation.startswith(reason)


# --------------------------------------------------------------------------- merchant cash


def test_merchant_cash_carries_the_shared_verdict_clean_and_broken(
    tmp_path: Path,
    open_merchant_program: Callable[..., claims.OpenProgram],  # noqa: F811 - the fixture of test_merchant_cash
) -> None:
    op = open_merchant_program()
    claims.ingest_file(op, write_claims(tmp_path / "claims.csv", [claim(f"c{m}", m, 1000) for m in (1, 2, 3)]))
    unpaid = merchant_reconciliation.reconcile(op)
    verdict = assert_is_the_shared_verdict(unpaid.outcome, BREAKS)
    assert verdict.breaks == {"unpaid": 3, "wrong_amount": 0, "unexpected": 0, "duplicate": 0, "case_state": 0}
    assert verdict.bridge.unit == "KRW"
    assert verdict.bridge.text() == (
        f"due: claims, tiers and decisions {3 * TIER_1_KRW:,} - unpaid {3 * TIER_1_KRW:,} + voided on purpose "
        "(due) 0 + wrong_amount: paid minus due 0 + unexpected 0 + duplicate 0 = paid: live payouts 0 (KRW)"
    )

    claims.pay(op)
    paid = merchant_reconciliation.reconcile(op)
    verdict = assert_is_the_shared_verdict(paid.outcome, RECONCILED)
    assert (paid.verdict, paid.explanation) == (verdict.status, verdict.explanation)
    assert checkpoints(verdict) == {
        "due: claims, tiers and decisions": 3 * TIER_1_KRW,
        "paid: live payouts": 3 * TIER_1_KRW,
    }
    assert paid.as_dict()["outcome"] == verdict.as_dict()

    with op.engine.begin() as connection:  # a second payout to merchant 2, behind the program's back
        if op.engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL session_replication_role = replica")  # triggers off
        connection.execute(
            sa.text(
                "INSERT INTO grants (campaign_key, user_bucket, user_id, item_key, issue_no, partition_id, "
                "run_key, amount_krw, valid_from, valid_until, granted_at) SELECT campaign_key, user_bucket, "
                "user_id, item_key, 1, partition_id, run_key, amount_krw + 7, valid_from, valid_until, granted_at "
                "FROM grants WHERE campaign_key = :c AND user_bucket = :b AND user_id = 2"
            ),
            {"c": op.campaign_key, "b": user_bucket(2)},
        )
    duplicate = merchant_reconciliation.reconcile(op)
    verdict = assert_is_the_shared_verdict(duplicate.outcome, BREAKS)
    assert verdict.breaks["duplicate"] == 1 and verdict.open_breaks == len(duplicate.breaks)
    steps = {s.label: s.value for s in verdict.bridge.steps}
    assert steps["duplicate"] == TIER_1_KRW + 7 and verdict.bridge.adds_up()
    with op.engine.connect() as connection:
        stored = connection.execute(
            sa.select(ledger.program_recon_runs.c.result_json).order_by(
                ledger.program_recon_runs.c.program_recon_key.desc()
            )
        ).first()
    assert stored is not None and json.loads(stored[0])["outcome"]["status"] == BREAKS


# --------------------------------------------------------------------------- the pass program


def test_the_pass_program_carries_the_shared_verdict_clean_and_broken(
    tmp_path: Path,
    backend_url: str | None,
    open_pass_program: Callable[..., Any],  # noqa: F811 - the fixture of test_pass
) -> None:
    context = open_pass_program(backend_url or f"sqlite:///{tmp_path / 'var' / 'ledger.sqlite'}", cap=3)
    intake.ingest(context, write_applications(tmp_path / "a.parquet", synthetic(5, seed=3)))
    pass_allocation.allocate(context)
    clean = pass_reconciliation.reconcile(context)
    assert isinstance(clean, pass_reconciliation.PassReconciliation)
    verdict = assert_is_the_shared_verdict(clean.outcome, RECONCILED)
    assert verdict.bridge.text() == (
        "applications at or before the watermark 5 + window_mismatch: counted by the allocations minus applied 0 "
        "- sold_out 2 = granted by the allocations 3 + allocations_mismatch: in the ledger minus granted 0 "
        "= passes in the ledger 3 (applications (one pass each))"
    )
    assert set(verdict.breaks) == {c.name for c in clean.checks} and verdict.open_breaks == 0
    document = clean.as_dict()
    assert list(document)[:2] == ["program_id", "verdict"] and list(document)[-3:] == [
        "breaks",
        "explanation",
        "outcome",
    ]

    with context.engine.begin() as connection:
        connection.execute(sa.text("UPDATE pass_programs SET granted = granted - 1"))
    broken = pass_reconciliation.reconcile(context)
    verdict = assert_is_the_shared_verdict(broken.outcome, BREAKS)
    assert {name: n for name, n in verdict.breaks.items() if n} == {"counter_mismatch": 1}
    assert broken.as_dict()["breaks"] == ["counter_mismatch"]
    assert broken.explanation.startswith("1 check(s) found breaks: counter_mismatch (1:")
