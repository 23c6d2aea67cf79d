-- Schema version 11 -> 12 (postgresql): the worker of each partition attempt. Frozen; statements end with a line "-- end".

ALTER TABLE partition_attempts ADD COLUMN worker VARCHAR(255)
-- end
