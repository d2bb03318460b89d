-- How an attempt can end other than by its agent's finish, written once in the database for
-- every caller (the reaper, a draining agent's hand-back):
--   refunded   back to the queue, the attempt given back (a pick its agent never confirmed, a
--              hand-back), its output cleared;
--   requeued   back to the queue, the attempt counted, its output cleared;
--   cancelled  its abort was requested: cancelled, output kept;
--   lost       its lease expired on the last attempt: failed, "agent lost";
--   timed_out  still running past timeout + grace + lease: failed;
--   exhausted  handed back too often: failed.

CREATE TYPE attempt_fate AS ENUM
    ('refunded', 'requeued', 'cancelled', 'lost', 'timed_out', 'exhausted');

-- Ends the current attempt of task `task` with `fate`; `why` becomes the task's error (NULL for
-- the fates that queue it again). `released` says the agent handed the task back (counted in
-- `releases`); otherwise a refund is a pick never confirmed (counted in `lost_picks`). The
-- caller must hold the row's lock (FOR UPDATE) and have checked that the attempt is current.
CREATE FUNCTION end_attempt(task uuid, fate attempt_fate, why text, released boolean)
RETURNS SETOF tasks
LANGUAGE sql VOLATILE AS $$
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
