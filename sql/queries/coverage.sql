-- Coverage per item as of the latest reconciliation: expected (eligible users), granted (live), missing,
-- unexpected, wrong terms, voided on purpose, and the live face value. Run `entitle reconcile` to refresh.
-- Params: campaign_id: text (optional; all campaigns when omitted)
SELECT campaign_id, item_sku, item_kind, expected, granted, missing, unexpected, terms_mismatch, voided,
       face_value_krw, verdict, reconciliation_id, as_of
FROM campaign_coverage
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR campaign_id = :campaign_id)
ORDER BY campaign_id, item_sku
