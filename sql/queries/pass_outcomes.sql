-- Pass applications in serving order (applied_at, user_bucket, user_id) with their outcome:
-- granted (the ledger holds the pass), sold_out (served after the stock ran out) or pending
-- (after the allocation watermark); a pass voided later stays granted here (see user_history).
-- applied_at is UTC epoch microseconds on SQLite.
-- Params: campaign_id: text (optional), user_id: integer (optional), limit: integer (optional, default 1000)
SELECT
    c.campaign_id AS program_id,
    a.user_id,
    a.applied_at,
    CASE
        WHEN p.allocated_through IS NULL OR a.applied_at > p.allocated_through THEN 'pending'
        WHEN g.user_id IS NOT NULL THEN 'granted'
        ELSE 'sold_out'
    END AS outcome,
    g.valid_from,
    g.valid_until
FROM pass_applications AS a
JOIN pass_programs AS p ON p.campaign_key = a.campaign_key
JOIN campaigns AS c ON c.campaign_key = a.campaign_key
JOIN campaign_items AS i ON i.item_key = p.item_key
LEFT JOIN grant_history AS g
    ON g.campaign_id = c.campaign_id AND g.user_bucket = a.user_bucket AND g.user_id = a.user_id
   AND g.item_sku = i.item_sku AND g.issue_no = 0 AND g.entry_type = 'grant'
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR c.campaign_id = :campaign_id)
  AND (CAST(:user_id AS BIGINT) IS NULL OR a.user_id = :user_id)
ORDER BY c.campaign_id, a.applied_at, a.user_bucket, a.user_id
LIMIT coalesce(CAST(:limit AS INTEGER), 1000)
