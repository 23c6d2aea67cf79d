-- Reconciliations of the pass and merchant cash programs, newest first: verdict, explanation and number
-- of breaks (the whole result document is in program_recon_runs.result_json).
-- Params: campaign_id: text (optional), limit: integer (optional, default 100)
SELECT
    c.campaign_id,
    r.program,
    r.verdict,
    r.breaks,
    r.explanation,
    strftime('%Y-%m-%dT%H:%M:%fZ', r.finished_at / 1000000.0, 'unixepoch') AS finished_at
FROM program_recon_runs AS r
JOIN campaigns AS c ON c.campaign_key = r.campaign_key
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR c.campaign_id = :campaign_id)
ORDER BY r.program_recon_key DESC
LIMIT coalesce(CAST(:limit AS INTEGER), 100)
