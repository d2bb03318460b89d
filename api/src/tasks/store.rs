//! All SQL about tasks but the fenced writes of an attempt (those are [`Lease`]'s). Each
//! function is one short statement, checked against the schema at compile time: no transaction
//! is ever held open while a command runs.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::types::Uuid;
use sqlx::{PgExecutor, PgPool};
use taskexec_protocol::{
    Attempt, AttemptOutcome, LeaseTerms, LeaseToken, NewTask, Task, TaskId, TaskOptions, TaskStatus,
};

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
            options: taskexec_protocol::TaskOptions {
                tags: $row.tags,
                priority: $row.priority.into(),
                run_at: $row.run_at,
                max_retries: $row.max_retries.into(),
                retry_backoff_secs: $row.retry_backoff_secs,
                env: $row.env.0,
                cwd: $row.cwd,
            },
            retries: $row.retries.into(),
        }
    };
}
pub(crate) use task_from;

/// A task's `env` column.
pub type Env = std::collections::BTreeMap<String, String>;

/// A new task as inserted: queued, with the table's defaults.
fn queued(id: TaskId, row: &NewRow<'_>, generated: Generated) -> Task {
    let new = row.task;
    Task {
        id,
        command: new.command.clone(),
        status: TaskStatus::Queued,
        created_at: generated.created_at,
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
        options: TaskOptions {
            tags: new.tags.clone(),
            priority: new.priority.unwrap_or(0),
            run_at: generated.run_at,
            max_retries: new.max_retries.map_or(0, |n| n as i32),
            retry_backoff_secs: new
                .retry_backoff_secs
                .map_or(taskexec_protocol::DEFAULT_RETRY_BACKOFF_SECS, |n| n as i32),
            env: new.env.clone(),
            cwd: new.cwd.clone(),
        },
        retries: 0,
    }
}

/// What the database decides about a new task: when it was created, and (for a delayed one)
/// from when it runs.
#[derive(Clone, Copy)]
struct Generated {
    created_at: DateTime<Utc>,
    run_at: Option<DateTime<Utc>>,
}

/// A task to insert, with its timeout and its owner decided.
pub struct NewRow<'a> {
    pub task: &'a NewTask,
    pub timeout_secs: u32,
    pub owner: &'a str,
}

/// Inserts queued tasks in one statement, and returns them in the order given. Only what the
/// database generates comes back (the times): echoing the rest, the command above all, would
/// only cost. No quota is checked here (see `insert_within_quota`). `created_at` is the time
/// of the insert, not of its transaction's start: a quota's count before it is not the task's;
/// `delay_secs` counts from it too.
pub async fn insert_many(
    db: impl PgExecutor<'_>,
    rows: &[NewRow<'_>],
) -> Result<Vec<Task>, DbError> {
    insert_many_as(db, rows, rows.iter().map(|_| TaskId::random()).collect()).await
}

/// `insert_many`, with the ids chosen by the caller.
async fn insert_many_as(
    db: impl PgExecutor<'_>,
    rows: &[NewRow<'_>],
    ids: Vec<TaskId>,
) -> Result<Vec<Task>, DbError> {
    let uuids: Vec<_> = ids.iter().map(|id| *id.as_uuid()).collect();
    let commands: Vec<&str> = rows.iter().map(|r| r.task.command.as_str()).collect();
    let timeouts: Vec<i32> = rows.iter().map(|r| r.timeout_secs as i32).collect();
    let owners: Vec<&str> = rows.iter().map(|r| r.owner).collect();
    // Tags cannot hold a comma: joined, one text per task (arrays of arrays must be square).
    let tags: Vec<String> = rows.iter().map(|r| r.task.tags.join(",")).collect();
    let priorities: Vec<i16> = rows.iter().map(|r| r.task.priority.unwrap_or(0) as i16).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.task.run_at).collect();
    let delays: Vec<Option<f64>> = rows.iter().map(|r| r.task.delay_secs.map(f64::from)).collect();
    let max_retries: Vec<i16> =
        rows.iter().map(|r| r.task.max_retries.unwrap_or(0) as i16).collect();
    let backoffs: Vec<i32> = rows
        .iter()
        .map(|r| {
            r.task
                .retry_backoff_secs
                .map_or(taskexec_protocol::DEFAULT_RETRY_BACKOFF_SECS, |n| n as i32)
        })
        .collect();
    let envs: Vec<Json<&Env>> = rows.iter().map(|r| Json(&r.task.env)).collect();
    let cwds: Vec<Option<&str>> = rows.iter().map(|r| r.task.cwd.as_deref()).collect();
    let generated = sqlx::query!(
        r#"INSERT INTO tasks (id, command, timeout_secs, owner, tags, priority, run_at,
                              max_retries, retry_backoff_secs, env, cwd, created_at)
           SELECT id, command, timeout_secs, owner, string_to_array(tags, ','), priority,
                  coalesce(run_at, clock_timestamp() + delay * interval '1 second'),
                  max_retries, retry_backoff_secs, env, cwd, clock_timestamp()
             FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::text[],
                         $6::int2[], $7::timestamptz[], $8::float8[], $9::int2[], $10::int4[],
                         $11::jsonb[], $12::text[])
                  AS n(id, command, timeout_secs, owner, tags, priority, run_at, delay,
                       max_retries, retry_backoff_secs, env, cwd)
           RETURNING id AS "id: TaskId", created_at, run_at"#,
        &uuids,
        &commands as &[&str],
        &timeouts,
        &owners as &[&str],
        &tags,
        &priorities,
        &run_ats as &[Option<DateTime<Utc>>],
        &delays as &[Option<f64>],
        &max_retries,
        &backoffs,
        &envs as &[Json<&Env>],
        &cwds as &[Option<&str>],
    )
    .fetch_all(db)
    .await
    .op("insert tasks")?;
    let generated: HashMap<TaskId, Generated> = generated
        .into_iter()
        .map(|row| (row.id, Generated { created_at: row.created_at, run_at: row.run_at }))
        .collect();
    ids.iter()
        .zip(rows)
        .map(|(id, row)| {
            let made = generated.get(id).copied().ok_or(sqlx::Error::RowNotFound);
            Ok(queued(*id, row, made.op("insert tasks")?))
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
    let mut tx = pool.begin().await.op(OP)?;
    let (fitting, granted) =
        room_in_quota(&mut tx, process, owner, rows.len(), max, wanted).await?;
    let fitting = &rows[..fitting];
    let inserted =
        if fitting.is_empty() { Vec::new() } else { insert_many(&mut *tx, fitting).await? };
    tx.commit().await.op(OP)?;
    Ok(WithinQuota { inserted, granted })
}

/// The quota's turn, in the caller's transaction (see `insert_within_quota`): how many of `n`
/// new tasks fit, and the room granted to `process` after them.
async fn room_in_quota(
    tx: &mut sqlx::PgConnection,
    process: Uuid,
    owner: &str,
    n: usize,
    max: u64,
    wanted: u64,
) -> Result<(usize, u64), DbError> {
    const OP: &str = "insert tasks within a quota";
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
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
    let fitting = n.min(usize::try_from(room).unwrap_or(usize::MAX));
    let granted = ((room - fitting as u64) / 2).min(wanted);
    if wanted == 0 {
        // A single insert that wants no room after it: the process's grant stays as it is.
        return Ok((fitting, 0));
    }
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
    Ok((fitting, granted))
}

/// How long an `Idempotency-Key` is honoured.
pub const IDEMPOTENCY_HOURS: i32 = 24;

/// What a submit with an `Idempotency-Key` came to.
#[derive(Debug)]
pub enum Keyed {
    /// The first with this key: the task created.
    Created(Task),
    /// The key was used before with the same body: the task it created, as it is now.
    Existing(Task),
    /// The key was used before with another body: the task it created.
    Mismatch(TaskId),
    /// The first with this key, but the owner's quota is full (the key stays unused).
    OverQuota,
}

/// Inserts `row` under the owner's `key`, unless the key was used in the last
/// `IDEMPOTENCY_HOURS`. The key is taken first, in the transaction that inserts the task: a
/// concurrent submit with the same key waits on the key's unique index until this one
/// commits (then finds the key used) or rolls back (then takes it). `digest` identifies the
/// request's body.
pub async fn insert_keyed(
    pool: &PgPool,
    row: &NewRow<'_>,
    key: &str,
    digest: &[u8; 32],
    max: u64,
) -> Result<Keyed, DbError> {
    const OP: &str = "insert a task under an idempotency key";
    // A used key found gone at once (its task deleted, or the key expired and deleted in
    // between) is taken again on the next turn.
    for _ in 0..3 {
        let id = TaskId::random();
        let mut tx = pool.begin().await.op(OP)?;
        let taken = sqlx::query_scalar!(
            r#"INSERT INTO idempotency_keys (owner, key, digest, task_id)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (owner, key) DO UPDATE
                   SET digest = excluded.digest, task_id = excluded.task_id, created_at = now()
                 WHERE idempotency_keys.created_at <= now() - make_interval(hours => $5)
               RETURNING true AS "taken!""#,
            row.owner,
            key,
            &digest[..],
            id as TaskId,
            IDEMPOTENCY_HOURS,
        )
        .fetch_optional(&mut *tx)
        .await
        .op(OP)?
        .is_some();
        if taken {
            // Every process's grant counts, this one's too: its intake may fill that room
            // at any moment without counting again.
            let (fitting, _) = room_in_quota(&mut tx, Uuid::nil(), row.owner, 1, max, 0).await?;
            if fitting == 0 {
                return Ok(Keyed::OverQuota);
            }
            let mut made = insert_many_as(&mut *tx, std::slice::from_ref(row), vec![id]).await?;
            tx.commit().await.op(OP)?;
            let task = made.pop().ok_or(sqlx::Error::RowNotFound).op(OP)?;
            return Ok(Keyed::Created(task));
        }
        tx.rollback().await.op(OP)?;
        let used = sqlx::query!(
            r#"SELECT digest, task_id AS "task_id: TaskId" FROM idempotency_keys
                WHERE owner = $1 AND key = $2"#,
            row.owner,
            key,
        )
        .fetch_optional(pool)
        .await
        .op(OP)?;
        let Some(used) = used else { continue };
        if used.digest != digest[..] {
            return Ok(Keyed::Mismatch(used.task_id));
        }
        if let Some(task) = get(pool, used.task_id, Some(row.owner)).await? {
            return Ok(Keyed::Existing(task));
        }
    }
    Err(sqlx::Error::RowNotFound).op(OP)
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
    let row = sqlx::query!(
        r#"SELECT id AS "id: TaskId", command, status AS "status: TaskStatus", created_at,
                  started_at, running_at, finished_at, exit_code, stdout, stderr, stdout_lossy,
                  stderr_lossy, stdout_truncated, stderr_truncated, stdout_bytes, stderr_bytes,
                  error, agent, attempts, timeout_secs, abort_requested_at, owner, aborted_by,
                  tags, priority, run_at, max_retries, retry_backoff_secs, retries,
                  env AS "env: Json<Env>", cwd
             FROM tasks WHERE id = $1 AND ($2::text IS NULL OR owner = $2)"#,
        id as TaskId,
        scope,
    )
    .fetch_optional(pool)
    .await
    .op("load a task")?;
    Ok(row.map(|row| task_from!(row)))
}

/// Every attempt of the task, oldest first, and its current one last when it is running;
/// `None` when the task does not exist or `scope` may not see it.
pub async fn attempts(
    pool: &PgPool,
    id: TaskId,
    scope: Option<&str>,
) -> Result<Option<Vec<Attempt>>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT a.agent, a.started_at, a.running_at, a.finished_at,
                  a.outcome AS "outcome: AttemptOutcome", a.exit_code, a.error
             FROM tasks t
             LEFT JOIN LATERAL (
                 SELECT id, agent, started_at, running_at, finished_at, outcome, exit_code, error
                   FROM task_attempts WHERE task_id = t.id
                 UNION ALL
                 SELECT NULL, t.agent, t.started_at, t.running_at, NULL, NULL, NULL, NULL
                  WHERE t.status = 'in_progress'
             ) a ON true
            WHERE t.id = $1 AND ($2::text IS NULL OR t.owner = $2)
            ORDER BY a.id NULLS LAST"#,
        id as TaskId,
        scope,
    )
    .fetch_all(pool)
    .await
    .op("list a task's attempts")?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rows.into_iter()
            .filter_map(|row| {
                Some(Attempt {
                    agent: row.agent?,
                    started_at: row.started_at?,
                    running_at: row.running_at,
                    finished_at: row.finished_at,
                    outcome: row.outcome,
                    exit_code: row.exit_code,
                    error: row.error,
                })
            })
            .collect(),
    ))
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
                      timeout_secs, abort_requested_at, owner, aborted_by, seq, tags, priority,
                      run_at, max_retries, retry_backoff_secs, retries,
                      env AS "env: Json<Env>", cwd
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
                  timeout_secs, abort_requested_at, owner, aborted_by, seq, tags, priority,
                      run_at, max_retries, retry_backoff_secs, retries,
                      env AS "env: Json<Env>", cwd
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

/// What one claim statement did.
#[derive(Debug, Default)]
pub struct Claim {
    /// By slot.
    pub claimed: Vec<Claimed>,
    /// A tag set's waiters listed as many tasks as they were, but some went to waiters of
    /// another tag set that could take them too: there may be more for them beyond what they
    /// listed, so claim again before taking the queue to be empty for them. (A tag set that
    /// listed fewer saw all there is for it.)
    pub shared: bool,
    /// When something was claimed: how long until the earliest delayed task is due (see
    /// `next_due`, which a claim that found nothing leaves to be asked).
    pub next_due: Option<Option<f64>>,
}

/// A waiting pick, as a claim sees it: its agent's name and tags (sorted, joined by commas;
/// empty for none).
pub struct Picker<'a> {
    pub agent: &'a str,
    pub tags: &'a str,
}

/// Claims queued tasks for `pickers` in one statement, each with a fresh lease on `terms` (its
/// length, and the output cap the attempt is kept by). A task goes only to a picker whose
/// tags include all of its own, only once its `run_at` has come, higher priority first, then
/// older first; the pickers are served oldest (first) first. Pickers with the same tags form a
/// group that takes up to as many tasks as it has pickers; a task that several groups could
/// take goes to the group of the oldest picker (`shared` says when another group may have
/// more to take because of it). Rows that
/// another claimer holds are skipped, never waited for, so concurrent claimers never receive
/// the same task.
pub async fn claim(
    pool: &PgPool,
    pickers: &[Picker<'_>],
    terms: &LeaseTerms,
) -> Result<Claim, DbError> {
    let agents: Vec<&str> = pickers.iter().map(|p| p.agent).collect();
    let tags: Vec<&str> = pickers.iter().map(|p| p.tags).collect();
    // FOR UPDATE cannot sit beside DISTINCT or a window function, hence the inner `listed`.
    let rows = sqlx::query!(
        r#"WITH waiters AS (
               SELECT agent, tags, slot,
                      min(slot) OVER (PARTITION BY tags) AS grp,
                      row_number() OVER (PARTITION BY tags ORDER BY slot) AS n
                 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w(agent, tags, slot)
           ),
           groups AS (
               SELECT grp, string_to_array(tags, ',') AS tags, count(*) AS wanted
                 FROM waiters GROUP BY grp, tags
           ),
           listed AS (
               SELECT groups.grp, c.id, c.priority, c.seq
                 FROM groups CROSS JOIN LATERAL (
                     SELECT id, priority, seq FROM tasks
                      WHERE status = 'queued' AND (run_at IS NULL OR run_at <= now())
                        AND tasks.tags <@ groups.tags
                      ORDER BY priority DESC, seq LIMIT groups.wanted
                        FOR UPDATE SKIP LOCKED
                 ) c
           ),
           kept AS (SELECT DISTINCT ON (id) id, grp, priority, seq FROM listed ORDER BY id, grp),
           numbered AS (
               SELECT id, grp, row_number() OVER (PARTITION BY grp ORDER BY priority DESC, seq) AS n
                 FROM kept
           ),
           paired AS (SELECT numbered.id, waiters.agent, waiters.slot
                        FROM numbered JOIN waiters USING (grp, n))
           UPDATE tasks t
              SET status = 'in_progress', started_at = now(), attempts = t.attempts + 1,
                  lease = gen_random_uuid(), agent = paired.agent,
                  lease_expires_at = now() + $3 * interval '1 second', output_cap = $4
             FROM paired
            WHERE t.id = paired.id
           RETURNING t.id AS "id: TaskId", t.command, t.status AS "status: TaskStatus",
                     t.created_at, t.started_at, t.running_at, t.finished_at, t.exit_code,
                     t.stdout, t.stderr, t.stdout_lossy, t.stderr_lossy, t.stdout_truncated,
                     t.stderr_truncated, t.stdout_bytes, t.stderr_bytes, t.error, t.agent,
                     t.attempts, t.timeout_secs, t.abort_requested_at, t.owner, t.aborted_by,
                     t.tags, t.priority, t.run_at, t.max_retries, t.retry_backoff_secs,
                     t.retries, t.env AS "env: Json<Env>", t.cwd,
                     t.lease AS "lease!: LeaseToken", t.lease_expires_at AS "lease_expires_at!",
                     paired.slot - 1 AS "slot!",
                     EXISTS (SELECT 1 FROM groups g
                              WHERE (SELECT count(*) FROM listed l WHERE l.grp = g.grp) = g.wanted
                                AND (SELECT count(*) FROM kept k WHERE k.grp = g.grp) < g.wanted
                            ) AS "shared!",
                     (SELECT extract(epoch FROM min(run_at) - now())::float8 FROM tasks
                       WHERE status = 'queued' AND run_at > now()) AS "next_due""#,
        &agents as &[&str],
        &tags as &[&str],
        f64::from(terms.lease_secs),
        i32::try_from(terms.max_output_bytes).unwrap_or(i32::MAX),
    )
    .fetch_all(pool)
    .await
    .op("claim queued tasks")?;
    let shared = rows.iter().any(|row| row.shared);
    let next_due = rows.first().map(|row| row.next_due);
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
    Ok(Claim { claimed, shared, next_due })
}

/// How long until the earliest delayed task (a `run_at` still to come) may be claimed, by the
/// database's clock; `None` when none is delayed.
pub async fn next_due(pool: &PgPool) -> Result<Option<f64>, DbError> {
    sqlx::query_scalar!(
        r#"SELECT extract(epoch FROM min(run_at) - now())::float8 AS "secs"
             FROM tasks WHERE status = 'queued' AND run_at > now()"#
    )
    .fetch_one(pool)
    .await
    .op("find the next delayed task")
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
                  owner, aborted_by, tags AS "tags!", priority AS "priority!", run_at,
                  max_retries AS "max_retries!", retry_backoff_secs AS "retry_backoff_secs!",
                  retries AS "retries!", env AS "env!: Json<Env>", cwd,
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
                  tags, priority, run_at, max_retries, retry_backoff_secs, retries,
                  env AS "env: Json<Env>", cwd, lease AS "lease: LeaseToken"
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
               SELECT id, attempts, retries, lost_picks, running_at, abort_requested_at,
                      timeout_secs,
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
                           WHEN attempts - retries >= $1 THEN 'lost'
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
