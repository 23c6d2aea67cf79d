-- Views and append-only triggers of the PostgreSQL ledger. Applied by the ledger
-- on start-up (idempotent). Each statement ends with a line "-- end".

-- grants is partitioned on (campaign_key, user_bucket): each pipeline partition's first grant
-- attaches a child table for its range (pipeline/pgcopy.py). Grants outside every child
-- (repairs of ranges granted row by row, hand-made rows, ledgers upgraded from version 2)
-- land in this default child.
CREATE TABLE IF NOT EXISTS grants_default PARTITION OF grants DEFAULT
-- end
-- Every live grant. grant_id is the id its issuer receives; amount_krw is 0 for items without a
-- cash value (emoticons); valid_until is exclusive (the grant is valid before that instant) and
-- NULL for permanent items; the *_local columns are the same instants in the campaign's time_zone.
CREATE OR REPLACE VIEW grant_ledger AS
SELECT
    c.campaign_id,
    g.user_id,
    i.item_sku,
    i.item_kind,
    coalesce(g.amount_krw, 0) AS amount_krw,
    g.valid_from,
    g.valid_until,
    g.granted_at,
    r.run_id,
    g.partition_id,
    g.user_bucket,
    g.issue_no,
    c.campaign_id || ':' || g.user_id::text || ':' || i.item_sku || ':' || g.issue_no::text AS grant_id,
    CAST(c.time_zone AS TEXT) AS time_zone,
    g.valid_from AT TIME ZONE c.time_zone AS valid_from_local,
    g.valid_until AT TIME ZONE c.time_zone AS valid_until_local
FROM grants AS g
JOIN campaigns AS c ON c.campaign_key = g.campaign_key
JOIN campaign_items AS i ON i.item_key = g.item_key
JOIN runs AS r ON r.run_key = g.run_key
WHERE NOT EXISTS (
    SELECT 1 FROM grant_voids AS v
    WHERE v.campaign_key = g.campaign_key AND v.user_bucket = g.user_bucket
      AND v.user_id = g.user_id AND v.item_key = g.item_key AND v.issue_no = g.issue_no
)
-- end
-- Every ledger entry: each grant (live or voided) and each void, with who, when and why.
CREATE OR REPLACE VIEW grant_history AS
SELECT
    c.campaign_id,
    g.user_id,
    i.item_sku,
    g.issue_no,
    'grant'::text AS entry_type,
    coalesce(g.amount_krw, 0) AS amount_krw,
    g.valid_from,
    g.valid_until,
    g.granted_at AS entry_at,
    r.run_id,
    CAST(NULL AS TEXT) AS actor,
    CAST(NULL AS TEXT) AS reason,
    g.user_bucket
FROM grants AS g
JOIN campaigns AS c ON c.campaign_key = g.campaign_key
JOIN campaign_items AS i ON i.item_key = g.item_key
JOIN runs AS r ON r.run_key = g.run_key
UNION ALL
SELECT
    c.campaign_id,
    v.user_id,
    i.item_sku,
    v.issue_no,
    'void'::text AS entry_type,
    coalesce(g.amount_krw, 0) AS amount_krw,
    g.valid_from,
    g.valid_until,
    v.voided_at AS entry_at,
    CAST(NULL AS TEXT) AS run_id,
    CAST(v.actor AS TEXT) AS actor,
    v.reason,
    v.user_bucket
FROM grant_voids AS v
JOIN campaigns AS c ON c.campaign_key = v.campaign_key
JOIN campaign_items AS i ON i.item_key = v.item_key
JOIN grants AS g ON g.campaign_key = v.campaign_key AND g.user_bucket = v.user_bucket
    AND g.user_id = v.user_id AND g.item_key = v.item_key AND g.issue_no = v.issue_no
-- end
-- Every reconciliation: verdict, the bridge (expected = matched + terms_mismatch + missing + voided;
-- ledger_live = matched + terms_mismatch + unexpected + duplicate), where its exports are, and for
-- campaigns with issuers the grants in the ledger but not at their issuer and the reverse.
CREATE OR REPLACE VIEW reconciliation_runs AS
SELECT
    r.reconciliation_id,
    c.campaign_id,
    r.snapshot_id,
    r.partition_count,
    r.method,
    r.verdict,
    r.explanation,
    r.expected,
    r.matched,
    r.terms_mismatch,
    r.missing,
    r.voided,
    r.ledger_live,
    r.unexpected,
    r.duplicate,
    r.residual_expected,
    r.residual_ledger,
    r.open_breaks,
    r.export_dir,
    r.started_at,
    r.finished_at,
    r.reconciliation_key,
    r.issuer_missing,
    r.issuer_unexpected
FROM recon_runs AS r
JOIN campaigns AS c ON c.campaign_key = r.campaign_key
-- end
-- Every break ever found, open or resolved; a break keeps its id across reconciliations.
CREATE OR REPLACE VIEW reconciliation_breaks AS
SELECT
    b.break_id,
    c.campaign_id,
    b.break_class,
    b.status,
    b.user_id,
    b.item_sku,
    b.issue_no,
    b.partition_id,
    b.expected_amount_krw,
    b.expected_valid_from,
    b.expected_valid_until,
    b.ledger_amount_krw,
    b.ledger_valid_from,
    b.ledger_valid_until,
    b.detail,
    f.reconciliation_id AS first_seen_in,
    f.started_at AS first_seen_at,
    l.reconciliation_id AS last_seen_in,
    z.reconciliation_id AS resolved_in,
    z.finished_at AS resolved_at,
    b.user_bucket,
    b.issuer
FROM recon_breaks AS b
JOIN campaigns AS c ON c.campaign_key = b.campaign_key
JOIN recon_runs AS f ON f.reconciliation_key = b.first_seen_key
JOIN recon_runs AS l ON l.reconciliation_key = b.last_seen_key
LEFT JOIN recon_runs AS z ON z.reconciliation_key = b.resolved_key
-- end
-- Per campaign and item, as of the campaign's latest reconciliation: expected grants (eligible users),
-- live grants, and how they differ. Counted from the data by `entitle reconcile`, not from run records.
CREATE OR REPLACE VIEW campaign_coverage AS
SELECT
    c.campaign_id,
    r.reconciliation_id,
    r.snapshot_id,
    r.verdict,
    r.finished_at AS as_of,
    it.item_sku,
    ci.item_kind,
    it.expected,
    it.live AS granted,
    it.matched,
    it.missing,
    it.unexpected,
    it.terms_mismatch,
    it.voided,
    it.duplicate,
    it.live * coalesce(ci.amount_krw, 0) AS face_value_krw
FROM recon_runs AS r
JOIN campaigns AS c ON c.campaign_key = r.campaign_key
JOIN recon_items AS it ON it.reconciliation_key = r.reconciliation_key
LEFT JOIN campaign_items AS ci ON ci.item_key = it.item_key
WHERE r.reconciliation_key = (
    SELECT max(x.reconciliation_key) FROM recon_runs AS x WHERE x.campaign_key = r.campaign_key
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
    a.finished_at,
    a.worker
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
CREATE OR REPLACE FUNCTION ledger_reissue_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM grant_voids AS v
        WHERE v.campaign_key = NEW.campaign_key AND v.user_bucket = NEW.user_bucket AND v.user_id = NEW.user_id
          AND v.item_key = NEW.item_key AND v.issue_no = NEW.issue_no - 1
    ) THEN
        RAISE EXCEPTION 'a grant can be reissued (issue_no n > 0) only when issue n-1 exists and is voided';
    END IF;
    RETURN NEW;
END
$$
-- end
CREATE OR REPLACE TRIGGER grants_reissue_guard BEFORE INSERT ON grants
FOR EACH ROW WHEN (NEW.issue_no <> 0) EXECUTE FUNCTION ledger_reissue_guard()
-- end
CREATE OR REPLACE FUNCTION ledger_void_needs_grant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM grants AS g
        WHERE g.campaign_key = NEW.campaign_key AND g.user_bucket = NEW.user_bucket AND g.user_id = NEW.user_id
          AND g.item_key = NEW.item_key AND g.issue_no = NEW.issue_no
    ) THEN
        RAISE EXCEPTION 'a void must name an existing grant (campaign, user, item, issue)';
    END IF;
    RETURN NEW;
END
$$
-- end
CREATE OR REPLACE TRIGGER grant_voids_need_grant BEFORE INSERT ON grant_voids
FOR EACH ROW EXECUTE FUNCTION ledger_void_needs_grant()
-- end
CREATE OR REPLACE TRIGGER grants_append_only BEFORE UPDATE OR DELETE ON grants
FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()
-- end
CREATE OR REPLACE TRIGGER grant_voids_append_only BEFORE UPDATE OR DELETE ON grant_voids
FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()
-- end
-- Merchant cash programs: review decisions are append-only (who, when, why stays as written).
CREATE OR REPLACE FUNCTION merchant_decisions_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'review decisions are append-only audit history (% refused)', TG_OP;
END
$$
-- end
CREATE OR REPLACE TRIGGER merchant_decisions_append_only BEFORE UPDATE OR DELETE ON merchant_decisions
FOR EACH ROW EXECUTE FUNCTION merchant_decisions_refuse_change()
-- end
