-- Schema version 2 -> 3 (postgresql): grants becomes a table partitioned by campaign_key
-- (each campaign's table is partitioned by user_bucket range; pipeline/pgcopy.py makes them).
-- The existing rows stay where they are: the old table is renamed and attached as the
-- default child, so the upgrade copies nothing.
-- Frozen; statements end with a line "-- end".

ALTER TABLE grants RENAME TO grants_default
-- end
ALTER INDEX grants_pkey RENAME TO grants_default_pkey
-- end
DROP TRIGGER IF EXISTS grants_append_only ON grants_default
-- end
DROP TRIGGER IF EXISTS grants_reissue_guard ON grants_default
-- end
CREATE TABLE grants (
	campaign_key INTEGER NOT NULL, 
	user_bucket BIGINT NOT NULL, 
	user_id BIGINT NOT NULL, 
	item_key INTEGER NOT NULL, 
	issue_no SMALLINT DEFAULT '0' NOT NULL, 
	partition_id SMALLINT NOT NULL, 
	run_key INTEGER NOT NULL, 
	amount_krw BIGINT, 
	valid_from TIMESTAMP WITH TIME ZONE NOT NULL, 
	valid_until TIMESTAMP WITH TIME ZONE, 
	granted_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (campaign_key, user_bucket, user_id, item_key, issue_no), 
	CONSTRAINT ck_grants_user_id_positive CHECK (user_id > 0), 
	CONSTRAINT ck_grants_issue_no CHECK (issue_no >= 0), 
	CONSTRAINT ck_grants_user_bucket CHECK (user_bucket = (user_id % 2147483647) * 1540483477 % 2147483647)
)
 PARTITION BY LIST (campaign_key)
-- end
ALTER TABLE grants ATTACH PARTITION grants_default DEFAULT
-- end
