-- When the command was seen running: the agent's first heartbeat goes out right after it
-- starts the command. started_at (the pick) to running_at is the agent's start-up time.

ALTER TABLE tasks ADD COLUMN running_at timestamptz;

ALTER TABLE tasks ADD CONSTRAINT running_after_a_pick CHECK (
    running_at IS NULL OR started_at IS NOT NULL);
