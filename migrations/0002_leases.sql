-- Leases that expire, command timeouts, and abort requests.
--
-- A pick now grants a lease until lease_expires_at; the agent's heartbeats push it forward. The
-- reaper requeues (or, after max_attempts, fails) in_progress tasks whose lease has expired,
-- which also rescues a pick whose response never reached its agent.

ALTER TABLE tasks
    -- The lease's end on the database's clock. Set by a pick, extended by heartbeats.
    ADD COLUMN lease_expires_at   timestamptz,
    -- How long the command may run, in seconds; the agent enforces it and the reaper backs it up.
    ADD COLUMN timeout_secs       integer NOT NULL DEFAULT 3600 CHECK (timeout_secs > 0),
    -- A user asked to abort the running task; the agent is told through its heartbeat.
    ADD COLUMN abort_requested_at timestamptz;

ALTER TABLE tasks ALTER COLUMN timeout_secs DROP DEFAULT;

-- Tasks picked before leases existed get one that has already run out: the reaper takes them.
UPDATE tasks SET lease_expires_at = now() WHERE status = 'in_progress';

ALTER TABLE tasks DROP CONSTRAINT queued_is_unassigned;
ALTER TABLE tasks ADD CONSTRAINT queued_is_unassigned CHECK (
    status <> 'queued'
    OR (started_at IS NULL AND finished_at IS NULL AND lease IS NULL AND agent IS NULL
        AND exit_code IS NULL AND error IS NULL AND lease_expires_at IS NULL
        AND abort_requested_at IS NULL));

ALTER TABLE tasks DROP CONSTRAINT in_progress_is_leased;
ALTER TABLE tasks ADD CONSTRAINT in_progress_is_leased CHECK (
    status <> 'in_progress'
    OR (started_at IS NOT NULL AND lease IS NOT NULL AND agent IS NOT NULL
        AND lease_expires_at IS NOT NULL AND finished_at IS NULL AND attempts > 0));

-- Only a running task can have an abort pending or done; a queued one is cancelled at once.
ALTER TABLE tasks ADD CONSTRAINT abort_only_when_started CHECK (
    abort_requested_at IS NULL OR started_at IS NOT NULL);

-- The reaper looks only at running tasks, by lease end.
CREATE INDEX tasks_in_progress_by_lease ON tasks (lease_expires_at) WHERE status = 'in_progress';
