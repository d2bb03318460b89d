-- Retention deletes the tasks that ended more than `retention_days` ago, oldest end first, a
-- batch at a time: this index finds them without a scan of the table (an ended task enters it
-- once, when it ends), and stops at the first one still kept.
CREATE INDEX tasks_ended_by_finished_at ON tasks (finished_at)
    WHERE status IN ('finished', 'failed', 'cancelled');
