-- The ledger's tables for sqlite, generated from pipeline/ledger/tables.py by
-- `python -m pipeline.ledger.ddl sqlite`. Views and triggers: views.sql beside this file.

CREATE TABLE campaigns (
	campaign_key INTEGER NOT NULL, 
	campaign_id VARCHAR(63) NOT NULL, 
	name TEXT NOT NULL, 
	time_zone VARCHAR(64) NOT NULL, 
	starts_at BIGINT NOT NULL, 
	registered_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key), 
	UNIQUE (campaign_id)
);

CREATE TABLE delivery_answers (
	campaign_key INTEGER NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	user_id BIGINT NOT NULL, 
	item_key INTEGER NOT NULL, 
	issue_no SMALLINT NOT NULL, 
	outcome VARCHAR(16) NOT NULL, 
	detail TEXT, 
	batch_key INTEGER NOT NULL, 
	answered_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key, user_bucket, user_id, item_key, issue_no), 
	CONSTRAINT ck_delivery_outcome CHECK (outcome IN ('created', 'exists', 'conflict', 'failed'))
)
 WITHOUT ROWID;

CREATE TABLE delivery_revocations (
	campaign_key INTEGER NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	user_id BIGINT NOT NULL, 
	item_key INTEGER NOT NULL, 
	issue_no SMALLINT NOT NULL, 
	issuer VARCHAR(63) NOT NULL, 
	outcome VARCHAR(16) NOT NULL, 
	detail TEXT, 
	attempts INTEGER NOT NULL, 
	answered_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key, user_bucket, user_id, item_key, issue_no), 
	CONSTRAINT ck_delivery_revocation_outcome CHECK (outcome IN ('revoked', 'already_revoked', 'not_found', 'failed'))
)
 WITHOUT ROWID;

CREATE TABLE grant_voids (
	campaign_key INTEGER NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	user_id BIGINT NOT NULL, 
	item_key INTEGER NOT NULL, 
	issue_no SMALLINT DEFAULT '0' NOT NULL, 
	reason TEXT NOT NULL, 
	actor VARCHAR(128) NOT NULL, 
	voided_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key, user_bucket, user_id, item_key, issue_no)
)
 WITHOUT ROWID;

CREATE TABLE grants (
	campaign_key INTEGER NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	user_id BIGINT NOT NULL, 
	item_key INTEGER NOT NULL, 
	issue_no SMALLINT DEFAULT '0' NOT NULL, 
	partition_id SMALLINT NOT NULL, 
	run_key INTEGER NOT NULL, 
	amount_krw BIGINT, 
	valid_from BIGINT NOT NULL, 
	valid_until BIGINT, 
	granted_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key, user_bucket, user_id, item_key, issue_no), 
	CONSTRAINT ck_grants_user_id_positive CHECK (user_id > 0), 
	CONSTRAINT ck_grants_issue_no CHECK (issue_no >= 0), 
	CONSTRAINT ck_grants_user_bucket CHECK (user_bucket = (user_id % 2147483647) * 1540483477 % 2147483647)
)
 WITHOUT ROWID;

CREATE TABLE issuer_budgets (
	issuer VARCHAR(63) NOT NULL, 
	next_at_us BIGINT NOT NULL, 
	PRIMARY KEY (issuer)
);

CREATE TABLE ledger_meta (
	meta_key VARCHAR(64) NOT NULL, 
	meta_value VARCHAR(256) NOT NULL, 
	PRIMARY KEY (meta_key)
);

CREATE TABLE pass_applications (
	campaign_key INTEGER NOT NULL, 
	user_id BIGINT NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	applied_at BIGINT NOT NULL, 
	batch_key INTEGER NOT NULL, 
	PRIMARY KEY (campaign_key, user_id), 
	CONSTRAINT ck_pass_applications_user_id_positive CHECK (user_id > 0)
)
 WITHOUT ROWID;

CREATE TABLE campaign_items (
	item_key INTEGER NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	item_sku VARCHAR(63) NOT NULL, 
	item_kind VARCHAR(16) NOT NULL, 
	amount_krw BIGINT, 
	validity_days INTEGER, 
	valid_from BIGINT NOT NULL, 
	valid_until BIGINT, 
	terms_hash VARCHAR(16) NOT NULL, 
	PRIMARY KEY (item_key), 
	CONSTRAINT uq_campaign_items_sku UNIQUE (campaign_key, item_sku), 
	CONSTRAINT ck_item_kind CHECK (item_kind IN ('emoticon', 'coupon', 'pass', 'cash')), 
	CONSTRAINT ck_item_amount_positive CHECK (amount_krw IS NULL OR amount_krw > 0), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

CREATE TABLE delivery_batches (
	batch_key INTEGER NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	issuer VARCHAR(63) NOT NULL, 
	partition_id INTEGER NOT NULL, 
	grant_count INTEGER NOT NULL, 
	first_user_bucket BIGINT NOT NULL, 
	first_user_id BIGINT NOT NULL, 
	last_user_bucket BIGINT NOT NULL, 
	last_user_id BIGINT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	error TEXT, 
	started_at BIGINT NOT NULL, 
	finished_at BIGINT, 
	PRIMARY KEY (batch_key), 
	CONSTRAINT ck_delivery_batch_status CHECK (status IN ('in_flight', 'answered', 'failed')), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

CREATE INDEX ix_delivery_batches_partition ON delivery_batches (campaign_key, issuer, partition_id, batch_key);

CREATE TABLE delivery_partitions (
	campaign_key INTEGER NOT NULL, 
	issuer VARCHAR(63) NOT NULL, 
	partition_id INTEGER NOT NULL, 
	snapshot_id VARCHAR(16) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	planned BIGINT, 
	created BIGINT, 
	existed BIGINT, 
	conflicts BIGINT, 
	failed BIGINT, 
	not_attempted BIGINT, 
	sent BIGINT, 
	error TEXT, 
	duration_s FLOAT, 
	started_at BIGINT NOT NULL, 
	finished_at BIGINT, 
	PRIMARY KEY (campaign_key, issuer, partition_id), 
	CONSTRAINT ck_delivery_partition_status CHECK (status IN ('running', 'done', 'failed')), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

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
);

CREATE INDEX ix_merchant_cases_state ON merchant_cases (campaign_key, state);

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
);

CREATE INDEX ix_merchant_claims_merchant ON merchant_claims (campaign_key, merchant_id);

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
);

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
);

CREATE TABLE pass_batches (
	batch_key INTEGER NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	content_sha256 VARCHAR(64) NOT NULL, 
	source_file TEXT NOT NULL, 
	rows_read BIGINT NOT NULL, 
	malformed BIGINT NOT NULL, 
	refused BIGINT NOT NULL, 
	duplicate_rows BIGINT NOT NULL, 
	new_applications BIGINT NOT NULL, 
	earlier_repeats BIGINT NOT NULL, 
	quarantine_file TEXT, 
	ingested_at BIGINT NOT NULL, 
	PRIMARY KEY (batch_key), 
	CONSTRAINT uq_pass_batches_content UNIQUE (campaign_key, content_sha256), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

CREATE TABLE pass_programs (
	campaign_key INTEGER NOT NULL, 
	item_key INTEGER NOT NULL, 
	stock_cap BIGINT NOT NULL, 
	validity_months INTEGER NOT NULL, 
	granted BIGINT NOT NULL, 
	allocated_through BIGINT, 
	registered_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key), 
	CONSTRAINT ck_pass_programs_cap_positive CHECK (stock_cap > 0), 
	CONSTRAINT ck_pass_programs_within_cap CHECK (granted >= 0 AND granted <= stock_cap), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

CREATE TABLE program_recon_runs (
	program_recon_key INTEGER NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	program VARCHAR(32) NOT NULL, 
	verdict VARCHAR(16) NOT NULL, 
	explanation TEXT NOT NULL, 
	breaks BIGINT NOT NULL, 
	result_json TEXT NOT NULL, 
	started_at BIGINT NOT NULL, 
	finished_at BIGINT NOT NULL, 
	PRIMARY KEY (program_recon_key), 
	CONSTRAINT ck_program_recon_verdict CHECK (verdict IN ('RECONCILED', 'BREAKS')), 
	CONSTRAINT ck_program_recon_program CHECK (program IN ('pass', 'merchant_cash')), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

CREATE INDEX ix_program_recon_runs_campaign ON program_recon_runs (campaign_key, program_recon_key);

CREATE TABLE recon_runs (
	reconciliation_key INTEGER NOT NULL, 
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
	started_at BIGINT NOT NULL, 
	finished_at BIGINT NOT NULL, 
	issuer_missing BIGINT DEFAULT '0' NOT NULL, 
	issuer_unexpected BIGINT DEFAULT '0' NOT NULL, 
	PRIMARY KEY (reconciliation_key), 
	CONSTRAINT ck_recon_verdict CHECK (verdict IN ('RECONCILED', 'BREAKS', 'INCOMPLETE')), 
	UNIQUE (reconciliation_id), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

CREATE INDEX ix_recon_runs_campaign ON recon_runs (campaign_key, reconciliation_key);

CREATE TABLE runs (
	run_key INTEGER NOT NULL, 
	run_id VARCHAR(250) NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	snapshot_id VARCHAR(16) NOT NULL, 
	"trigger" VARCHAR(32) NOT NULL, 
	started_at BIGINT NOT NULL, 
	PRIMARY KEY (run_key), 
	UNIQUE (run_id), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

CREATE TABLE snapshots (
	campaign_key INTEGER NOT NULL, 
	snapshot_id VARCHAR(16) NOT NULL, 
	source_file TEXT NOT NULL, 
	snapshot_dir TEXT NOT NULL, 
	eligible_users BIGINT NOT NULL, 
	rejected_rows BIGINT NOT NULL, 
	duplicate_rows BIGINT NOT NULL, 
	excluded_users BIGINT NOT NULL, 
	partition_count INTEGER NOT NULL, 
	registered_at BIGINT NOT NULL, 
	PRIMARY KEY (campaign_key, snapshot_id), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

CREATE TABLE partition_attempts (
	attempt_key INTEGER NOT NULL, 
	run_key INTEGER NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	snapshot_id VARCHAR(16) NOT NULL, 
	partition_count INTEGER NOT NULL, 
	partition_id INTEGER NOT NULL, 
	content_sha256 VARCHAR(64) NOT NULL, 
	items_signature VARCHAR(16) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	verified BOOLEAN NOT NULL, 
	planned BIGINT NOT NULL, 
	written BIGINT, 
	already_present BIGINT, 
	duration_s FLOAT, 
	error TEXT, 
	started_at BIGINT NOT NULL, 
	finished_at BIGINT, 
	worker VARCHAR(255), 
	PRIMARY KEY (attempt_key), 
	CONSTRAINT ck_attempt_status CHECK (status IN ('running', 'done', 'failed')), 
	FOREIGN KEY(run_key) REFERENCES runs (run_key), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
);

CREATE INDEX ix_partition_attempts_content ON partition_attempts (campaign_key, content_sha256, items_signature, status);

CREATE INDEX ix_partition_attempts_lookup ON partition_attempts (campaign_key, snapshot_id, partition_id, attempt_key);

CREATE TABLE pass_allocations (
	allocation_key INTEGER NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	run_key INTEGER NOT NULL, 
	previous_through BIGINT, 
	through BIGINT NOT NULL, 
	granted_at BIGINT NOT NULL, 
	valid_until BIGINT NOT NULL, 
	considered BIGINT NOT NULL, 
	granted BIGINT NOT NULL, 
	sold_out BIGINT NOT NULL, 
	stock_after BIGINT NOT NULL, 
	PRIMARY KEY (allocation_key), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key), 
	UNIQUE (run_key), 
	FOREIGN KEY(run_key) REFERENCES runs (run_key)
);

CREATE INDEX ix_pass_allocations_campaign ON pass_allocations (campaign_key, through);

CREATE TABLE recon_breaks (
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
);

CREATE INDEX ix_recon_breaks_open ON recon_breaks (campaign_key, status, user_bucket);

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
);

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
);
