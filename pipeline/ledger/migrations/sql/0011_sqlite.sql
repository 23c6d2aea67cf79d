-- Schema version 10 -> 11 (sqlite): pass_applications without its applied_at index. Frozen; statements end with a line "-- end".

DROP INDEX IF EXISTS ix_pass_applications_applied
-- end
