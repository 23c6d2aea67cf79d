-- Schema version 9 -> 10 (postgresql): the issuers' shared rate budgets. Frozen; statements end with a line "-- end".

CREATE TABLE issuer_budgets (
	issuer VARCHAR(63) NOT NULL, 
	next_at_us BIGINT NOT NULL, 
	PRIMARY KEY (issuer)
)
-- end
