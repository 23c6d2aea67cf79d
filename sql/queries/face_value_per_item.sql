-- Live grants and face value per item, counted in the ledger now (a full scan: minutes at 240M grants;
-- `coverage` has the same figures as of the latest reconciliation, instantly).
-- Params: campaign_id: text (optional)
SELECT campaign_id, item_sku, item_kind, count(*) AS live_grants, coalesce(sum(amount_krw), 0) AS face_value_krw
FROM grant_ledger
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR campaign_id = :campaign_id)
GROUP BY campaign_id, item_sku, item_kind
ORDER BY campaign_id, item_sku
