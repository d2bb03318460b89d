-- The queue's figures for GET /metrics, shared by every API process: a scrape refreshes them
-- only when they are older than `metrics_refresh_secs`, so that the counting statements run
-- at most that often however many processes are scraped, and however often.

CREATE TABLE metrics_snapshot (
    -- One row only.
    id                  boolean PRIMARY KEY DEFAULT true CHECK (id),
    taken_at            timestamptz NOT NULL,
    queued              bigint NOT NULL CHECK (queued >= 0),
    in_progress         bigint NOT NULL CHECK (in_progress >= 0),
    -- Age in seconds of the oldest queued task; 0 when none is queued.
    oldest_queued_secs  double precision NOT NULL CHECK (oldest_queued_secs >= 0),
    -- In progress past their lease, or past their timeout plus the kill grace.
    stuck               bigint NOT NULL CHECK (stuck >= 0),
    -- Agents seen in the last day, by state (agent_states).
    agents_idle         bigint NOT NULL CHECK (agents_idle >= 0),
    agents_busy         bigint NOT NULL CHECK (agents_busy >= 0),
    agents_gone         bigint NOT NULL CHECK (agents_gone >= 0)
);

INSERT INTO metrics_snapshot
    (taken_at, queued, in_progress, oldest_queued_secs, stuck, agents_idle, agents_busy, agents_gone)
VALUES ('epoch', 0, 0, 0, 0, 0, 0, 0);
