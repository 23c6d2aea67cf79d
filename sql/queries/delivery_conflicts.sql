-- Grants an issuer answered `conflict` for: it holds a different payload under the same grant id.
-- Nothing was overwritten and delivery never sends them again; decide with the issuer's owners.
-- Params: campaign_id: text (optional), limit: integer (optional, default 1000)
SELECT c.campaign_id, a.user_id, i.item_sku, a.issue_no,
       c.campaign_id || ':' || CAST(a.user_id AS TEXT) || ':' || i.item_sku || ':' || CAST(a.issue_no AS TEXT)
           AS grant_id,
       a.detail
FROM delivery_answers AS a
JOIN campaigns AS c ON c.campaign_key = a.campaign_key
JOIN campaign_items AS i ON i.item_key = a.item_key
WHERE a.outcome = 'conflict'
  AND (CAST(:campaign_id AS TEXT) IS NULL OR c.campaign_id = :campaign_id)
ORDER BY a.campaign_key, a.user_bucket, a.user_id, a.item_key, a.issue_no
LIMIT coalesce(CAST(:limit AS INTEGER), 1000)
