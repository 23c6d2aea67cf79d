-- Grants written per Seoul calendar day (Asia/Seoul is UTC+9 all year) and item.
-- Params: campaign_id: text (optional)
SELECT
    c.campaign_id,
    date(g.granted_at / 1000000, 'unixepoch', '+9 hours') AS day_kst,
    i.item_sku,
    count(*) AS grants
FROM grants AS g
JOIN campaigns AS c ON c.campaign_key = g.campaign_key
JOIN campaign_items AS i ON i.item_key = g.item_key
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR c.campaign_id = :campaign_id)
GROUP BY c.campaign_id, day_kst, i.item_sku
ORDER BY c.campaign_id, day_kst, i.item_sku
