-- What a user can say about a task besides its command: where it may run (tags), in which
-- order (priority), from when (run_at), how often it is tried again when its command fails
-- (max_retries, retry_backoff_secs), with which environment and in which directory. Every
-- column has the default that keeps the behaviour of tasks submitted before it existed.

-- A tag: a lowercase word of letters, digits and `_.-`. A function, so that the rule is
-- written once for the CHECK constraints of tasks and agents.
CREATE FUNCTION valid_tags(tags text[], most integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT cardinality(tags) <= most
       AND array_position(tags, NULL) IS NULL
       AND coalesce(bool_and(tag ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'), true)
      FROM unnest(tags) AS tag
$$;

ALTER TABLE tasks
    -- An agent takes the task only if its tags include all of these (sorted, no repeats).
    ADD COLUMN tags               text[] NOT NULL DEFAULT '{}' CHECK (valid_tags(tags, 16)),
    -- Higher first; within a priority, creation order.
    ADD COLUMN priority           smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    -- Not picked before this time: a delayed submit, or a retry's backoff. NULL: at once.
    ADD COLUMN run_at             timestamptz,
    -- A command that ends with a non-zero exit code or by its timeout is queued again, up to
    -- max_retries times, after retry_backoff_secs × 2^(retry - 1) (with jitter, at most an hour).
    ADD COLUMN max_retries        smallint NOT NULL DEFAULT 0 CHECK (max_retries BETWEEN 0 AND 20),
    ADD COLUMN retry_backoff_secs integer NOT NULL DEFAULT 10
                                  CHECK (retry_backoff_secs BETWEEN 0 AND 3600),
    ADD COLUMN retries            smallint NOT NULL DEFAULT 0 CHECK (retries >= 0),
    -- Variables added to the command's environment (an object of strings), and the directory
    -- it starts in.
    ADD COLUMN env                jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(env) = 'object'),
    ADD COLUMN cwd                text CHECK (cwd IS NULL OR left(cwd, 1) = '/'),
    ADD CONSTRAINT retries_within_max CHECK (retries <= max_retries);

-- The claim takes the queued tasks in priority order, then creation order.
CREATE INDEX tasks_queued_by_priority ON tasks (priority DESC, seq) WHERE status = 'queued';

-- The dispatcher sleeps until the earliest delayed task is due: found here, not by polling.
CREATE INDEX tasks_queued_by_run_at ON tasks (run_at) WHERE status = 'queued' AND run_at IS NOT NULL;

-- The tags an agent declared on its last pick (for GET /agents, and for the operator to see
-- which queued tasks no agent can take); NULL until its first pick.
ALTER TABLE agents ADD COLUMN tags text[] CHECK (valid_tags(tags, 64));

-- The queue's figures gain the tasks not due yet (a delay, a retry's backoff), which are not
-- waiting for an agent, and the queued tasks that no live agent's tags can take.
ALTER TABLE metrics_snapshot
    ADD COLUMN delayed    bigint NOT NULL DEFAULT 0 CHECK (delayed >= 0),
    ADD COLUMN unroutable bigint NOT NULL DEFAULT 0 CHECK (unroutable >= 0);

-- Every attempt of a task that has ended, oldest first; the task's row holds the current (or
-- last) one as before. Written by the statement that ends the attempt: a finish, a retry,
-- end_attempt (the reaper, a hand-back). A pick put back before it reached its agent is not an
-- attempt and leaves no row.
CREATE TYPE attempt_outcome AS ENUM
    ('finished', 'failed', 'requeued', 'released', 'retried', 'cancelled');

CREATE TABLE task_attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    agent       text NOT NULL,
    started_at  timestamptz NOT NULL,
    running_at  timestamptz,
    finished_at timestamptz NOT NULL,
    outcome     attempt_outcome NOT NULL,
    exit_code   integer CHECK (exit_code BETWEEN 0 AND 255),
    error       text
);

CREATE INDEX task_attempts_by_task ON task_attempts (task_id, id);

-- Submits with an Idempotency-Key: per owner, the key, a digest of the request's body, and
-- the task it created. A key is honoured for 24 hours; retention deletes it after that.
CREATE TABLE idempotency_keys (
    owner      text NOT NULL,
    key        text NOT NULL CHECK (key ~ '^[!-~]{1,255}$'),
    digest     bytea NOT NULL CHECK (length(digest) = 32),
    -- Checked at commit: the key is taken before its task is inserted.
    task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, key)
);

CREATE INDEX idempotency_keys_by_created_at ON idempotency_keys (created_at);
-- A deleted task's keys are found through this, not by a scan per task (retention's cascade).
CREATE INDEX idempotency_keys_by_task ON idempotency_keys (task_id);

-- end_attempt (migration 0006) now also writes the attempt's row. Refunded attempts: a
-- hand-back is `released`; a pick its agent never confirmed is `requeued` as well as one
-- whose lease ran out (both go back to the queue without a result).
CREATE OR REPLACE FUNCTION end_attempt(task uuid, fate attempt_fate, why text, released boolean)
RETURNS SETOF tasks
LANGUAGE sql VOLATILE AS $$
    INSERT INTO task_attempts (task_id, agent, started_at, running_at, finished_at, outcome,
                               error)
    SELECT t.id, t.agent, t.started_at, t.running_at, now(),
           CASE WHEN fate = 'refunded' AND released THEN 'released'
                WHEN fate IN ('refunded', 'requeued') THEN 'requeued'
                WHEN fate = 'cancelled' THEN 'cancelled'
                ELSE 'failed' END::attempt_outcome,
           CASE WHEN fate = 'refunded' AND NOT released THEN 'its agent never confirmed the pick'
                WHEN fate = 'requeued' THEN 'its lease ran out; agent lost'
                ELSE why END
      FROM tasks t
     WHERE t.id = task AND t.status = 'in_progress';

    DELETE FROM task_output
     WHERE task_id = task AND fate IN ('refunded', 'requeued');

    UPDATE tasks t SET
        status = CASE WHEN fate IN ('refunded', 'requeued') THEN 'queued'
                      WHEN fate = 'cancelled' THEN 'cancelled'
                      ELSE 'failed' END::task_status,
        finished_at = CASE WHEN fate IN ('refunded', 'requeued') THEN NULL ELSE now() END,
        started_at = CASE WHEN fate IN ('refunded', 'requeued') THEN NULL ELSE t.started_at END,
        running_at = CASE WHEN fate IN ('refunded', 'requeued') THEN NULL ELSE t.running_at END,
        agent = CASE WHEN fate IN ('refunded', 'requeued') THEN NULL ELSE t.agent END,
        lease = CASE WHEN fate IN ('refunded', 'requeued') THEN NULL ELSE t.lease END,
        lease_expires_at = NULL,
        attempts = CASE WHEN fate = 'refunded' THEN t.attempts - 1 ELSE t.attempts END,
        stdout_bytes = CASE WHEN fate IN ('refunded', 'requeued') THEN 0 ELSE t.stdout_bytes END,
        stderr_bytes = CASE WHEN fate IN ('refunded', 'requeued') THEN 0 ELSE t.stderr_bytes END,
        error = why,
        releases = CASE WHEN released THEN t.releases + 1 ELSE t.releases END,
        lost_picks = CASE WHEN fate = 'refunded' AND NOT released
                          THEN t.lost_picks + 1 ELSE t.lost_picks END
     WHERE t.id = task AND t.status = 'in_progress'
    RETURNING t.*;
$$;
