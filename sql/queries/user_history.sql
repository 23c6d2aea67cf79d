-- Every ledger entry of one user: grants (live or voided) and voids, with who and why. An index seek.
-- Params: user_id: integer (required)
SELECT campaign_id, user_id, item_sku, issue_no, entry_type, amount_krw, valid_from, valid_until, entry_at,
       run_id, actor, reason
FROM grant_history
WHERE user_bucket = (CAST(:user_id AS BIGINT) % 2147483647) * 1540483477 % 2147483647
  AND user_id = :user_id
ORDER BY campaign_id, item_sku, issue_no, entry_type
