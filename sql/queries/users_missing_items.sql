-- Users who hold some but not all of a campaign's items (live grants).
-- Users with no grant at all are not in the ledger: `entitle reconcile` finds them against the snapshot.
-- Params: campaign_id: text (required), limit: integer (optional, default 1000)
SELECT
    g.user_id,
    count(*) AS items_held,
    (SELECT count(*) FROM campaign_items AS ci
      JOIN campaigns AS cc ON cc.campaign_key = ci.campaign_key
      WHERE cc.campaign_id = :campaign_id) AS items_in_campaign
FROM grant_ledger AS g
WHERE g.campaign_id = :campaign_id
GROUP BY g.user_id
HAVING count(*) < (SELECT count(*) FROM campaign_items AS ci
                   JOIN campaigns AS cc ON cc.campaign_key = ci.campaign_key
                   WHERE cc.campaign_id = :campaign_id)
ORDER BY g.user_id
LIMIT coalesce(CAST(:limit AS INTEGER), 1000)
