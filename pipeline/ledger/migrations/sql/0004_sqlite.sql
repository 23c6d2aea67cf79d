-- Schema version 3 -> 4 (sqlite): delivery to issuers. delivery_batches is the outbox (a batch's
-- row commits before its request is sent), delivery_answers holds each grant's answer under the
-- grant's ledger key, delivery_partitions each partition's latest delivery report. grants is
-- untouched. Frozen; statements end with a line "-- end".

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
)
-- end
CREATE INDEX ix_delivery_batches_partition ON delivery_batches (campaign_key, issuer, partition_id, batch_key)
-- end
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
 WITHOUT ROWID
-- end
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
)
-- end
