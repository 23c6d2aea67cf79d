-- Views, their helper tables and the append-only triggers of the SQLite ledger. Applied by the
-- ledger on start-up (idempotent). Each statement ends with a line "-- end".
--
-- Instants are stored as UTC epoch microseconds; the views show ISO-8601 text. Every view is
-- standard SQL that SQLite and DuckDB's SQLite scanner both plan, so outside tools read typed
-- columns: the ISO_UTC, ISO_UTC_MS and ISO_LOCAL macros below are expanded by the ledger into
-- portable arithmetic (pipeline/ledger/instants_sql.py), and joins are written JOIN … ON or
-- CROSS JOIN with the condition in WHERE.

-- Day number since 1970-01-01 -> 'YYYY-MM-DD' (1970 to 2199), read by the ISO_* expressions.
CREATE TABLE IF NOT EXISTS calendar_days (
    day_number INTEGER NOT NULL PRIMARY KEY,
    iso_date TEXT NOT NULL
) WITHOUT ROWID
-- end
INSERT INTO calendar_days (day_number, iso_date)
WITH RECURSIVE days(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM days WHERE n < 84005)
SELECT n, date(n * 86400, 'unixepoch') FROM days
WHERE NOT EXISTS (SELECT 1 FROM calendar_days)
-- end
-- Each campaign time zone's UTC offset over [from_us, until_us), from the IANA database; written
-- by the ledger when a campaign is registered (pipeline/ledger/zones.py).
CREATE TABLE IF NOT EXISTS time_zone_offsets (
    time_zone TEXT NOT NULL,
    from_us INTEGER NOT NULL,
    until_us INTEGER NOT NULL,
    utc_offset_s INTEGER NOT NULL,
    PRIMARY KEY (time_zone, from_us)
) WITHOUT ROWID
-- end
DROP VIEW IF EXISTS grant_ledger
-- end
-- Every live grant. grant_id is the id its issuer receives; amount_krw is 0 for items without a
-- cash value (emoticons); valid_until is exclusive (the grant is valid before that instant) and
-- NULL for permanent items; the *_local columns are the same instants in the campaign's time_zone.
CREATE VIEW grant_ledger AS
SELECT
    c.campaign_id,
    g.user_id,
    i.item_sku,
    i.item_kind,
    coalesce(g.amount_krw, 0) AS amount_krw,
    ISO_UTC(g.valid_from) AS valid_from,
    ISO_UTC(g.valid_until) AS valid_until,
    ISO_UTC_MS(g.granted_at) AS granted_at,
    r.run_id,
    g.partition_id,
    g.user_bucket,
    g.issue_no,
    c.campaign_id || ':' || CAST(g.user_id AS TEXT) || ':' || i.item_sku || ':' || CAST(g.issue_no AS TEXT)
        AS grant_id,
    c.time_zone,
    ISO_LOCAL(g.valid_from, zf.utc_offset_s) AS valid_from_local,
    ISO_LOCAL(g.valid_until, zu.utc_offset_s) AS valid_until_local
-- CROSS JOIN fixes the loop order (SQLite's documented planner control): campaigns, a handful of
-- rows, drive the grants key (campaign_key, user_bucket, user_id, item_key), so a filter on
-- user_bucket and user_id is an index seek instead of a scan.
FROM campaigns AS c
CROSS JOIN grants AS g
JOIN campaign_items AS i ON i.item_key = g.item_key
JOIN runs AS r ON r.run_key = g.run_key
LEFT JOIN time_zone_offsets AS zf
    ON zf.time_zone = c.time_zone AND zf.from_us <= g.valid_from AND g.valid_from < zf.until_us
LEFT JOIN time_zone_offsets AS zu
    ON zu.time_zone = c.time_zone AND zu.from_us <= g.valid_until AND g.valid_until < zu.until_us
WHERE g.campaign_key = c.campaign_key
  AND NOT EXISTS (
    SELECT 1 FROM grant_voids AS v
    WHERE v.campaign_key = g.campaign_key AND v.user_bucket = g.user_bucket
      AND v.user_id = g.user_id AND v.item_key = g.item_key AND v.issue_no = g.issue_no
)
-- end
DROP VIEW IF EXISTS grant_history
-- end
-- Every ledger entry: each grant (live or voided) and each void, with who, when and why.
CREATE VIEW grant_history AS
SELECT
    c.campaign_id,
    g.user_id,
    i.item_sku,
    g.issue_no,
    'grant' AS entry_type,
    coalesce(g.amount_krw, 0) AS amount_krw,
    ISO_UTC(g.valid_from) AS valid_from,
    ISO_UTC(g.valid_until) AS valid_until,
    ISO_UTC_MS(g.granted_at) AS entry_at,
    r.run_id,
    CAST(NULL AS TEXT) AS actor,
    CAST(NULL AS TEXT) AS reason,
    g.user_bucket
FROM campaigns AS c
CROSS JOIN grants AS g
JOIN campaign_items AS i ON i.item_key = g.item_key
JOIN runs AS r ON r.run_key = g.run_key
WHERE g.campaign_key = c.campaign_key
UNION ALL
SELECT
    c.campaign_id,
    v.user_id,
    i.item_sku,
    v.issue_no,
    'void' AS entry_type,
    coalesce(g.amount_krw, 0) AS amount_krw,
    ISO_UTC(g.valid_from) AS valid_from,
    ISO_UTC(g.valid_until) AS valid_until,
    ISO_UTC_MS(v.voided_at) AS entry_at,
    CAST(NULL AS TEXT) AS run_id,
    v.actor,
    v.reason,
    v.user_bucket
FROM campaigns AS c
CROSS JOIN grant_voids AS v
JOIN campaign_items AS i ON i.item_key = v.item_key
JOIN grants AS g ON g.campaign_key = v.campaign_key AND g.user_bucket = v.user_bucket
    AND g.user_id = v.user_id AND g.item_key = v.item_key AND g.issue_no = v.issue_no
WHERE v.campaign_key = c.campaign_key
-- end
DROP VIEW IF EXISTS reconciliation_runs
-- end
-- Every reconciliation: verdict, the bridge (expected = matched + terms_mismatch + missing + voided;
-- ledger_live = matched + terms_mismatch + unexpected + duplicate), where its exports are, and for
-- campaigns with issuers the grants in the ledger but not at their issuer and the reverse.
CREATE VIEW reconciliation_runs AS
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
    ISO_UTC_MS(r.started_at) AS started_at,
    ISO_UTC_MS(r.finished_at) AS finished_at,
    r.reconciliation_key,
    r.issuer_missing,
    r.issuer_unexpected
FROM recon_runs AS r
JOIN campaigns AS c ON c.campaign_key = r.campaign_key
-- end
DROP VIEW IF EXISTS reconciliation_breaks
-- end
-- Every break ever found, open or resolved; a break keeps its id across reconciliations.
CREATE VIEW reconciliation_breaks AS
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
    ISO_UTC(b.expected_valid_from) AS expected_valid_from,
    ISO_UTC(b.expected_valid_until) AS expected_valid_until,
    b.ledger_amount_krw,
    ISO_UTC(b.ledger_valid_from) AS ledger_valid_from,
    ISO_UTC(b.ledger_valid_until) AS ledger_valid_until,
    b.detail,
    f.reconciliation_id AS first_seen_in,
    ISO_UTC_MS(f.started_at) AS first_seen_at,
    l.reconciliation_id AS last_seen_in,
    z.reconciliation_id AS resolved_in,
    ISO_UTC_MS(z.finished_at) AS resolved_at,
    b.user_bucket,
    b.issuer
FROM recon_breaks AS b
JOIN campaigns AS c ON c.campaign_key = b.campaign_key
JOIN recon_runs AS f ON f.reconciliation_key = b.first_seen_key
JOIN recon_runs AS l ON l.reconciliation_key = b.last_seen_key
LEFT JOIN recon_runs AS z ON z.reconciliation_key = b.resolved_key
-- end
DROP VIEW IF EXISTS campaign_coverage
-- end
-- Per campaign and item, as of the campaign's latest reconciliation: expected grants (eligible users),
-- live grants, and how they differ. Counted from the data by `entitle reconcile`, not from run records.
CREATE VIEW campaign_coverage AS
SELECT
    c.campaign_id,
    r.reconciliation_id,
    r.snapshot_id,
    r.verdict,
    ISO_UTC_MS(r.finished_at) AS as_of,
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
    ISO_UTC_MS(a.started_at) AS started_at,
    ISO_UTC_MS(a.finished_at) AS finished_at,
    a.worker
FROM partition_attempts AS a
JOIN campaigns AS c ON c.campaign_key = a.campaign_key
JOIN runs AS r ON r.run_key = a.run_key
WHERE a.attempt_key = (
    SELECT max(b.attempt_key) FROM partition_attempts AS b
    WHERE b.campaign_key = a.campaign_key AND b.snapshot_id = a.snapshot_id AND b.partition_id = a.partition_id
)
-- end
-- No insert trigger on grants: any row trigger there costs SQLite ~40 % of bulk grant throughput
-- (measured). The reissue rule (issue n only after issue n-1 is voided) is kept by `entitle repair`
-- inside its write transaction, and every reconciliation reports a second live issue as a duplicate.
-- PostgreSQL enforces it with a trigger as well (sql/postgresql/views.sql).
DROP TRIGGER IF EXISTS grants_reissue_guard
-- end
DROP TRIGGER IF EXISTS grant_voids_need_grant
-- end
CREATE TRIGGER grant_voids_need_grant BEFORE INSERT ON grant_voids
BEGIN
    SELECT RAISE(ABORT, 'a void must name an existing grant (campaign, user, item, issue)')
    WHERE NOT EXISTS (
        SELECT 1 FROM grants AS g
        WHERE g.campaign_key = NEW.campaign_key AND g.user_bucket = NEW.user_bucket AND g.user_id = NEW.user_id
          AND g.item_key = NEW.item_key AND g.issue_no = NEW.issue_no
    );
END
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
-- Merchant cash programs: review decisions are append-only (who, when, why stays as written).
CREATE TRIGGER IF NOT EXISTS merchant_decisions_append_only_update BEFORE UPDATE ON merchant_decisions
BEGIN
    SELECT RAISE(ABORT, 'review decisions are append-only audit history and cannot be updated');
END
-- end
CREATE TRIGGER IF NOT EXISTS merchant_decisions_append_only_delete BEFORE DELETE ON merchant_decisions
BEGIN
    SELECT RAISE(ABORT, 'review decisions are append-only audit history and cannot be deleted');
END
-- end
