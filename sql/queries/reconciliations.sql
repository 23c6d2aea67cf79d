-- Reconciliation history: verdict and bridge of each run, newest first.
-- Params: campaign_id: text (optional), limit: integer (optional, default 50)
SELECT reconciliation_id, campaign_id, snapshot_id, verdict, expected, matched, terms_mismatch, missing, voided,
       ledger_live, unexpected, duplicate, residual_expected, residual_ledger, open_breaks, started_at, finished_at,
       explanation
FROM reconciliation_runs
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR campaign_id = :campaign_id)
ORDER BY reconciliation_key DESC
LIMIT coalesce(CAST(:limit AS INTEGER), 50)
