-- Attempts that are not the command's fault are refunded, but only so often, so that nothing
-- can loop forever:
--   lost_picks: picks whose lease ran out before the agent's first heartbeat (the pick was
--               parked by an agent that had gone, or its response was lost);
--   releases:   hand-backs by draining agents.
-- Past max_attempts of either kind, they count like any other attempt.

ALTER TABLE tasks
    ADD COLUMN lost_picks integer NOT NULL DEFAULT 0 CHECK (lost_picks >= 0),
    ADD COLUMN releases   integer NOT NULL DEFAULT 0 CHECK (releases >= 0);
