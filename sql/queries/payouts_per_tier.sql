-- Merchant cash payouts per tier and case state against the claims and decisions: cases, their claims,
-- review decisions, payable cases and amount (tier or approved), and live payouts in the ledger and amount.
-- Params: program_id (optional)
SELECT
    c.campaign_id AS program_id,
    mc.tier,
    mc.state,
    count(*) AS cases,
    sum(mc.claim_count) AS claims,
    count(d.decision_key) AS decisions,
    sum(CASE WHEN mc.amount_krw IS NULL THEN 0 ELSE 1 END) AS payable_cases,
    coalesce(sum(mc.amount_krw), 0) AS payable_krw,
    count(g.user_id) AS paid,
    coalesce(sum(g.amount_krw), 0) AS paid_krw
FROM merchant_cases AS mc
JOIN campaigns AS c ON c.campaign_key = mc.campaign_key
LEFT JOIN merchant_decisions AS d ON d.campaign_key = mc.campaign_key AND d.merchant_id = mc.merchant_id
LEFT JOIN grant_ledger AS g ON g.campaign_id = c.campaign_id AND g.user_id = mc.merchant_id
WHERE (CAST(:program_id AS TEXT) IS NULL OR c.campaign_id = :program_id)
GROUP BY c.campaign_id, mc.tier, mc.state
ORDER BY c.campaign_id, min(mc.loss_krw), mc.state
