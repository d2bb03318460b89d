-- The task queue: one row per submitted shell command, from queued to a terminal state.
--
-- The state machine lives here, not only in Rust: every writer (any API process, any version)
-- is held to the same rules by the CHECK constraints below, and every agent write is fenced by
-- the lease in its WHERE clause.

CREATE TYPE task_status AS ENUM ('queued', 'in_progress', 'finished', 'failed', 'cancelled');

CREATE TABLE tasks (
    id           uuid PRIMARY KEY,
    -- Creation order without ties (created_at can repeat within a microsecond). Picks take the
    -- lowest queued seq; list pages walk it downwards; a requeued task keeps its place.
    seq          bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    command      text NOT NULL CHECK (btrim(command) <> ''),
    status       task_status NOT NULL DEFAULT 'queued',
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- When the current (or last) attempt was picked.
    started_at   timestamptz,
    finished_at  timestamptz,
    exit_code    integer CHECK (exit_code BETWEEN 0 AND 255),
    stdout       text,
    stderr       text,
    -- The agent could not report the bytes as they were (not UTF-8, or NUL bytes, which
    -- PostgreSQL text cannot hold) and replaced them with U+FFFD.
    stdout_lossy boolean NOT NULL DEFAULT false,
    stderr_lossy boolean NOT NULL DEFAULT false,
    -- Why a task failed: it could not start, a signal killed it, and so on.
    error        text,
    -- The name the agent gave in X-Agent-Name when it picked the task.
    agent        text,
    -- How many times the task was handed to an agent.
    attempts     integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- A fresh random token per pick. Only its holder may report on the attempt; it stays after
    -- the finish so that a retried finish can be recognised and answered idempotently.
    lease        uuid,

    CONSTRAINT queued_is_unassigned CHECK (
        status <> 'queued'
        OR (started_at IS NULL AND finished_at IS NULL AND lease IS NULL AND agent IS NULL
            AND exit_code IS NULL AND error IS NULL)),
    CONSTRAINT in_progress_is_leased CHECK (
        status <> 'in_progress'
        OR (started_at IS NOT NULL AND lease IS NOT NULL AND agent IS NOT NULL
            AND finished_at IS NULL AND attempts > 0)),
    CONSTRAINT finished_has_exit_code CHECK (
        status <> 'finished'
        OR (exit_code IS NOT NULL AND error IS NULL AND started_at IS NOT NULL
            AND finished_at IS NOT NULL)),
    CONSTRAINT failed_has_error CHECK (
        status <> 'failed' OR (error IS NOT NULL AND exit_code IS NULL AND finished_at IS NOT NULL)),
    CONSTRAINT cancelled_has_finished_at CHECK (status <> 'cancelled' OR finished_at IS NOT NULL)
);

-- The claim reads only queued rows, oldest first. A partial index stays as small as the queue,
-- however many finished tasks the table holds.
CREATE INDEX tasks_queued_by_seq ON tasks (seq) WHERE status = 'queued';

-- GET /tasks?status=... walks one status newest first.
CREATE INDEX tasks_status_seq ON tasks (status, seq);
