//! All SQL about tasks but the fenced writes of an attempt (those are [`Lease`]'s). Each
//! function is one short statement, checked against the schema at compile time: no transaction
//! is ever held open while a command runs.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::types::Uuid;
use sqlx::{PgExecutor, PgPool};
use taskexec_protocol::{LeaseTerms, LeaseToken, NewTask, Task, TaskId, TaskStatus};

use super::lease::Lease;
use crate::db::{DbError, Op};

/// The channel that carries "a task may be queued" hints. Payload-free: a hint only says
/// "look", the claim decides what there is.
pub const CHANNEL: &str = "taskexec_tasks";

/// The channel that carries abort requests; the payload is the task id.
pub const ABORT_CHANNEL: &str = "taskexec_aborts";

/// Builds a `Task` from a row that has all of its columns (a `query!` record), so that
/// statements returning a task and something more share one conversion.
macro_rules! task_from {
    ($row:expr) => {
        Task {
            id: $row.id,
            command: $row.command,
            status: $row.status,
            created_at: $row.created_at,
            started_at: $row.started_at,
            running_at: $row.running_at,
            finished_at: $row.finished_at,
            exit_code: $row.exit_code,
            stdout: $row.stdout,
            stderr: $row.stderr,
            stdout_lossy: $row.stdout_lossy,
            stderr_lossy: $row.stderr_lossy,
            stdout_truncated: $row.stdout_truncated,
            stderr_truncated: $row.stderr_truncated,
            stdout_bytes: $row.stdout_bytes,
            stderr_bytes: $row.stderr_bytes,
            error: $row.error,
            agent: $row.agent,
            attempts: $row.attempts,
            timeout_secs: $row.timeout_secs,
            abort_requested_at: $row.abort_requested_at,
            owner: $row.owner,
            aborted_by: $row.aborted_by,
            command_truncated: false,
        }
    };
}
pub(crate) use task_from;

/// A new task as inserted: queued, with the table's defaults.
fn queued(id: TaskId, row: &NewRow<'_>, created_at: DateTime<Utc>) -> Task {
    Task {
        id,
        command: row.task.command.clone(),
        status: TaskStatus::Queued,
        created_at,
        started_at: None,
        running_at: None,
        finished_at: None,
        exit_code: None,
        stdout: None,
        stderr: None,
        stdout_lossy: false,
        stderr_lossy: false,
        stdout_truncated: false,
        stderr_truncated: false,
        stdout_bytes: 0,
        stderr_bytes: 0,
        error: None,
        agent: None,
        attempts: 0,
        timeout_secs: row.timeout_secs as i32,
        abort_requested_at: None,
        owner: Some(row.owner.to_owned()),
        aborted_by: None,
        command_truncated: false,
    }
}

/// A task to insert, with its timeout and its owner decided.
pub struct NewRow<'a> {
    pub task: &'a NewTask,
    pub timeout_secs: u32,
    pub owner: &'a str,
}

/// Inserts queued tasks in one statement, and returns them in the order given. Only what the
/// database generates comes back (the time): echoing the rest, the command above all, would
/// only cost. No quota is checked here (see `insert_within_quota`). `created_at` is the time
/// of the insert, not of its transaction's start: a quota's count before it is not the task's.
pub async fn insert_many(
    db: impl PgExecutor<'_>,
    rows: &[NewRow<'_>],
) -> Result<Vec<Task>, DbError> {
    let ids: Vec<TaskId> = rows.iter().map(|_| TaskId::random()).collect();
    let uuids: Vec<_> = ids.iter().map(|id| *id.as_uuid()).collect();
    let commands: Vec<&str> = rows.iter().map(|r| r.task.command.as_str()).collect();
    let timeouts: Vec<i32> = rows.iter().map(|r| r.timeout_secs as i32).collect();
    let owners: Vec<&str> = rows.iter().map(|r| r.owner).collect();
    let generated = sqlx::query!(
        r#"INSERT INTO tasks (id, command, timeout_secs, owner, created_at)
           SELECT *, clock_timestamp() FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[])
           RETURNING id AS "id: TaskId", created_at"#,
        &uuids,
        &commands as &[&str],
        &timeouts,
        &owners as &[&str],
    )
    .fetch_all(db)
    .await
    .op("insert tasks")?;
    let created: HashMap<TaskId, DateTime<Utc>> =
        generated.into_iter().map(|row| (row.id, row.created_at)).collect();
    ids.iter()
        .zip(rows)
        .map(|(id, row)| {
            let created_at = created.get(id).copied().ok_or(sqlx::Error::RowNotFound);
            Ok(queued(*id, row, created_at.op("insert tasks")?))
        })
        .collect()
}

/// What an insert within a quota did.
#[derive(Debug)]
pub struct WithinQuota {
    /// The tasks inserted: the first of those given, as many as the owner had room for.
    pub inserted: Vec<Task>,
    /// The room left that this process may fill without counting, until `GRANT_SECS`.
    pub granted: u64,
}

/// How long a grant holds in the database. The process that got it stops using it well
/// before (`intake::RECOUNT`), so that an insert started under it commits before it lapses.
pub const GRANT_SECS: f64 = 4.0;

/// Inserts as many of `rows`, all of one `owner`, as fit within `max` queued tasks, first
/// first, and grants `process` up to `wanted` of the room left, at most half of it. One short
/// transaction: a lock on the owner's quota (shared by every API process) makes the counts of
/// one owner take turns; the count, in a statement that starts after the lock, sees every
/// insert that took its turn before. The other processes' grants count as filled whole, used
/// or not: what they used is among the queued tasks too, so near the quota this errs towards
/// refusing (for as long as a grant lasts), never towards passing it. (Lowering a grant with
/// each insert instead cost a third of the insert's speed: every batch updated one row.)
pub async fn insert_within_quota(
    pool: &PgPool,
    process: Uuid,
    owner: &str,
    rows: &[NewRow<'_>],
    max: u64,
    wanted: u64,
) -> Result<WithinQuota, DbError> {
    const OP: &str = "insert tasks within a quota";
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await.op(OP)?;
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended('taskexec-quota:' || $1, 0))",
        owner
    )
    .execute(&mut *tx)
    .await
    .op(OP)?;
    let taken = sqlx::query!(
        r#"WITH lapsed AS (DELETE FROM quota_grants WHERE owner = $1 AND until <= now())
           SELECT (SELECT count(*) FROM (
                       SELECT 1 FROM tasks WHERE owner = $1 AND status = 'queued' LIMIT $2
                   ) q) AS "queued!",
                  (SELECT coalesce(sum(tasks), 0) FROM quota_grants
                    WHERE owner = $1 AND process <> $3 AND until > now())::int8 AS "granted!""#,
        owner,
        limit,
        process,
    )
    .fetch_one(&mut *tx)
    .await
    .op(OP)?;
    let taken = u64::try_from(taken.queued.saturating_add(taken.granted)).unwrap_or(u64::MAX);
    let room = max.saturating_sub(taken);
    let fitting = &rows[..rows.len().min(usize::try_from(room).unwrap_or(usize::MAX))];
    let granted = ((room - fitting.len() as u64) / 2).min(wanted);
    sqlx::query!(
        r#"INSERT INTO quota_grants (owner, process, tasks, until)
           VALUES ($1, $2, $3, now() + $4 * interval '1 second')
           ON CONFLICT (owner, process) DO UPDATE SET tasks = excluded.tasks, until = excluded.until"#,
        owner,
        process,
        i64::try_from(granted).unwrap_or(i64::MAX),
        GRANT_SECS,
    )
    .execute(&mut *tx)
    .await
    .op(OP)?;
    let inserted =
        if fitting.is_empty() { Vec::new() } else { insert_many(&mut *tx, fitting).await? };
    tx.commit().await.op(OP)?;
    Ok(WithinQuota { inserted, granted })
}

/// Inserts one queued task owned by `owner`, without a quota (tests and tools; the API goes
/// through the intake).
pub async fn insert(
    pool: &PgPool,
    command: &str,
    timeout_secs: u32,
    owner: &str,
) -> Result<Task, DbError> {
    let new = NewTask::new(command);
    let row = NewRow { task: &new, timeout_secs, owner };
    let mut made = insert_many(pool, &[row]).await?;
    made.pop().ok_or(sqlx::Error::RowNotFound).op("insert a task")
}

/// The task, if it exists and `scope` (an owner, for a submitter) may see it.
pub async fn get(pool: &PgPool, id: TaskId, scope: Option<&str>) -> Result<Option<Task>, DbError> {
    sqlx::query_as!(
        Task,
        r#"SELECT id AS "id: TaskId", command, status AS "status: TaskStatus", created_at,
                  started_at, running_at, finished_at, exit_code, stdout, stderr, stdout_lossy,
                  stderr_lossy, stdout_truncated, stderr_truncated, stdout_bytes, stderr_bytes,
                  error, agent, attempts, timeout_secs, abort_requested_at, owner, aborted_by,
                  false AS "command_truncated!"
             FROM tasks WHERE id = $1 AND ($2::text IS NULL OR owner = $2)"#,
        id as TaskId,
        scope,
    )
    .fetch_optional(pool)
    .await
    .op("load a task")
}

/// A task of a list, and its place in creation order (the list cursor is made from it).
pub struct Listed {
    pub task: Task,
    pub seq: i64,
}

/// Newest first: tasks with `seq` below `before`, optionally of one status and of one owner;
/// without their output (`stdout` and `stderr` are `None`: they can weigh megabytes per
/// task) and with commands cut to `LISTED_COMMAND_CHARS` (the 1024 in the SQL). One statement per shape of the status filter, so that each gets a plan that uses
/// its index.
// The statements below cut commands at 1024 characters: the constant users read says so.
const _: () = assert!(taskexec_protocol::LISTED_COMMAND_CHARS == 1024);

pub async fn list(
    pool: &PgPool,
    status: Option<TaskStatus>,
    owner: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Listed>, DbError> {
    let before = before.unwrap_or(i64::MAX);
    macro_rules! listed {
        ($rows:expr) => {
            $rows
                .into_iter()
                .map(|row| {
                    let command_truncated = row.command_truncated;
                    let mut task = task_from!(row);
                    task.command_truncated = command_truncated;
                    Listed { seq: row.seq, task }
                })
                .collect()
        };
    }
    let Some(status) = status else {
        let rows = sqlx::query!(
            r#"SELECT id AS "id: TaskId", left(command, 1024) AS "command!",
                      char_length(command) > 1024 AS "command_truncated!",
                      status AS "status: TaskStatus", created_at,
                      started_at, running_at, finished_at, exit_code, NULL::text AS stdout,
                      NULL::text AS stderr, stdout_lossy, stderr_lossy, stdout_truncated,
                      stderr_truncated, stdout_bytes, stderr_bytes, error, agent, attempts,
                      timeout_secs, abort_requested_at, owner, aborted_by, seq
                 FROM tasks WHERE seq < $1 AND ($2::text IS NULL OR owner = $2)
                ORDER BY seq DESC LIMIT $3"#,
            before,
            owner,
            limit,
        )
        .fetch_all(pool)
        .await
        .op("list tasks")?;
        return Ok(listed!(rows));
    };
    let rows = sqlx::query!(
        r#"SELECT id AS "id: TaskId", left(command, 1024) AS "command!",
                  char_length(command) > 1024 AS "command_truncated!",
                  status AS "status: TaskStatus", created_at,
                  started_at, running_at, finished_at, exit_code, NULL::text AS stdout,
                  NULL::text AS stderr, stdout_lossy, stderr_lossy, stdout_truncated,
                  stderr_truncated, stdout_bytes, stderr_bytes, error, agent, attempts,
                  timeout_secs, abort_requested_at, owner, aborted_by, seq
             FROM tasks WHERE status = $1 AND seq < $2 AND ($3::text IS NULL OR owner = $3)
            ORDER BY seq DESC LIMIT $4"#,
        status as TaskStatus,
        before,
        owner,
        limit,
    )
    .fetch_all(pool)
    .await
    .op("list tasks of a status")?;
    Ok(listed!(rows))
}

/// A task claimed for the waiter at `slot` (0-based) of the batch, with its lease.
#[derive(Debug)]
pub struct Claimed {
    pub task: Task,
    pub lease: Lease,
    pub lease_expires_at: DateTime<Utc>,
    pub slot: usize,
}

/// Claims up to `agents.len()` queued tasks in one statement, oldest first, and assigns the
/// oldest to `agents[0]`, the next to `agents[1]`, and so on, each with a fresh lease on
/// `terms` (its length, and the output cap the attempt is kept by). Rows that another claimer
/// holds are skipped, never waited for, so concurrent claimers never receive the same task.
pub async fn claim(
    pool: &PgPool,
    agents: &[String],
    terms: &LeaseTerms,
) -> Result<Vec<Claimed>, DbError> {
    // FOR UPDATE cannot sit beside a window function, hence the inner `locked` query.
    let rows = sqlx::query!(
        r#"WITH locked AS (
               SELECT id, seq FROM tasks WHERE status = 'queued'
               ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED
           ),
           numbered AS (SELECT id, row_number() OVER (ORDER BY seq) AS slot FROM locked),
           waiters AS (
               SELECT agent, slot FROM unnest($1::text[]) WITH ORDINALITY AS w(agent, slot)
           )
           UPDATE tasks t
              SET status = 'in_progress', started_at = now(), attempts = t.attempts + 1,
                  lease = gen_random_uuid(), agent = waiters.agent,
                  lease_expires_at = now() + $3 * interval '1 second', output_cap = $4
             FROM numbered JOIN waiters USING (slot)
            WHERE t.id = numbered.id
           RETURNING t.id AS "id: TaskId", t.command, t.status AS "status: TaskStatus",
                     t.created_at, t.started_at, t.running_at, t.finished_at, t.exit_code,
                     t.stdout, t.stderr, t.stdout_lossy, t.stderr_lossy, t.stdout_truncated,
                     t.stderr_truncated, t.stdout_bytes, t.stderr_bytes, t.error, t.agent,
                     t.attempts, t.timeout_secs, t.abort_requested_at, t.owner, t.aborted_by,
                     t.lease AS "lease!: LeaseToken", t.lease_expires_at AS "lease_expires_at!",
                     numbered.slot - 1 AS "slot!""#,
        agents,
        agents.len() as i64,
        f64::from(terms.lease_secs),
        i32::try_from(terms.max_output_bytes).unwrap_or(i32::MAX),
    )
    .fetch_all(pool)
    .await
    .op("claim queued tasks")?;
    let mut claimed: Vec<Claimed> = rows
        .into_iter()
        .map(|row| Claimed {
            lease: Lease { task: row.id, token: row.lease },
            lease_expires_at: row.lease_expires_at,
            slot: usize::try_from(row.slot).unwrap_or(usize::MAX),
            task: task_from!(row),
        })
        .collect();
    claimed.sort_by_key(|c| c.slot);
    Ok(claimed)
}

/// What an abort did.
pub enum Aborted {
    /// A queued task, now cancelled.
    Cancelled(Task),
    /// A running task, whose agent is told through its heartbeat.
    Requested(Task),
}

/// Cancels a queued task, or marks a running one for abort and notifies every API process
/// (the notification goes out when the statement commits), recording who aborted it. One
/// statement, so that a task the reaper requeues meanwhile is handled as what it is now.
/// `None` when the task is neither queued nor running, or not in `scope`.
pub async fn abort(
    pool: &PgPool,
    id: TaskId,
    by: &str,
    scope: Option<&str>,
) -> Result<Option<Aborted>, DbError> {
    let row = sqlx::query!(
        r#"WITH aborted AS (
               UPDATE tasks SET
                   status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
                   finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
                   abort_requested_at = CASE WHEN status = 'in_progress'
                                             THEN coalesce(abort_requested_at, now()) END,
                   aborted_by = coalesce(aborted_by, $3)
                WHERE id = $1 AND status IN ('queued', 'in_progress')
                  AND ($4::text IS NULL OR owner = $4)
               RETURNING *
           )
           SELECT id AS "id!: TaskId", command AS "command!",
                  status AS "status!: TaskStatus", created_at AS "created_at!", started_at,
                  running_at, finished_at, exit_code, stdout, stderr,
                  stdout_lossy AS "stdout_lossy!", stderr_lossy AS "stderr_lossy!",
                  stdout_truncated AS "stdout_truncated!", stderr_truncated AS "stderr_truncated!",
                  stdout_bytes AS "stdout_bytes!", stderr_bytes AS "stderr_bytes!", error, agent,
                  attempts AS "attempts!", timeout_secs AS "timeout_secs!", abort_requested_at,
                  owner, aborted_by,
                  CASE WHEN status = 'in_progress' THEN pg_notify($2, id::text) END
                      IS NOT NULL AS "notified!"
             FROM aborted"#,
        id as TaskId,
        ABORT_CHANNEL,
        by,
        scope,
    )
    .fetch_optional(pool)
    .await
    .op("abort a task")?;
    Ok(row.map(|row| {
        let task = task_from!(row);
        match task.status {
            TaskStatus::Cancelled => Aborted::Cancelled(task),
            _ => Aborted::Requested(task),
        }
    }))
}

/// The task and its current lease token, to explain why a fenced write changed nothing.
pub async fn get_with_lease(
    pool: &PgPool,
    id: TaskId,
) -> Result<Option<(Task, Option<LeaseToken>)>, DbError> {
    let row = sqlx::query!(
        r#"SELECT id AS "id: TaskId", command, status AS "status: TaskStatus", created_at,
                  started_at, running_at, finished_at, exit_code, stdout, stderr, stdout_lossy,
                  stderr_lossy, stdout_truncated, stderr_truncated, stdout_bytes, stderr_bytes,
                  error, agent, attempts, timeout_secs, abort_requested_at, owner, aborted_by,
                  lease AS "lease: LeaseToken"
             FROM tasks WHERE id = $1"#,
        id as TaskId,
    )
    .fetch_optional(pool)
    .await
    .op("load a task and its lease")?;
    Ok(row.map(|row| {
        let lease = row.lease;
        (task_from!(row), lease)
    }))
}

/// Tells every listening API process that a task may be waiting.
/// The channel of task events (ended, output, abort) between API processes, in bursts; the
/// payload is written and read by the notifier.
pub const EVENTS_CHANNEL: &str = "taskexec_task_events";

/// Sends one burst of task events to every API process.
pub async fn notify_events(db: impl PgExecutor<'_>, payload: &str) -> Result<(), DbError> {
    sqlx::query!("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, payload)
        .execute(db)
        .await
        .op("notify task events")?;
    Ok(())
}

pub async fn notify(db: impl PgExecutor<'_>) -> Result<(), DbError> {
    sqlx::query!("SELECT pg_notify($1, '')", CHANNEL)
        .execute(db)
        .await
        .map(|_| ())
        .op("notify the dispatchers")
}

/// A query on the LISTEN connection that has been silent, to learn that it still answers.
pub async fn probe(db: impl PgExecutor<'_>) -> Result<(), DbError> {
    sqlx::query_scalar!("SELECT 1 AS alive").fetch_one(db).await.map(|_| ()).op("probe LISTEN")
}

/// How an attempt ended other than by its agent's finish (the `attempt_fate` enum of the
/// schema, where `end_attempt` applies it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sqlx::Type)]
#[sqlx(type_name = "attempt_fate", rename_all = "snake_case")]
pub enum Fate {
    /// Back to the queue, the attempt given back (a pick never confirmed, a hand-back).
    Refunded,
    /// Back to the queue, the attempt counted (an expired lease).
    Requeued,
    /// Its abort was requested: cancelled.
    Cancelled,
    /// Its lease expired on the last attempt: failed, "agent lost".
    Lost,
    /// Still running past timeout + grace + lease: failed.
    TimedOut,
    /// Handed back too often: failed.
    Exhausted,
}

impl Fate {
    /// Whether the task goes back to the queue.
    pub fn requeues(self) -> bool {
        matches!(self, Fate::Refunded | Fate::Requeued)
    }
}

/// What one reaper pass did: the fate of each attempt it ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub ended: Vec<(TaskId, Fate)>,
}

impl Reaped {
    /// How many attempts met `fate`.
    pub fn count(&self, fate: Fate) -> usize {
        self.ended.iter().filter(|(_, f)| *f == fate).count()
    }

    /// Tasks that went back to the queue (refunded or requeued).
    pub fn requeued(&self) -> usize {
        self.ended.iter().filter(|(_, f)| f.requeues()).count()
    }
}

/// One pass of the reaper, in one statement over running tasks that no one else holds (SKIP
/// LOCKED), so that reapers in several API processes handle each expiry once. A task is
/// failed when it overran its timeout by `overrun_secs` (grace plus lease), whatever its
/// lease; otherwise, once its lease has expired, it is cancelled if its abort was requested,
/// refunded if its agent never confirmed the pick (up to `max_attempts` times), failed as
/// "agent lost" on its last attempt, or else requeued.
pub async fn reap(pool: &PgPool, max_attempts: u32, overrun_secs: u32) -> Result<Reaped, DbError> {
    let rows = sqlx::query!(
        r#"WITH due AS (
               SELECT id, attempts, lost_picks, running_at, abort_requested_at, timeout_secs,
                      started_at + (timeout_secs + $2) * interval '1 second' < now() AS overran
                 FROM tasks
                WHERE status = 'in_progress'
                  AND (lease_expires_at < now()
                       OR started_at + (timeout_secs + $2) * interval '1 second' < now())
                FOR UPDATE SKIP LOCKED
           ),
           fated AS (
               SELECT id, timeout_secs,
                      CASE WHEN overran THEN 'timed_out'
                           WHEN abort_requested_at IS NOT NULL THEN 'cancelled'
                           WHEN running_at IS NULL AND lost_picks < $1 THEN 'refunded'
                           WHEN attempts >= $1 THEN 'lost'
                           ELSE 'requeued' END::attempt_fate AS fate
                 FROM due
           )
           SELECT ended.id AS "id!: TaskId", fated.fate AS "fate!: Fate"
             FROM fated,
                  LATERAL end_attempt(fated.id, fated.fate,
                      CASE fated.fate
                          WHEN 'timed_out' THEN 'timed out after ' || fated.timeout_secs
                                                || ' s; its agent did not stop it'
                          WHEN 'cancelled' THEN 'aborted; its agent was lost'
                          WHEN 'lost' THEN 'agent lost'
                      END, false) AS ended"#,
        max_attempts as i32,
        overrun_secs as i32,
    )
    .fetch_all(pool)
    .await
    .op("reap expired leases")?;
    Ok(Reaped { ended: rows.into_iter().map(|row| (row.id, row.fate)).collect() })
}
