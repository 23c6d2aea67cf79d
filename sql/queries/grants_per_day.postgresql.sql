-- Grants written per Seoul calendar day and item (voided ones included: they were written).
-- Read through the grant_history view, which analysts may read (sql/postgresql/roles.sql).
-- Params: campaign_id: text (optional)
SELECT
    h.campaign_id,
    (h.entry_at AT TIME ZONE 'Asia/Seoul')::date AS day_kst,
    h.item_sku,
    count(*) AS grants
FROM grant_history AS h
WHERE h.entry_type = 'grant'
  AND (CAST(:campaign_id AS TEXT) IS NULL OR h.campaign_id = :campaign_id)
GROUP BY h.campaign_id, day_kst, h.item_sku
ORDER BY h.campaign_id, day_kst, h.item_sku
