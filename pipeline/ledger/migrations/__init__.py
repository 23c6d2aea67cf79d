"""Alembic migrations of the ledger schema (applied by ``entitle db upgrade``; see pipeline.ledger)."""
