"""Reconciliation test helpers: tampering with the ledger behind the pipeline's back."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.grants.partitioning import user_bucket
from support.ledger_state import Prepared

USERS = list(range(30_000_000, 30_002_000, 2))  # 1,000 users

STRANGER = 99_999_999_001  # never in the snapshot


class Tamper:
    """Direct writes to the ledger that bypass the append-only triggers."""

    def __init__(self, engine: Engine, campaign_key: int, item_keys: dict[str, int]) -> None:
        self.engine = engine
        self.campaign_key = campaign_key
        self.item_keys = item_keys

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def _begin(self, connection: sa.Connection) -> None:
        if self.postgres:
            connection.exec_driver_sql("SET LOCAL session_replication_role = replica")  # triggers off
        else:
            connection.exec_driver_sql("DROP TRIGGER IF EXISTS grants_append_only_update")
            connection.exec_driver_sql("DROP TRIGGER IF EXISTS grants_append_only_delete")

    def _key(self, user_id: int, sku: str) -> dict[str, int]:
        return {
            "ck": self.campaign_key,
            "b": user_bucket(user_id),
            "u": user_id,
            "i": self.item_keys[sku],
        }

    def delete(self, user_id: int, sku: str) -> None:
        with self.engine.begin() as connection:
            self._begin(connection)
            result = connection.execute(
                sa.text(
                    "DELETE FROM grants WHERE campaign_key = :ck AND user_bucket = :b AND user_id = :u "
                    "AND item_key = :i"
                ),
                self._key(user_id, sku),
            )
            assert result.rowcount == 1

    def set_amount(self, user_id: int, sku: str, amount_krw: int) -> None:
        with self.engine.begin() as connection:
            self._begin(connection)
            result = connection.execute(
                sa.text(
                    "UPDATE grants SET amount_krw = :a WHERE campaign_key = :ck AND user_bucket = :b "
                    "AND user_id = :u AND item_key = :i"
                ),
                {**self._key(user_id, sku), "a": amount_krw},
            )
            assert result.rowcount == 1

    def shift_valid_until(self, user_id: int, sku: str, days: int) -> None:
        shift = f"valid_until + INTERVAL '{days} days'" if self.postgres else f"valid_until + {days * 86_400_000_000}"
        with self.engine.begin() as connection:
            self._begin(connection)
            result = connection.execute(
                sa.text(
                    f"UPDATE grants SET valid_until = {shift} WHERE campaign_key = :ck AND user_bucket = :b "
                    "AND user_id = :u AND item_key = :i"
                ),
                self._key(user_id, sku),
            )
            assert result.rowcount == 1

    def copy_grant(self, from_user: int, to_user: int, sku: str, bucket: int | None = None) -> None:
        """Insert a grant for ``to_user`` with the terms of ``from_user``'s (optionally under a forged bucket)."""
        with self.engine.begin() as connection:
            self._begin(connection)
            if bucket is not None:
                connection.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
            connection.execute(
                sa.text(
                    "INSERT INTO grants (campaign_key, user_bucket, user_id, item_key, issue_no, partition_id, "
                    "run_key, amount_krw, valid_from, valid_until, granted_at) "
                    "SELECT campaign_key, :nb, :nu, item_key, 0, partition_id, run_key, amount_krw, valid_from, "
                    "valid_until, granted_at FROM grants WHERE campaign_key = :ck AND user_bucket = :b "
                    "AND user_id = :u AND item_key = :i"
                ),
                {**self._key(from_user, sku), "nb": user_bucket(to_user) if bucket is None else bucket, "nu": to_user},
            )
            if bucket is not None:
                connection.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")


def tamper_for(prepared: Prepared) -> Tamper:
    return Tamper(prepared.engine, prepared.pipeline.keys.campaign_key, prepared.pipeline.keys.item_keys)
