-- Live output. While a command runs its agent uploads what it prints, in chunks at absolute byte
-- offsets of each stream. Each stream keeps its first half (offsets below max_output_bytes / 2)
-- and a window of its latest bytes; chunks in between are deleted, and an agent may skip bytes it
-- never sent (a flood), so offsets can jump. `seq` orders the chunks of both streams as they
-- arrived, for the combined log.

CREATE TYPE output_stream AS ENUM ('stdout', 'stderr');

CREATE TABLE task_output (
    task_id uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    stream  output_stream NOT NULL,
    start   bigint NOT NULL CHECK (start >= 0),
    data    bytea NOT NULL CHECK (length(data) > 0),
    seq     bigint GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (task_id, stream, start)
);

CREATE INDEX task_output_by_seq ON task_output (task_id, seq);

ALTER TABLE tasks
    -- Bytes each stream has produced so far, as uploaded (dropped ones included).
    ADD COLUMN stdout_bytes bigint NOT NULL DEFAULT 0 CHECK (stdout_bytes >= 0),
    ADD COLUMN stderr_bytes bigint NOT NULL DEFAULT 0 CHECK (stderr_bytes >= 0),
    -- The stream was longer than max_output_bytes: its middle was dropped, with a marker.
    ADD COLUMN stdout_truncated boolean NOT NULL DEFAULT false,
    ADD COLUMN stderr_truncated boolean NOT NULL DEFAULT false;
