-- First-come-first-served pass stock per program: cap, granted, remaining, sold-out count,
-- applications, pending (after the allocation watermark) and the watermark (UTC).
-- Params: campaign_id: text (optional)
SELECT
    c.campaign_id AS program_id,
    i.item_sku,
    p.stock_cap,
    p.granted,
    p.stock_cap - p.granted AS remaining,
    (SELECT coalesce(sum(l.sold_out), 0) FROM pass_allocations AS l WHERE l.campaign_key = p.campaign_key) AS sold_out,
    (SELECT count(*) FROM pass_applications AS a WHERE a.campaign_key = p.campaign_key) AS applications,
    (SELECT count(*) FROM pass_applications AS a
      WHERE a.campaign_key = p.campaign_key AND a.applied_at > coalesce(p.allocated_through, -1)) AS pending,
    strftime('%Y-%m-%dT%H:%M:%fZ', p.allocated_through / 1000000.0, 'unixepoch') AS allocated_through
FROM pass_programs AS p
JOIN campaigns AS c ON c.campaign_key = p.campaign_key
JOIN campaign_items AS i ON i.item_key = p.item_key
WHERE (CAST(:campaign_id AS TEXT) IS NULL OR c.campaign_id = :campaign_id)
ORDER BY c.campaign_id
