//! All SQL about tasks. Each function is one short statement: no transaction is ever held
//! open while a command runs, and every agent write is fenced by the lease in its WHERE clause.

use std::collections::HashMap;

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

/// Inserts a queued task.
pub async fn insert(pool: &PgPool, command: &str, timeout_secs: u32) -> sqlx::Result<Task> {
    let new = NewRow { id: Uuid::new_v4(), command, timeout_secs };
    let mut made = insert_many(pool, &[new]).await?;
    made.pop().ok_or(sqlx::Error::RowNotFound)
}

/// A task to insert.
pub struct NewRow<'a> {
    pub id: Uuid,
    pub command: &'a str,
    pub timeout_secs: u32,
}

/// Inserts queued tasks in one statement, and returns them in the order given. Only what the
/// database generates comes back (the time and the creation order): echoing the rest, the
/// command above all, would only cost.
pub async fn insert_many(pool: &PgPool, rows: &[NewRow<'_>]) -> sqlx::Result<Vec<Task>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let commands: Vec<&str> = rows.iter().map(|r| r.command).collect();
    let timeouts: Vec<i32> = rows.iter().map(|r| r.timeout_secs as i32).collect();
    let generated: Vec<(Uuid, DateTime<Utc>, i64)> = sqlx::query_as(
        "INSERT INTO tasks (id, command, timeout_secs)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::int4[])
         RETURNING id, created_at, seq",
    )
    .bind(&ids)
    .bind(&commands)
    .bind(&timeouts)
    .fetch_all(pool)
    .await?;
    let generated: HashMap<Uuid, (DateTime<Utc>, i64)> =
        generated.into_iter().map(|(id, at, seq)| (id, (at, seq))).collect();
    rows.iter()
        .map(|row| {
            let &(created_at, seq) = generated.get(&row.id).ok_or(sqlx::Error::RowNotFound)?;
            Ok(Task::queued(row.id, row.command.to_owned(), row.timeout_secs, created_at, seq))
        })
        .collect()
}

pub async fn get(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Task>> {
    let sql = concat!("SELECT ", task_columns!(), " FROM tasks WHERE id = $1");
    sqlx::query_as(sql).bind(id).fetch_optional(pool).await
}

/// Newest first: tasks with `seq` below `before`, optionally of one status; without their
/// output (`stdout` and `stderr` are `None`).
pub async fn list(
    pool: &PgPool,
    status: Option<TaskStatus>,
    before: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<Task>> {
    // Built per shape rather than with `$1 IS NULL OR ...`, so every shape gets a plan that
    // uses its index.
    let mut query =
        QueryBuilder::new(concat!("SELECT ", task_columns!(summary), " FROM tasks WHERE true"));
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

/// Ends the current attempt of the tasks in a `fate` CTE (columns `id`, `fate`): `refunded`
/// and `requeued` go back to the queue as if never picked (`refunded` also gives the attempt
/// back) with their output cleared; `cancelled` is cancelled; any other fate fails the task.
/// Each caller adds its `error` and its counters. Shared by the reaper and the release so that
/// both leave a task in the same state for the same fate.
macro_rules! end_attempt {
    () => {
        "cleared AS (
             DELETE FROM task_output o USING fate
              WHERE o.task_id = fate.id AND fate.fate IN ('refunded', 'requeued')
         )
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
             stderr_bytes = CASE WHEN fate IN ('refunded', 'requeued') THEN 0 ELSE t.stderr_bytes END"
    };
}

/// Hands a task back to the queue: an agent that is draining. The attempt is refunded up to
/// `max_attempts` times per task; past that it counts, and a task out of attempts fails, so a
/// command that makes its agent hand it back cannot loop forever. A task whose abort was
/// requested is cancelled instead, since that is what its user asked for. Fenced by the lease.
pub async fn release(
    pool: &PgPool,
    id: Uuid,
    lease: Uuid,
    max_attempts: u32,
) -> sqlx::Result<Option<Task>> {
    let sql = concat!(
        "WITH fate AS (
             SELECT id,
                    CASE WHEN abort_requested_at IS NOT NULL THEN 'cancelled'
                         WHEN releases < $3 THEN 'refunded'
                         WHEN attempts < $3 THEN 'requeued'
                         ELSE 'exhausted' END AS fate
               FROM tasks WHERE id = $1 AND lease = $2 AND status = 'in_progress'
         ), ",
        end_attempt!(),
        ",
             error = CASE fate WHEN 'cancelled' THEN 'aborted before it ran to the end'
                               WHEN 'exhausted' THEN 'handed back by its agents too often'
                               ELSE NULL END,
             releases = t.releases + 1
           FROM fate WHERE t.id = fate.id
         RETURNING ",
        task_columns!("t.")
    );
    sqlx::query_as(sql).bind(id).bind(lease).bind(max_attempts as i32).fetch_optional(pool).await
}

/// Undoes a claim whose pick had gone before the task could be handed over: the task is
/// queued again as if it had never been picked. Fenced by the lease.
pub async fn unclaim(pool: &PgPool, id: Uuid, lease: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE tasks SET status = 'queued', started_at = NULL, agent = NULL, lease = NULL,
                lease_expires_at = NULL, attempts = attempts - 1
          WHERE id = $1 AND lease = $2 AND status = 'in_progress' AND running_at IS NULL
            AND abort_requested_at IS NULL",
    )
    .bind(id)
    .bind(lease)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
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
/// (the notification goes out when the statement commits). One statement, so that a task the
/// reaper requeues meanwhile is handled as what it is now. `None` when the task is neither
/// queued nor running.
pub async fn abort(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Aborted>> {
    let sql = concat!(
        "WITH aborted AS (
             UPDATE tasks SET
                 status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
                 finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
                 abort_requested_at = CASE WHEN status = 'in_progress'
                                           THEN coalesce(abort_requested_at, now()) END
              WHERE id = $1 AND status IN ('queued', 'in_progress')
             RETURNING *
         )
         SELECT ",
        task_columns!(),
        ", CASE WHEN status = 'in_progress' THEN pg_notify('",
        abort_channel!(),
        "', id::text) END IS NOT NULL AS notified FROM aborted"
    );
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        task: Task,
    }
    let row: Option<Row> = sqlx::query_as(sql).bind(id).fetch_optional(pool).await?;
    Ok(row.map(|Row { task }| match task.status {
        TaskStatus::Cancelled => Aborted::Cancelled(task),
        _ => Aborted::Requested(task),
    }))
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
                stdout_truncated = $13, stderr_truncated = $14,
                lease_expires_at = NULL
          WHERE id = $1 AND lease = $2 AND status = 'in_progress'
            AND ($11::bigint IS NULL OR stdout_bytes >= $11)
            AND ($12::bigint IS NULL OR stderr_bytes >= $12)
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
        .bind(outcome.stdout_bytes)
        .bind(outcome.stderr_bytes)
        .bind(outcome.stdout_truncated)
        .bind(outcome.stderr_truncated)
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
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Expired leases whose task went back to the queue.
    pub requeued: u64,
    /// Of those, picks never confirmed by their agent, whose attempt was refunded.
    pub refunded: u64,
    /// Expired leases on the last allowed attempt: failed, "agent lost".
    pub lost: u64,
    /// Expired leases of tasks whose abort was requested: cancelled.
    pub cancelled: u64,
    /// Tasks still running past timeout + grace + lease: failed, "timed out".
    pub timed_out: u64,
    /// Every task whose attempt the pass ended.
    pub ended: Vec<Uuid>,
}

/// One pass of the reaper, in one statement over running tasks that no one else holds (SKIP
/// LOCKED), so that reapers in several API processes handle each expiry once. A task is
/// failed when it overran its timeout by `overrun_secs` (grace plus lease), whatever its
/// lease; otherwise, once its lease has expired, it is cancelled if its abort was requested,
/// requeued with the attempt refunded if its agent never confirmed the pick (up to
/// `max_attempts` times), failed as "agent lost" on its last attempt, or else requeued.
pub async fn reap(pool: &PgPool, max_attempts: u32, overrun_secs: u32) -> sqlx::Result<Reaped> {
    let fates: Vec<(Uuid, String)> = sqlx::query_as(concat!(
        "WITH due AS (
             SELECT id, attempts, lost_picks, running_at, abort_requested_at,
                    started_at + (timeout_secs + $2) * interval '1 second' < now() AS overran
               FROM tasks
              WHERE status = 'in_progress'
                AND (lease_expires_at < now()
                     OR started_at + (timeout_secs + $2) * interval '1 second' < now())
              FOR UPDATE SKIP LOCKED
         ),
         fate AS (
             SELECT id,
                    CASE WHEN overran THEN 'timed_out'
                         WHEN abort_requested_at IS NOT NULL THEN 'cancelled'
                         WHEN running_at IS NULL AND lost_picks < $1 THEN 'refunded'
                         WHEN attempts >= $1 THEN 'lost'
                         ELSE 'requeued' END AS fate
               FROM due
         ), ",
        end_attempt!(),
        ",
             error = CASE fate
                         WHEN 'timed_out'
                         THEN 'timed out after ' || t.timeout_secs || ' s; its agent did not stop it'
                         WHEN 'cancelled' THEN 'aborted; its agent was lost'
                         WHEN 'lost' THEN 'agent lost'
                     END,
             lost_picks = CASE WHEN fate = 'refunded' THEN t.lost_picks + 1 ELSE t.lost_picks END
           FROM fate WHERE t.id = fate.id
         RETURNING t.id, fate"
    ))
    .bind(max_attempts as i32)
    .bind(overrun_secs as f64)
    .fetch_all(pool)
    .await?;
    let count = |name: &str| fates.iter().filter(|(_, fate)| fate == name).count() as u64;
    Ok(Reaped {
        ended: fates.iter().map(|(id, _)| *id).collect(),
        requeued: count("requeued") + count("refunded"),
        refunded: count("refunded"),
        lost: count("lost"),
        cancelled: count("cancelled"),
        timed_out: count("timed_out"),
    })
}
