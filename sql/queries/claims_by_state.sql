-- Merchant cash claims by intake status (accepted | outside_intake_window | below_minimum_loss |
-- after_decision), intake window and the state of the merchant's case (NULL: no case, nothing accepted).
-- Params: program_id: text (optional)
SELECT
    c.campaign_id AS program_id,
    cl.status AS claim_status,
    cl.intake_window,
    mc.state AS case_state,
    count(*) AS claims,
    count(DISTINCT cl.merchant_id) AS merchants,
    sum(cl.loss_krw) AS reported_loss_krw
FROM merchant_claims AS cl
JOIN campaigns AS c ON c.campaign_key = cl.campaign_key
LEFT JOIN merchant_cases AS mc ON mc.campaign_key = cl.campaign_key AND mc.merchant_id = cl.merchant_id
WHERE (CAST(:program_id AS TEXT) IS NULL OR c.campaign_id = :program_id)
GROUP BY c.campaign_id, cl.status, cl.intake_window, mc.state
ORDER BY c.campaign_id, cl.status, cl.intake_window, mc.state
