-- The agent registry behind GET /agents: one row per name an agent gave in X-Agent-Name. Each
-- API process writes its sightings in batches (at most one statement per few seconds, for all
-- the agents it saw), never per request. Every time here is by the database's clock. Whether
-- an agent is busy comes from tasks, at read time; whether it is gone from these times.

CREATE TABLE agents (
    name            text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
    -- What it sent in X-Agent-Version, last time it sent one.
    version         text CHECK (length(version) BETWEEN 1 AND 64),
    first_seen_at   timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL CHECK (last_seen_at >= first_seen_at),
    -- The run of the agent last seen (X-Agent-Instance, drawn at each start), if it sends one.
    instance        uuid,
    -- Its exit, announced by POST /agents/leave: gone while no later sighting follows, and
    -- sightings of the run that left (its last requests, written late by another API
    -- process) are not later ones.
    left_at         timestamptz,
    left_instance   uuid,
    -- Tasks whose end it reported.
    tasks_finished  bigint NOT NULL DEFAULT 0 CHECK (tasks_finished >= 0)
);

-- GET /agents lists those seen in the last day.
CREATE INDEX agents_by_last_seen ON agents (last_seen_at);

CREATE TYPE agent_state AS ENUM ('idle', 'busy', 'gone');

-- Every agent seen in the last day, with its state and current task: written once, for
-- GET /agents and the metrics. Gone: it left and was not seen since, or was not seen for
-- longer than a lease. Busy: it holds the lease of a task in progress (found among those by
-- their partial index). Idle: neither.
CREATE FUNCTION agent_states(lease_secs integer)
RETURNS TABLE (name text, state agent_state, version text, first_seen_at timestamptz,
               last_seen_at timestamptz, current_task uuid, tasks_finished bigint)
LANGUAGE sql STABLE AS $$
    SELECT a.name,
           CASE WHEN a.left_at >= a.last_seen_at
                  OR a.last_seen_at < now() - make_interval(secs => lease_secs) THEN 'gone'
                WHEN t.id IS NOT NULL THEN 'busy'
                ELSE 'idle'
           END::agent_state,
           a.version, a.first_seen_at, a.last_seen_at, t.id, a.tasks_finished
      FROM agents a
      LEFT JOIN (SELECT DISTINCT ON (tasks.agent) tasks.agent, tasks.id
                   FROM tasks
                  WHERE tasks.status = 'in_progress'
                  ORDER BY tasks.agent, tasks.started_at DESC) t
        ON t.agent = a.name
     WHERE a.last_seen_at > now() - interval '1 day'
$$;
