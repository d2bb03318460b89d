-- Who may call what, and whose tasks are whose.
--
-- A token's secret is never stored: only its SHA-256 digest, by which a presented secret is
-- found. A token's name is the owner of the tasks it submits; tokens may share a name (a new
-- token replacing an old one keeps its owner's tasks).

CREATE TYPE token_role AS ENUM ('admin', 'submitter', 'reader', 'agent');

CREATE TABLE tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'),
    role         token_role NOT NULL,
    digest       bytea NOT NULL UNIQUE CHECK (length(digest) = 32),
    -- An agent token bound to one agent name: it may present no other X-Agent-Name.
    agent_name   text CHECK (agent_name IS NULL OR role = 'agent'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz CHECK (expires_at IS NULL OR expires_at > created_at),
    revoked_at   timestamptz,
    -- Updated at most every few seconds per API process (verified tokens are cached).
    last_used_at timestamptz
);

ALTER TABLE tasks
    -- The name of the token that submitted the task; NULL for tasks from before tokens.
    ADD COLUMN owner      text,
    -- The name of the token that aborted it.
    ADD COLUMN aborted_by text;

-- A submitter's list walks its own tasks newest first.
CREATE INDEX tasks_owner_seq ON tasks (owner, seq);

-- How many tasks each owner has queued, kept exact by the statements that queue tasks (the
-- intake reserves room here in the same statement as its insert, up to max_queued_per_owner)
-- and by the trigger below for every change of status, so that the quota check costs one row
-- whatever the queue's length.
CREATE TABLE owner_queues (
    owner  text PRIMARY KEY,
    queued bigint NOT NULL CHECK (queued >= 0)
);

CREATE FUNCTION count_queued_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE owner_queues
       SET queued = queued + CASE WHEN NEW.status = 'queued' THEN 1 ELSE -1 END
     WHERE owner = NEW.owner;
    RETURN NULL;
END $$;

-- Only rows that enter or leave the queue fire it (a heartbeat or an output upload does not
-- even set `status`; a finish sets it but leaves no queue).
CREATE TRIGGER tasks_count_queued
    AFTER UPDATE OF status ON tasks
    FOR EACH ROW
    WHEN (NEW.owner IS NOT NULL AND (OLD.status = 'queued') <> (NEW.status = 'queued'))
    EXECUTE FUNCTION count_queued_change();
