-- Schema version 8 -> 9 (sqlite): stored program reconciliations. Frozen; statements end with a line "-- end".

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
)
-- end
CREATE INDEX ix_program_recon_runs_campaign ON program_recon_runs (campaign_key, program_recon_key)
-- end
