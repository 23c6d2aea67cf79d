-- One user's live grants. Uses the ledger key (user_bucket is a pure function of user_id), so it is
-- an index seek even on a 240M-row ledger.
-- Params: user_id: integer (required)
SELECT campaign_id, user_id, item_sku, item_kind, amount_krw, valid_from, valid_until, valid_until_local,
       granted_at, run_id, partition_id, grant_id
FROM grant_ledger
WHERE user_bucket = (CAST(:user_id AS BIGINT) % 2147483647) * 1540483477 % 2147483647
  AND user_id = :user_id
ORDER BY campaign_id, item_sku
