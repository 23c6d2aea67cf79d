-- Coverage per item: live grants (voids excluded), distinct users and face value, per campaign.
-- Params: campaign_id (optional; all campaigns when omitted)
SELECT
    campaign_id,
    item_sku,
    item_kind,
    count(*) AS live_grants,
    count(DISTINCT user_id) AS users,
    coalesce(sum(amount_krw), 0) AS face_value_krw
FROM grant_ledger
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR campaign_id = :campaign_id)
GROUP BY campaign_id, item_sku, item_kind
ORDER BY campaign_id, item_sku
