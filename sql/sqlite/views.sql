-- Views and append-only triggers of the SQLite ledger. Applied by the ledger on
-- start-up (idempotent). Each statement ends with a line "-- end".
-- Instants are stored as UTC epoch microseconds; the views show ISO-8601 UTC text.

DROP VIEW IF EXISTS grant_ledger
-- end
CREATE VIEW grant_ledger AS
SELECT
    c.campaign_id,
    g.user_id,
    i.item_sku,
    i.item_kind,
    g.amount_krw,
    strftime('%Y-%m-%dT%H:%M:%SZ', g.valid_from / 1000000, 'unixepoch') AS valid_from,
    CASE WHEN g.valid_until IS NULL THEN NULL
         ELSE strftime('%Y-%m-%dT%H:%M:%SZ', g.valid_until / 1000000, 'unixepoch') END AS valid_until,
    strftime('%Y-%m-%dT%H:%M:%fZ', g.granted_at / 1000000.0, 'unixepoch') AS granted_at,
    r.run_id,
    g.partition_id,
    g.user_bucket
-- CROSS JOIN fixes the loop order (SQLite's documented planner control): campaigns, a handful of
-- rows, drive the grants key (campaign_key, user_bucket, user_id, item_key), so a filter on
-- user_bucket and user_id is an index seek instead of a scan.
FROM campaigns AS c
CROSS JOIN grants AS g ON g.campaign_key = c.campaign_key
JOIN campaign_items AS i ON i.item_key = g.item_key
JOIN runs AS r ON r.run_key = g.run_key
WHERE NOT EXISTS (
    SELECT 1 FROM grant_voids AS v
    WHERE v.campaign_key = g.campaign_key AND v.user_bucket = g.user_bucket
      AND v.user_id = g.user_id AND v.item_key = g.item_key
)
-- end
DROP VIEW IF EXISTS partition_status
-- end
CREATE VIEW partition_status AS
SELECT
    c.campaign_id,
    a.snapshot_id,
    a.partition_count,
    a.partition_id,
    a.status,
    a.planned,
    a.written,
    a.already_present,
    a.duration_s,
    a.error,
    r.run_id,
    strftime('%Y-%m-%dT%H:%M:%fZ', a.started_at / 1000000.0, 'unixepoch') AS started_at,
    CASE WHEN a.finished_at IS NULL THEN NULL
         ELSE strftime('%Y-%m-%dT%H:%M:%fZ', a.finished_at / 1000000.0, 'unixepoch') END AS finished_at
FROM partition_attempts AS a
JOIN campaigns AS c ON c.campaign_key = a.campaign_key
JOIN runs AS r ON r.run_key = a.run_key
WHERE a.attempt_key = (
    SELECT max(b.attempt_key) FROM partition_attempts AS b
    WHERE b.campaign_key = a.campaign_key AND b.snapshot_id = a.snapshot_id AND b.partition_id = a.partition_id
)
-- end
CREATE TRIGGER IF NOT EXISTS grants_append_only_update BEFORE UPDATE ON grants
BEGIN
    SELECT RAISE(ABORT, 'the grant ledger is append-only: write a void (entitle void) instead of updating a grant');
END
-- end
CREATE TRIGGER IF NOT EXISTS grants_append_only_delete BEFORE DELETE ON grants
BEGIN
    SELECT RAISE(ABORT, 'the grant ledger is append-only: write a void (entitle void) instead of deleting a grant');
END
-- end
CREATE TRIGGER IF NOT EXISTS grant_voids_append_only_update BEFORE UPDATE ON grant_voids
BEGIN
    SELECT RAISE(ABORT, 'voids are append-only history and cannot be updated');
END
-- end
CREATE TRIGGER IF NOT EXISTS grant_voids_append_only_delete BEFORE DELETE ON grant_voids
BEGIN
    SELECT RAISE(ABORT, 'voids are append-only history and cannot be deleted');
END
-- end
