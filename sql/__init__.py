"""The ledger's SQL (schema, views, roles, analyst queries), shipped in the wheel as ``pipeline.sql``."""
