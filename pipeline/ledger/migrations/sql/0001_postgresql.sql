-- Schema version 1 of the ledger (frozen): the tables as the first release created them.
-- Migration 0001 replays this file; statements end with a line "-- end".

CREATE TABLE campaigns (
	campaign_key SERIAL NOT NULL, 
	campaign_id VARCHAR(63) NOT NULL, 
	name TEXT NOT NULL, 
	time_zone VARCHAR(64) NOT NULL, 
	starts_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	registered_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (campaign_key), 
	UNIQUE (campaign_id)
)
-- end

CREATE TABLE grant_voids (
	campaign_key INTEGER NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	user_id BIGINT NOT NULL, 
	item_key INTEGER NOT NULL, 
	reason TEXT NOT NULL, 
	actor VARCHAR(128) NOT NULL, 
	voided_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (campaign_key, user_bucket, user_id, item_key)
)
-- end

CREATE TABLE grants (
	campaign_key INTEGER NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	user_id BIGINT NOT NULL, 
	item_key INTEGER NOT NULL, 
	partition_id SMALLINT NOT NULL, 
	run_key INTEGER NOT NULL, 
	amount_krw BIGINT, 
	valid_from TIMESTAMP WITH TIME ZONE NOT NULL, 
	valid_until TIMESTAMP WITH TIME ZONE, 
	granted_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (campaign_key, user_bucket, user_id, item_key), 
	CONSTRAINT ck_grants_user_id_positive CHECK (user_id > 0), 
	CONSTRAINT ck_grants_user_bucket CHECK (user_bucket = (user_id % 2147483647) * 1540483477 % 2147483647)
)
-- end

CREATE TABLE ledger_meta (
	meta_key VARCHAR(64) NOT NULL, 
	meta_value VARCHAR(256) NOT NULL, 
	PRIMARY KEY (meta_key)
)
-- end

CREATE TABLE campaign_items (
	item_key SERIAL NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	item_sku VARCHAR(63) NOT NULL, 
	item_kind VARCHAR(16) NOT NULL, 
	amount_krw BIGINT, 
	validity_days INTEGER, 
	valid_from TIMESTAMP WITH TIME ZONE NOT NULL, 
	valid_until TIMESTAMP WITH TIME ZONE, 
	terms_hash VARCHAR(16) NOT NULL, 
	PRIMARY KEY (item_key), 
	CONSTRAINT uq_campaign_items_sku UNIQUE (campaign_key, item_sku), 
	CONSTRAINT ck_item_kind CHECK (item_kind IN ('emoticon', 'coupon', 'pass', 'cash')), 
	CONSTRAINT ck_item_amount_positive CHECK (amount_krw IS NULL OR amount_krw > 0), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
)
-- end

CREATE TABLE runs (
	run_key SERIAL NOT NULL, 
	run_id VARCHAR(250) NOT NULL, 
	campaign_key INTEGER NOT NULL, 
	snapshot_id VARCHAR(16) NOT NULL, 
	trigger VARCHAR(32) NOT NULL, 
	started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (run_key), 
	UNIQUE (run_id), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
)
-- end

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
	registered_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (campaign_key, snapshot_id), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
)
-- end

CREATE TABLE partition_attempts (
	attempt_key SERIAL NOT NULL, 
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
	started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	finished_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (attempt_key), 
	CONSTRAINT ck_attempt_status CHECK (status IN ('running', 'done', 'failed')), 
	FOREIGN KEY(run_key) REFERENCES runs (run_key), 
	FOREIGN KEY(campaign_key) REFERENCES campaigns (campaign_key)
)
-- end

CREATE INDEX ix_partition_attempts_content ON partition_attempts (campaign_key, content_sha256, items_signature, status)
-- end

CREATE INDEX ix_partition_attempts_lookup ON partition_attempts (campaign_key, snapshot_id, partition_id, attempt_key)
-- end
