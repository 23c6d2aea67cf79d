-- Schema version 4 -> 6 (sqlite): the first-come-first-served pass. pass_programs holds each
-- program's stock counter and allocation watermark, pass_batches each ingested application file,
-- pass_applications one application per (program, user), pass_allocations each allocation window.
-- The passes themselves are rows of grants. grants is untouched. Frozen; statements end with a
-- line "-- end". (Revision 0006; its predecessor is relinked at merge.)

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
)
-- end
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
)
-- end
CREATE TABLE pass_applications (
	campaign_key INTEGER NOT NULL, 
	user_id BIGINT NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	applied_at BIGINT NOT NULL, 
	batch_key INTEGER NOT NULL, 
	PRIMARY KEY (campaign_key, user_id), 
	CONSTRAINT ck_pass_applications_user_id_positive CHECK (user_id > 0)
)
 WITHOUT ROWID
-- end
CREATE INDEX ix_pass_applications_applied ON pass_applications (campaign_key, applied_at)
-- end
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
)
-- end
CREATE INDEX ix_pass_allocations_campaign ON pass_allocations (campaign_key, through)
-- end
