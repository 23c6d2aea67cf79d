-- Open review items of merchant cash programs, oldest first: the case, why it is in review
-- (tier_review | conflicting_claims | incomplete_evidence), tier, reported loss, claims, opened and age in days.
-- Params: program_id: text (optional)
SELECT
    c.campaign_id AS program_id,
    'mc-' || mc.merchant_id AS case_id,
    mc.merchant_id,
    mc.review_reason,
    mc.tier,
    mc.loss_krw,
    mc.claim_count,
    mc.opened_at,
    round(CAST(extract(epoch FROM now() - mc.opened_at) / 86400 AS numeric), 2) AS age_days
FROM merchant_cases AS mc
JOIN campaigns AS c ON c.campaign_key = mc.campaign_key
WHERE mc.state = 'needs_review'
  AND (CAST(:program_id AS TEXT) IS NULL OR c.campaign_id = :program_id)
ORDER BY mc.opened_at, mc.merchant_id
