-- Views and append-only triggers of the PostgreSQL ledger. Applied by the ledger
-- on start-up (idempotent). Each statement ends with a line "-- end".

CREATE OR REPLACE VIEW grant_ledger AS
SELECT
    c.campaign_id,
    g.user_id,
    i.item_sku,
    i.item_kind,
    g.amount_krw,
    g.valid_from,
    g.valid_until,
    g.granted_at,
    r.run_id,
    g.partition_id,
    g.user_bucket
FROM grants AS g
JOIN campaigns AS c ON c.campaign_key = g.campaign_key
JOIN campaign_items AS i ON i.item_key = g.item_key
JOIN runs AS r ON r.run_key = g.run_key
WHERE NOT EXISTS (
    SELECT 1 FROM grant_voids AS v
    WHERE v.campaign_key = g.campaign_key AND v.user_bucket = g.user_bucket
      AND v.user_id = g.user_id AND v.item_key = g.item_key
)
-- end
CREATE OR REPLACE VIEW partition_status AS
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
    a.started_at,
    a.finished_at
FROM partition_attempts AS a
JOIN campaigns AS c ON c.campaign_key = a.campaign_key
JOIN runs AS r ON r.run_key = a.run_key
WHERE a.attempt_key = (
    SELECT max(b.attempt_key) FROM partition_attempts AS b
    WHERE b.campaign_key = a.campaign_key AND b.snapshot_id = a.snapshot_id AND b.partition_id = a.partition_id
)
-- end
CREATE OR REPLACE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the grant ledger is append-only (% on %): write a void (entitle void) instead', TG_OP, TG_TABLE_NAME;
END
$$
-- end
CREATE OR REPLACE TRIGGER grants_append_only BEFORE UPDATE OR DELETE ON grants
FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()
-- end
CREATE OR REPLACE TRIGGER grant_voids_append_only BEFORE UPDATE OR DELETE ON grant_voids
FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()
-- end
