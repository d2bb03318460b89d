-- The output cap of the current attempt, as its pick's terms told the agent. The server keeps
-- the attempt's chunks, and checks its finish, by this cap rather than by its own current
-- setting, so that an API process with another max_output_bytes (a rolling change of the
-- setting) agrees with the agent on what is kept. NULL for attempts picked before this column
-- existed: the server's setting applies to them.

ALTER TABLE tasks ADD COLUMN output_cap integer CHECK (output_cap >= 1024);
