-- Open and resolved breaks per campaign and class, with the age of the oldest open one.
-- Params: campaign_id: text (optional)
SELECT campaign_id, break_class,
       sum(CASE WHEN status = 'open' THEN 1 ELSE 0 END) AS open_breaks,
       sum(CASE WHEN status = 'resolved' THEN 1 ELSE 0 END) AS resolved_breaks,
       min(CASE WHEN status = 'open' THEN first_seen_at END) AS oldest_open_since
FROM reconciliation_breaks
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR campaign_id = :campaign_id)
GROUP BY campaign_id, break_class
ORDER BY campaign_id, break_class
