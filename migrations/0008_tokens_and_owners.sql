-- Who may call what, and whose tasks are whose.
--
-- A token's secret is never stored: only its SHA-256 digest, by which a presented secret is
-- found. A token's name is the owner of the tasks it submits; tokens may share a name (a new
-- token replacing an old one keeps its owner's tasks).

CREATE TYPE token_role AS ENUM ('admin', 'submitter', 'reader', 'agent');

CREATE TABLE tokens (
    id           uuid PRIMARY KEY,
    -- `admin` and `agent` are the names of the shared ADMIN_TOKEN and AGENT_TOKEN.
    name         text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'
                                      AND name NOT IN ('admin', 'agent')),
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

-- The quota check counts an owner's queued tasks. A partial index: a task enters it when it is
-- queued and leaves it when it is picked, so that it costs an insert and nothing on the updates
-- that follow (claims, heartbeats, output, finishes).
CREATE INDEX tasks_queued_by_owner ON tasks (owner) WHERE status = 'queued';

-- Room in an owner's quota that one API process may fill without counting again (see
-- api/src/tasks/intake.rs). A process that counts takes every other process's unexpired grant
-- as filled, so that together they never pass the quota.
CREATE TABLE quota_grants (
    owner   text NOT NULL,
    process uuid NOT NULL,
    tasks   bigint NOT NULL CHECK (tasks >= 0),
    until   timestamptz NOT NULL,
    PRIMARY KEY (owner, process)
);
