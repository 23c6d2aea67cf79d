-- Schema version 7 -> 8 (postgresql): revocations at the issuers. Frozen; statements end with a line "-- end".

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
	answered_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (campaign_key, user_bucket, user_id, item_key, issue_no), 
	CONSTRAINT ck_delivery_revocation_outcome CHECK (outcome IN ('revoked', 'already_revoked', 'not_found', 'failed'))
)
-- end
