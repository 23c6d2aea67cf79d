-- Open reconciliation breaks, optionally of one class (missing | unexpected | terms_mismatch | duplicate |
-- issuer_missing | issuer_unexpected),
-- oldest first, with what differs and what to do. Break ids stay the same until the break is resolved.
-- Params: campaign_id: text (optional), break_class: text (optional), limit: integer (optional, default 1000)
SELECT break_id, campaign_id, break_class, user_id, item_sku, issue_no, partition_id,
       expected_amount_krw, ledger_amount_krw, expected_valid_until, ledger_valid_until,
       first_seen_at, first_seen_in, detail, issuer
FROM reconciliation_breaks
WHERE status = 'open'
  AND (CAST(:campaign_id AS TEXT) IS NULL OR campaign_id = :campaign_id)
  AND (CAST(:break_class AS TEXT) IS NULL OR break_class = :break_class)
ORDER BY first_seen_at, break_class, user_id, item_sku
LIMIT coalesce(CAST(:limit AS INTEGER), 1000)
