-- Voids (compensating entries) per actor and item: how many, how much face value, first and last.
-- Params: campaign_id: text (optional), actor: text (optional)
SELECT campaign_id, actor, item_sku, count(*) AS voids, coalesce(sum(amount_krw), 0) AS face_value_krw,
       min(entry_at) AS first_void_at, max(entry_at) AS last_void_at
FROM grant_history
WHERE entry_type = 'void'
  AND (CAST(:campaign_id AS TEXT) IS NULL OR campaign_id = :campaign_id)
  AND (CAST(:actor AS TEXT) IS NULL OR actor = :actor)
GROUP BY campaign_id, actor, item_sku
ORDER BY campaign_id, actor, item_sku
