-- Schema version 1 -> 2 (postgresql): issue_no in the grant and void keys (void and reissue),
-- and the reconciliation tables. Frozen; statements end with a line "-- end".

ALTER TABLE grant_voids ADD COLUMN issue_no SMALLINT DEFAULT '0' NOT NULL, DROP CONSTRAINT grant_voids_pkey, ADD PRIMARY KEY (campaign_key, user_bucket, user_id, item_key, issue_no)
-- end
ALTER TABLE grants ADD COLUMN issue_no SMALLINT DEFAULT '0' NOT NULL, ADD CONSTRAINT ck_grants_issue_no CHECK (issue_no >= 0), DROP CONSTRAINT grants_pkey, ADD PRIMARY KEY (campaign_key, user_bucket, user_id, item_key, issue_no)
-- end
CREATE TABLE recon_runs (
	reconciliation_key SERIAL NOT NULL, 
	reconciliation_id VARCHAR(64) NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	snapshot_id VARCHAR(16) NOT NULL, 
	partition_count INTEGER NOT NULL, 
	method VARCHAR(16) NOT NULL, 
	verdict VARCHAR(16) NOT NULL, 
	explanation TEXT NOT NULL, 
	expected BIGINT NOT NULL, 
	matched BIGINT NOT NULL, 
	terms_mismatch BIGINT NOT NULL, 
	missing BIGINT NOT NULL, 
	voided BIGINT NOT NULL, 
	ledger_live BIGINT NOT NULL, 
	unexpected BIGINT NOT NULL, 
	duplicate BIGINT NOT NULL, 
	residual_expected BIGINT NOT NULL, 
	residual_ledger BIGINT NOT NULL, 
	open_breaks BIGINT NOT NULL, 
	breaks_itemized BIGINT NOT NULL, 
	export_dir TEXT, 
	started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	finished_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (reconciliation_key), 
	CONSTRAINT ck_recon_verdict CHECK (verdict IN ('RECONCILED', 'BREAKS', 'INCOMPLETE')), 
	UNIQUE (reconciliation_id), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
)
-- end
CREATE INDEX ix_recon_runs_campaign ON recon_runs (campaign_key, reconciliation_key)
-- end
CREATE TABLE recon_breaks (
	break_id VARCHAR(24) NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	break_class VARCHAR(16) NOT NULL, 
	user_id BIGINT NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	item_key INTEGER NOT NULL, 
	item_sku VARCHAR(63), 
	issue_no SMALLINT, 
	partition_id INTEGER NOT NULL, 
	expected_amount_krw BIGINT, 
	expected_valid_from TIMESTAMP WITH TIME ZONE, 
	expected_valid_until TIMESTAMP WITH TIME ZONE, 
	ledger_amount_krw BIGINT, 
	ledger_valid_from TIMESTAMP WITH TIME ZONE, 
	ledger_valid_until TIMESTAMP WITH TIME ZONE, 
	detail TEXT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	first_seen_key INTEGER NOT NULL, 
	last_seen_key INTEGER NOT NULL, 
	resolved_key INTEGER, 
	PRIMARY KEY (break_id), 
	CONSTRAINT ck_recon_break_class CHECK (break_class IN ('missing', 'unexpected', 'terms_mismatch', 'duplicate')), 
	CONSTRAINT ck_recon_break_status CHECK (status IN ('open', 'resolved')), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key), 
	FOREIGN KEY(first_seen_key) REFERENCES recon_runs (reconciliation_key), 
	FOREIGN KEY(last_seen_key) REFERENCES recon_runs (reconciliation_key), 
	FOREIGN KEY(resolved_key) REFERENCES recon_runs (reconciliation_key)
)
-- end
CREATE INDEX ix_recon_breaks_open ON recon_breaks (campaign_key, status, user_bucket)
-- end
CREATE TABLE recon_items (
	reconciliation_key INTEGER NOT NULL, 
	item_key INTEGER NOT NULL, 
	item_sku VARCHAR(63) NOT NULL, 
	expected BIGINT NOT NULL, 
	live BIGINT NOT NULL, 
	matched BIGINT NOT NULL, 
	terms_mismatch BIGINT NOT NULL, 
	missing BIGINT NOT NULL, 
	voided BIGINT NOT NULL, 
	unexpected BIGINT NOT NULL, 
	duplicate BIGINT NOT NULL, 
	PRIMARY KEY (reconciliation_key, item_key), 
	FOREIGN KEY(reconciliation_key) REFERENCES recon_runs (reconciliation_key)
)
-- end
CREATE TABLE recon_partitions (
	reconciliation_key INTEGER NOT NULL, 
	partition_id INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	method VARCHAR(16) NOT NULL, 
	expected BIGINT, 
	live BIGINT, 
	matched BIGINT, 
	terms_mismatch BIGINT, 
	missing BIGINT, 
	voided BIGINT, 
	unexpected BIGINT, 
	duplicate BIGINT, 
	error TEXT, 
	PRIMARY KEY (reconciliation_key, partition_id), 
	CONSTRAINT ck_recon_partition_state CHECK (state IN ('matched', 'breaks', 'not_granted', 'unreadable')), 
	FOREIGN KEY(reconciliation_key) REFERENCES recon_runs (reconciliation_key)
)
-- end
