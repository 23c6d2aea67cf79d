-- The latest attempt of every partition of every snapshot: status, counts, duration, worker and error.
-- Params: campaign_id: text (optional), status: text (optional: running | done | failed)
SELECT campaign_id, snapshot_id, partition_id, status, planned, written, already_present,
       duration_s, run_id, worker, started_at, finished_at, error
FROM partition_status
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR campaign_id = :campaign_id)
  AND (CAST(:status AS TEXT) IS NULL OR status = :status)
ORDER BY campaign_id, snapshot_id, partition_id
