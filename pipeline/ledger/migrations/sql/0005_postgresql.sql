-- Schema version 4 -> 5 (postgresql): three-way reconciliation. Frozen; statements end with a line "-- end".

ALTER TABLE recon_breaks ALTER COLUMN break_class TYPE VARCHAR(24)
-- end
ALTER TABLE recon_breaks DROP CONSTRAINT ck_recon_break_class
-- end
ALTER TABLE recon_breaks ADD CONSTRAINT ck_recon_break_class CHECK (break_class IN ('missing', 'unexpected', 'terms_mismatch', 'duplicate', 'issuer_missing', 'issuer_unexpected'))
-- end
ALTER TABLE recon_breaks ADD COLUMN issuer VARCHAR(63)
-- end
ALTER TABLE recon_runs ADD COLUMN issuer_missing BIGINT DEFAULT '0' NOT NULL
-- end
ALTER TABLE recon_runs ADD COLUMN issuer_unexpected BIGINT DEFAULT '0' NOT NULL
-- end
