-- Schema version 4 -> 5 (sqlite): three-way reconciliation; recon_breaks is rebuilt for its wider
-- CHECK constraint. Frozen; statements end with a line "-- end".

CREATE TABLE recon_breaks_v5 (
	break_id VARCHAR(24) NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	break_class VARCHAR(24) NOT NULL, 
	user_id BIGINT NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	item_key INTEGER NOT NULL, 
	item_sku VARCHAR(63), 
	issue_no SMALLINT, 
	partition_id INTEGER NOT NULL, 
	expected_amount_krw BIGINT, 
	expected_valid_from BIGINT, 
	expected_valid_until BIGINT, 
	ledger_amount_krw BIGINT, 
	ledger_valid_from BIGINT, 
	ledger_valid_until BIGINT, 
	detail TEXT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	first_seen_key INTEGER NOT NULL, 
	last_seen_key INTEGER NOT NULL, 
	resolved_key INTEGER, 
	issuer VARCHAR(63), 
	PRIMARY KEY (break_id), 
	CONSTRAINT ck_recon_break_class CHECK (break_class IN ('missing', 'unexpected', 'terms_mismatch', 'duplicate', 'issuer_missing', 'issuer_unexpected')), 
	CONSTRAINT ck_recon_break_status CHECK (status IN ('open', 'resolved')), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key), 
	FOREIGN KEY(first_seen_key) REFERENCES recon_runs (reconciliation_key), 
	FOREIGN KEY(last_seen_key) REFERENCES recon_runs (reconciliation_key), 
	FOREIGN KEY(resolved_key) REFERENCES recon_runs (reconciliation_key)
)
-- end
INSERT INTO recon_breaks_v5 (break_id, campaign_key, break_class, user_id, user_bucket, item_key, item_sku, issue_no, partition_id, expected_amount_krw, expected_valid_from, expected_valid_until, ledger_amount_krw, ledger_valid_from, ledger_valid_until, detail, status, first_seen_key, last_seen_key, resolved_key) SELECT break_id, campaign_key, break_class, user_id, user_bucket, item_key, item_sku, issue_no, partition_id, expected_amount_krw, expected_valid_from, expected_valid_until, ledger_amount_krw, ledger_valid_from, ledger_valid_until, detail, status, first_seen_key, last_seen_key, resolved_key FROM recon_breaks
-- end
DROP TABLE recon_breaks
-- end
ALTER TABLE recon_breaks_v5 RENAME TO recon_breaks
-- end
CREATE INDEX ix_recon_breaks_open ON recon_breaks (campaign_key, status, user_bucket)
-- end
ALTER TABLE recon_runs ADD COLUMN issuer_missing BIGINT DEFAULT '0' NOT NULL
-- end
ALTER TABLE recon_runs ADD COLUMN issuer_unexpected BIGINT DEFAULT '0' NOT NULL
-- end
