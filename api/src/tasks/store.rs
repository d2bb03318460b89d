//! All SQL about tasks. Each function is one short statement: no transaction is ever held
//! open while a command runs, and every agent write is fenced by the lease in its WHERE clause.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, QueryBuilder};
use uuid::Uuid;

use super::model::{task_columns, Outcome, Task, TaskStatus};

/// The channel that carries "a task may be queued" hints. Payload-free: a hint only says
/// "look", the claim decides what there is.
macro_rules! channel {
    () => {
        "taskexec_tasks"
    };
}
pub const CHANNEL: &str = channel!();

/// The channel that carries abort requests; the payload is the task id.
macro_rules! abort_channel {
    () => {
        "taskexec_aborts"
    };
}
pub const ABORT_CHANNEL: &str = abort_channel!();

pub async fn insert(pool: &PgPool, command: &str, timeout_secs: u32) -> sqlx::Result<Task> {
    let sql = concat!(
        "INSERT INTO tasks (id, command, timeout_secs) VALUES ($1, $2, $3) RETURNING ",
        task_columns!()
    );
    sqlx::query_as(sql)
        .bind(Uuid::new_v4())
        .bind(command)
        .bind(timeout_secs as i32)
        .fetch_one(pool)
        .await
}

pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Task>> {
    let sql = concat!("SELECT ", task_columns!(), " FROM tasks WHERE id = $1");
    sqlx::query_as(sql).bind(id).fetch_optional(pool).await
}

/// Newest first: tasks with `seq` below `before`, optionally of one status.
pub async fn list(
    pool: &PgPool,
    status: Option<TaskStatus>,
    before: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<Task>> {
    // Built per shape rather than with `$1 IS NULL OR ...`, so every shape gets a plan that
    // uses its index.
    let mut query =
        QueryBuilder::new(concat!("SELECT ", task_columns!(), " FROM tasks WHERE true"));
    if let Some(status) = status {
        query.push(" AND status = ").push_bind(status);
    }
    if let Some(before) = before {
        query.push(" AND seq < ").push_bind(before);
    }
    query.push(" ORDER BY seq DESC LIMIT ").push_bind(limit);
    query.build_query_as().fetch_all(pool).await
}

/// A task claimed for the waiter at `slot` (0-based) of the batch.
#[derive(Debug, sqlx::FromRow)]
pub struct Claimed {
    #[sqlx(flatten)]
    pub task: Task,
    pub lease: Uuid,
    pub lease_expires_at: DateTime<Utc>,
    pub slot: i64,
}

/// Claims up to `agents.len()` queued tasks in one statement, oldest first, and assigns the
/// oldest to `agents[0]`, the next to `agents[1]`, and so on, each with a lease of
/// `lease_secs`. Rows that another claimer holds are skipped, never waited for, so concurrent
/// claimers never receive the same task.
pub async fn claim(
    pool: &PgPool,
    agents: &[String],
    lease_secs: u32,
) -> sqlx::Result<Vec<Claimed>> {
    // FOR UPDATE cannot sit beside a window function, hence the inner `locked` query.
    let sql = concat!(
        "WITH locked AS (
             SELECT id, seq FROM tasks WHERE status = 'queued'
             ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED
         ),
         numbered AS (SELECT id, row_number() OVER (ORDER BY seq) AS slot FROM locked),
         waiters AS (SELECT agent, slot FROM unnest($1::text[]) WITH ORDINALITY AS w(agent, slot))
         UPDATE tasks t
            SET status = 'in_progress', started_at = now(), attempts = t.attempts + 1,
                lease = gen_random_uuid(), agent = waiters.agent,
                lease_expires_at = now() + $3 * interval '1 second'
           FROM numbered JOIN waiters USING (slot)
          WHERE t.id = numbered.id
         RETURNING ",
        task_columns!("t."),
        ", t.lease, t.lease_expires_at, numbered.slot - 1 AS slot"
    );
    let mut claimed: Vec<Claimed> = sqlx::query_as(sql)
        .bind(agents)
        .bind(agents.len() as i64)
        .bind(lease_secs as f64)
        .fetch_all(pool)
        .await?;
    claimed.sort_by_key(|c| c.slot);
    Ok(claimed)
}

/// Hands a task back to the queue as if this attempt had never happened (it does not count
/// towards `max_attempts`): an agent that is draining, or a pick that left before its task
/// could be delivered. Fenced by the lease. A task whose abort was requested is cancelled
/// instead, since that is what its user asked for.
pub async fn release(pool: &PgPool, id: Uuid, lease: Uuid) -> sqlx::Result<Option<Task>> {
    let requeue = concat!(
        "UPDATE tasks SET status = 'queued', started_at = NULL, running_at = NULL, agent = NULL,
                lease = NULL, lease_expires_at = NULL, attempts = attempts - 1
          WHERE id = $1 AND lease = $2 AND status = 'in_progress' AND abort_requested_at IS NULL
         RETURNING ",
        task_columns!()
    );
    if let Some(task) = sqlx::query_as(requeue).bind(id).bind(lease).fetch_optional(pool).await? {
        return Ok(Some(task));
    }
    let cancel = concat!(
        "UPDATE tasks SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL,
                error = 'aborted before it ran to the end'
          WHERE id = $1 AND lease = $2 AND status = 'in_progress'
            AND abort_requested_at IS NOT NULL
         RETURNING ",
        task_columns!()
    );
    sqlx::query_as(cancel).bind(id).bind(lease).fetch_optional(pool).await
}

/// Extends the lease of the current attempt by `lease_secs` and says whether an abort is
/// pending. `None` when the lease is not current (the agent has been fenced off).
pub async fn heartbeat(
    pool: &PgPool,
    id: Uuid,
    lease: Uuid,
    lease_secs: u32,
) -> sqlx::Result<Option<(bool, DateTime<Utc>)>> {
    sqlx::query_as(
        "UPDATE tasks SET lease_expires_at = now() + $3 * interval '1 second',
                running_at = coalesce(running_at, now())
          WHERE id = $1 AND lease = $2 AND status = 'in_progress'
         RETURNING abort_requested_at IS NOT NULL, lease_expires_at",
    )
    .bind(id)
    .bind(lease)
    .bind(lease_secs as f64)
    .fetch_optional(pool)
    .await
}

/// What an abort did.
pub enum Aborted {
    /// A queued task, now cancelled.
    Cancelled(Task),
    /// A running task, whose agent is told through its heartbeat.
    Requested(Task),
}

/// Cancels a queued task, or marks a running one for abort and notifies every API process
/// (the notification reaches them when the statement commits). `None` when the task is
/// neither queued nor running.
pub async fn abort(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Aborted>> {
    let cancel = concat!(
        "UPDATE tasks SET status = 'cancelled', finished_at = now()
          WHERE id = $1 AND status = 'queued' RETURNING ",
        task_columns!()
    );
    if let Some(task) = sqlx::query_as(cancel).bind(id).fetch_optional(pool).await? {
        return Ok(Some(Aborted::Cancelled(task)));
    }
    let request = concat!(
        "WITH requested AS (
             UPDATE tasks SET abort_requested_at = coalesce(abort_requested_at, now())
              WHERE id = $1 AND status = 'in_progress' RETURNING *
         )
         SELECT ",
        task_columns!(),
        " FROM requested, pg_notify('",
        abort_channel!(),
        "', requested.id::text)"
    );
    let task = sqlx::query_as(request).bind(id).fetch_optional(pool).await?;
    Ok(task.map(Aborted::Requested))
}

/// Records the result of the attempt that `outcome.lease` identifies, if it is still the
/// current, unfinished one. `None` means nothing was written.
pub async fn finish(pool: &PgPool, id: Uuid, outcome: &Outcome) -> sqlx::Result<Option<Task>> {
    let sql = concat!(
        "UPDATE tasks
            SET status = CASE WHEN $10 AND abort_requested_at IS NOT NULL
                              THEN 'cancelled'::task_status ELSE $3 END,
                exit_code = $4, error = $5, stdout = $6, stderr = $7,
                stdout_lossy = $8, stderr_lossy = $9, finished_at = now(),
                lease_expires_at = NULL
          WHERE id = $1 AND lease = $2 AND status = 'in_progress'
         RETURNING ",
        task_columns!()
    );
    sqlx::query_as(sql)
        .bind(id)
        .bind(outcome.lease)
        .bind(outcome.status)
        .bind(outcome.exit_code)
        .bind(&outcome.error)
        .bind(&outcome.stdout)
        .bind(&outcome.stderr)
        .bind(outcome.stdout_lossy)
        .bind(outcome.stderr_lossy)
        .bind(outcome.aborted)
        .fetch_optional(pool)
        .await
}

/// The task and its current lease, to explain why a fenced write changed nothing.
pub async fn get_with_lease(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<(Task, Option<Uuid>)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        task: Task,
        lease: Option<Uuid>,
    }
    let sql = concat!("SELECT ", task_columns!(), ", lease FROM tasks WHERE id = $1");
    let row: Option<Row> = sqlx::query_as(sql).bind(id).fetch_optional(pool).await?;
    Ok(row.map(|r| (r.task, r.lease)))
}

/// Tells every listening API process that a task may be waiting.
pub async fn notify(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query(concat!("NOTIFY ", channel!())).execute(pool).await.map(|_| ())
}

/// What one reaper pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Expired leases whose task went back to the queue.
    pub requeued: u64,
    /// Expired leases on the last allowed attempt: failed, "agent lost".
    pub lost: u64,
    /// Expired leases of tasks whose abort was requested: cancelled.
    pub cancelled: u64,
    /// Tasks still running past timeout + grace + lease: failed, "timed out".
    pub timed_out: u64,
}

/// One pass of the reaper: three short statements, each over rows that no one else holds
/// (SKIP LOCKED), so that reapers in several API processes handle each expiry once.
/// `overrun_secs` is how far past its timeout a running task may go (grace + lease).
pub async fn reap(pool: &PgPool, max_attempts: u32, overrun_secs: u32) -> sqlx::Result<Reaped> {
    let timed_out = sqlx::query(
        "UPDATE tasks SET status = 'failed', finished_at = now(), lease_expires_at = NULL,
                error = 'timed out after ' || timeout_secs || ' s; its agent did not stop it'
          WHERE id IN (SELECT id FROM tasks
                        WHERE status = 'in_progress'
                          AND started_at + (timeout_secs + $1) * interval '1 second' < now()
                        FOR UPDATE SKIP LOCKED)",
    )
    .bind(overrun_secs as f64)
    .execute(pool)
    .await?
    .rows_affected();
    let given_up: Vec<(TaskStatus,)> = sqlx::query_as(
        "UPDATE tasks
            SET status = CASE WHEN abort_requested_at IS NULL THEN 'failed'
                              ELSE 'cancelled' END::task_status,
                error = CASE WHEN abort_requested_at IS NULL THEN 'agent lost'
                             ELSE 'aborted; its agent was lost' END,
                finished_at = now(), lease_expires_at = NULL
          WHERE id IN (SELECT id FROM tasks
                        WHERE status = 'in_progress' AND lease_expires_at < now()
                          AND (attempts >= $1 OR abort_requested_at IS NOT NULL)
                        FOR UPDATE SKIP LOCKED)
         RETURNING status",
    )
    .bind(max_attempts as i32)
    .fetch_all(pool)
    .await?;
    let requeued = sqlx::query(
        "UPDATE tasks SET status = 'queued', started_at = NULL, running_at = NULL, agent = NULL,
                lease = NULL, lease_expires_at = NULL
          WHERE id IN (SELECT id FROM tasks
                        WHERE status = 'in_progress' AND lease_expires_at < now()
                          AND attempts < $1 AND abort_requested_at IS NULL
                        FOR UPDATE SKIP LOCKED)",
    )
    .bind(max_attempts as i32)
    .execute(pool)
    .await?
    .rows_affected();
    let cancelled = given_up.iter().filter(|(s,)| *s == TaskStatus::Cancelled).count() as u64;
    Ok(Reaped { requeued, lost: given_up.len() as u64 - cancelled, cancelled, timed_out })
}
