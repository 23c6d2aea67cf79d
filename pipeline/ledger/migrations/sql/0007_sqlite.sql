-- Schema version 4 -> 7 (relinked after 0005 and 0006 at merge) (sqlite): merchant cash programs.
-- merchant_claims holds every claim as received (with its intake status), merchant_cases one case per
-- merchant and program, merchant_decisions the reviewers' decisions (append-only, at most one per case;
-- its triggers are in sql/sqlite/views.sql, which the ledger re-applies after upgrading) and
-- merchant_intake_files each ingested claims file. Payouts are grants. New tables only. Frozen;
-- statements end with a line "-- end".

CREATE TABLE merchant_claims (
	campaign_key INTEGER NOT NULL, 
	claim_id VARCHAR(64) NOT NULL, 
	merchant_id BIGINT NOT NULL, 
	submitted_at BIGINT NOT NULL, 
	loss_krw BIGINT NOT NULL, 
	evidence_provided TEXT NOT NULL, 
	evidence_missing TEXT NOT NULL, 
	content_sha256 VARCHAR(16) NOT NULL, 
	status VARCHAR(24) NOT NULL, 
	intake_window VARCHAR(63), 
	source_file TEXT NOT NULL, 
	source_row INTEGER NOT NULL, 
	ingested_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key, claim_id), 
	CONSTRAINT ck_merchant_claims_merchant_id CHECK (merchant_id > 0), 
	CONSTRAINT ck_merchant_claims_loss CHECK (loss_krw >= 0), 
	CONSTRAINT ck_merchant_claims_status CHECK (status IN ('accepted', 'outside_intake_window', 'below_minimum_loss', 'after_decision')), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
)
-- end
CREATE INDEX ix_merchant_claims_merchant ON merchant_claims (campaign_key, merchant_id)
-- end
CREATE TABLE merchant_cases (
	campaign_key INTEGER NOT NULL, 
	merchant_id BIGINT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	tier VARCHAR(63), 
	loss_krw BIGINT NOT NULL, 
	amount_krw BIGINT, 
	review_reason VARCHAR(32), 
	claim_count INTEGER NOT NULL, 
	opened_at BIGINT NOT NULL, 
	updated_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key, merchant_id), 
	CONSTRAINT ck_merchant_cases_state CHECK (state IN ('auto_tier', 'needs_review', 'approved', 'rejected', 'paid')), 
	CONSTRAINT ck_merchant_cases_amount CHECK (amount_krw IS NULL OR amount_krw > 0), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
)
-- end
CREATE INDEX ix_merchant_cases_state ON merchant_cases (campaign_key, state)
-- end
CREATE TABLE merchant_decisions (
	decision_key INTEGER NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	merchant_id BIGINT NOT NULL, 
	decision VARCHAR(16) NOT NULL, 
	amount_krw BIGINT, 
	actor VARCHAR(128) NOT NULL, 
	reason TEXT NOT NULL, 
	decided_at BIGINT NOT NULL, 
	PRIMARY KEY (decision_key), 
	CONSTRAINT uq_merchant_decisions_case UNIQUE (campaign_key, merchant_id), 
	CONSTRAINT ck_merchant_decisions_amount CHECK ((decision = 'approve' AND amount_krw > 0) OR (decision = 'reject' AND amount_krw IS NULL)), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
)
-- end
CREATE TABLE merchant_intake_files (
	campaign_key INTEGER NOT NULL, 
	file_sha256 VARCHAR(64) NOT NULL, 
	source_file TEXT NOT NULL, 
	rows_read BIGINT NOT NULL, 
	claims_new BIGINT NOT NULL, 
	claims_known BIGINT NOT NULL, 
	duplicate_rows BIGINT NOT NULL, 
	quarantined_rows BIGINT NOT NULL, 
	quarantine_file TEXT, 
	ingested_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key, file_sha256), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
)
-- end
