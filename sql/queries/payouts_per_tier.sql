-- Merchant cash payouts per tier and case state against the claims and decisions: cases, their claims,
-- review decisions, payable cases and amount (tier or approved), live payouts in the ledger and amount, and
-- payouts voided on purpose (`entitle claims void`; who and why: the query user_history or voids_by_actor).
-- Params: program_id: text (optional)
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
    coalesce(sum(g.amount_krw), 0) AS paid_krw,
    coalesce(sum(v.voids), 0) AS voided,
    coalesce(sum(v.voided_krw), 0) AS voided_krw
FROM merchant_cases AS mc
JOIN campaigns AS c ON c.campaign_key = mc.campaign_key
LEFT JOIN merchant_decisions AS d ON d.campaign_key = mc.campaign_key AND d.merchant_id = mc.merchant_id
LEFT JOIN grant_ledger AS g ON g.campaign_id = c.campaign_id AND g.user_id = mc.merchant_id
LEFT JOIN (
    SELECT campaign_id, user_id, count(*) AS voids, sum(amount_krw) AS voided_krw
    FROM grant_history
    WHERE entry_type = 'void' AND (CAST(:program_id AS TEXT) IS NULL OR campaign_id = :program_id)
    GROUP BY campaign_id, user_id
) AS v ON v.campaign_id = c.campaign_id AND v.user_id = mc.merchant_id
WHERE (CAST(:program_id AS TEXT) IS NULL OR c.campaign_id = :program_id)
GROUP BY c.campaign_id, mc.tier, mc.state
ORDER BY c.campaign_id, min(mc.loss_krw), mc.state
