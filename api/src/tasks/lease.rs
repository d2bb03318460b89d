//! The lease of an attempt, as a value: the task and the token a pick handed out. Its methods
//! are the only writes to a running attempt, and each is fenced by the token in its WHERE
//! clause, so that an agent whose lease is no longer current changes nothing. (Output uploads,
//! the other fenced write, take a `&Lease` too: see `output::store::append`.)

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use taskexec_protocol::output::OutputText;
use taskexec_protocol::{LeaseToken, Task, TaskId, TaskStatus};

use super::model::Outcome;
use super::store::{self, task_from, Env};
use crate::db::{DbError, Op};
use sqlx::types::Json;

/// The capability to write to one attempt of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub task: TaskId,
    pub token: LeaseToken,
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Copy)]
pub struct Beat {
    /// A user asked to abort the task.
    pub abort: bool,
    pub lease_expires_at: DateTime<Utc>,
}

impl Lease {
    /// Extends the lease by `lease_secs` and says whether an abort is pending; the first
    /// heartbeat also records that the command runs. `None` when the lease is not current.
    pub async fn heartbeat(&self, pool: &PgPool, lease_secs: u32) -> Result<Option<Beat>, DbError> {
        let row = sqlx::query!(
            r#"UPDATE tasks SET lease_expires_at = now() + $3 * interval '1 second',
                      running_at = coalesce(running_at, now())
                WHERE id = $1 AND lease = $2 AND status = 'in_progress'
               RETURNING abort_requested_at IS NOT NULL AS "abort!",
                         lease_expires_at AS "lease_expires_at!""#,
            self.task as TaskId,
            self.token as LeaseToken,
            f64::from(lease_secs),
        )
        .fetch_optional(pool)
        .await
        .op("extend a lease")?;
        Ok(row.map(|row| Beat { abort: row.abort, lease_expires_at: row.lease_expires_at }))
    }

    /// Records the outcome of the attempt with the output's texts, if it is still the current,
    /// unfinished one and its uploads are exactly `lengths` long (they were checked against
    /// them; an upload since then leaves the finish to be tried again). `None` means nothing
    /// was written.
    /// `ended` is the event announcing the attempt's end to the other API processes, all but
    /// the task id (see `Dispatcher::event_prefix`): sent by the same statement, on its commit,
    /// rather than by a statement of its own.
    pub async fn finish(
        &self,
        pool: &PgPool,
        outcome: &Outcome,
        [stdout, stderr]: &[OutputText; 2],
        lengths: [u64; 2],
        ended: &str,
    ) -> Result<Option<Task>, DbError> {
        let [stdout_bytes, stderr_bytes] = lengths.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        // A failed command (non-zero exit code, timeout) with retries left goes back to the
        // queue, after retry_backoff_secs × 2^(retry - 1), at most an hour, less up to a fifth
        // at random so that tasks that failed together do not all come back together.
        let row = sqlx::query!(
            r#"WITH current AS (
                   SELECT id, agent, started_at,
                          $3 AND abort_requested_at IS NOT NULL AS cancelled,
                          abort_requested_at IS NULL AND retries < max_retries
                              AND (coalesce($5 <> 0, false) OR $16) AS retry
                     FROM tasks
                    WHERE id = $1 AND lease = $2 AND status = 'in_progress'
                      AND stdout_bytes = $13 AND stderr_bytes = $14
                      FOR UPDATE
               ),
               attempt AS (
                   INSERT INTO task_attempts (task_id, agent, started_at, running_at,
                                              finished_at, outcome, exit_code, error)
                   SELECT c.id, c.agent, c.started_at,
                          coalesce(t.running_at,
                              CASE WHEN $15::float8 IS NOT NULL
                                   THEN greatest(t.started_at,
                                                 now() - $15 * interval '1 millisecond')
                              END),
                          now(),
                          CASE WHEN c.retry THEN 'retried'
                               WHEN c.cancelled THEN 'cancelled'
                               WHEN $4 = 'finished'::task_status THEN 'finished'
                               ELSE 'failed' END::attempt_outcome,
                          $5, $6
                     FROM current c JOIN tasks t USING (id)
               ),
               cleared AS (
                   DELETE FROM task_output WHERE task_id IN (SELECT id FROM current WHERE retry)
               )
               UPDATE tasks t SET
                      status = CASE WHEN c.retry THEN 'queued'::task_status
                                    WHEN c.cancelled THEN 'cancelled'::task_status
                                    ELSE $4 END,
                      exit_code = CASE WHEN c.retry THEN NULL ELSE $5 END,
                      error = CASE WHEN c.retry THEN NULL ELSE $6 END,
                      stdout = CASE WHEN c.retry THEN NULL ELSE $7 END,
                      stdout_lossy = $8 AND NOT c.retry,
                      stdout_truncated = $9 AND NOT c.retry,
                      stderr = CASE WHEN c.retry THEN NULL ELSE $10 END,
                      stderr_lossy = $11 AND NOT c.retry,
                      stderr_truncated = $12 AND NOT c.retry,
                      stdout_bytes = CASE WHEN c.retry THEN 0 ELSE t.stdout_bytes END,
                      stderr_bytes = CASE WHEN c.retry THEN 0 ELSE t.stderr_bytes END,
                      finished_at = CASE WHEN c.retry THEN NULL ELSE now() END,
                      lease_expires_at = NULL,
                      started_at = CASE WHEN c.retry THEN NULL ELSE t.started_at END,
                      agent = CASE WHEN c.retry THEN NULL ELSE t.agent END,
                      lease = CASE WHEN c.retry THEN NULL ELSE t.lease END,
                      retries = t.retries + c.retry::int,
                      run_at = CASE WHEN c.retry
                                    THEN now() + least(3600, t.retry_backoff_secs
                                                             * power(2, t.retries))
                                                 * (1 - 0.2 * random()) * interval '1 second'
                                    ELSE t.run_at END,
                      running_at = CASE WHEN c.retry THEN NULL ELSE coalesce(t.running_at,
                          CASE WHEN $15::float8 IS NOT NULL
                               THEN greatest(t.started_at, now() - $15 * interval '1 millisecond')
                          END) END
                 FROM current c
                WHERE t.id = c.id
               RETURNING t.id AS "id: TaskId", t.command, t.status AS "status: TaskStatus",
                         t.created_at, t.started_at, t.running_at, t.finished_at, t.exit_code,
                         t.stdout, t.stderr, t.stdout_lossy, t.stderr_lossy, t.stdout_truncated,
                         t.stderr_truncated, t.stdout_bytes, t.stderr_bytes, t.error, t.agent,
                         t.attempts, t.timeout_secs, t.abort_requested_at, t.owner,
                         t.aborted_by, t.tags, t.priority, t.run_at, t.max_retries,
                         t.retry_backoff_secs, t.retries, t.env AS "env: Json<Env>", t.cwd,
                         pg_notify($17, $18 || t.id::text) IS NOT NULL AS "notified!""#,
            self.task as TaskId,
            self.token as LeaseToken,
            outcome.aborted,
            outcome.status as TaskStatus,
            outcome.exit_code,
            outcome.error,
            stdout.text,
            stdout.lossy,
            stdout.truncated,
            stderr.text,
            stderr.lossy,
            stderr.truncated,
            stdout_bytes,
            stderr_bytes,
            outcome.started_ms_ago.map(|ms| ms as f64),
            outcome.timed_out,
            store::EVENTS_CHANNEL,
            ended,
        )
        .fetch_optional(pool)
        .await
        .op("record a finish")?;
        Ok(row.map(|row| task_from!(row)))
    }

    /// Hands the task back to the queue: an agent that is draining. The attempt is refunded up
    /// to `max_attempts` times per task; past that it counts, and a task out of attempts fails,
    /// so a command that makes its agent hand it back cannot loop forever. A task whose abort
    /// was requested is cancelled instead, since that is what its user asked for.
    pub async fn release(&self, pool: &PgPool, max_attempts: u32) -> Result<Option<Task>, DbError> {
        let row = sqlx::query!(
            r#"WITH current AS (
                   SELECT id,
                          CASE WHEN abort_requested_at IS NOT NULL THEN 'cancelled'
                               WHEN releases < $3 THEN 'refunded'
                               WHEN attempts - retries < $3 THEN 'requeued'
                               ELSE 'exhausted' END::attempt_fate AS fate
                     FROM tasks WHERE id = $1 AND lease = $2 AND status = 'in_progress'
                      FOR UPDATE
               )
               SELECT t.id AS "id!: TaskId", t.command AS "command!",
                      t.status AS "status!: TaskStatus", t.created_at AS "created_at!",
                      t.started_at, t.running_at, t.finished_at, t.exit_code, t.stdout, t.stderr,
                      t.stdout_lossy AS "stdout_lossy!", t.stderr_lossy AS "stderr_lossy!",
                      t.stdout_truncated AS "stdout_truncated!",
                      t.stderr_truncated AS "stderr_truncated!",
                      t.stdout_bytes AS "stdout_bytes!", t.stderr_bytes AS "stderr_bytes!",
                      t.error, t.agent, t.attempts AS "attempts!",
                      t.timeout_secs AS "timeout_secs!", t.abort_requested_at, t.owner,
                      t.aborted_by, t.tags AS "tags!", t.priority AS "priority!", t.run_at,
                      t.max_retries AS "max_retries!", t.retry_backoff_secs AS "retry_backoff_secs!",
                      t.retries AS "retries!", t.env AS "env!: Json<Env>", t.cwd
                 FROM current,
                      LATERAL end_attempt(current.id, current.fate,
                          CASE current.fate
                              WHEN 'cancelled' THEN 'aborted before it ran to the end'
                              WHEN 'exhausted' THEN 'handed back by its agents too often'
                          END, true) AS t"#,
            self.task as TaskId,
            self.token as LeaseToken,
            max_attempts as i32,
        )
        .fetch_optional(pool)
        .await
        .op("hand a task back")?;
        Ok(row.map(|row| task_from!(row)))
    }

    /// Undoes a claim whose pick had gone before the task reached it: the task is queued again
    /// as if it had never been picked. False when the attempt has moved on (the agent got it
    /// after all and confirmed it, or an abort came first).
    pub async fn unclaim(&self, db: impl PgExecutor<'_>) -> Result<bool, DbError> {
        let done = sqlx::query!(
            "UPDATE tasks SET status = 'queued', started_at = NULL, agent = NULL, lease = NULL,
                    lease_expires_at = NULL, attempts = attempts - 1
              WHERE id = $1 AND lease = $2 AND status = 'in_progress' AND running_at IS NULL
                AND abort_requested_at IS NULL",
            self.task as TaskId,
            self.token as LeaseToken,
        )
        .execute(db)
        .await
        .op("put back an undelivered pick")?;
        Ok(done.rows_affected() == 1)
    }
}
