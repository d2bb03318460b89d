//! All SQL about tasks. Each function is one short statement: no transaction is ever held
//! open while a command runs, and every agent write is fenced by the lease in its WHERE clause.

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

pub async fn insert(pool: &PgPool, command: &str) -> sqlx::Result<Task> {
    let sql = concat!(
        "INSERT INTO tasks (id, command) VALUES ($1, $2) RETURNING ",
        task_columns!()
    );
    sqlx::query_as(sql)
        .bind(Uuid::new_v4())
        .bind(command)
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
    let mut query = QueryBuilder::new(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE true"
    ));
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
    pub slot: i64,
}

/// Claims up to `agents.len()` queued tasks in one statement, oldest first, and assigns the
/// oldest to `agents[0]`, the next to `agents[1]`, and so on. Rows that another claimer holds
/// are skipped, never waited for, so concurrent claimers never receive the same task.
pub async fn claim(pool: &PgPool, agents: &[String]) -> sqlx::Result<Vec<Claimed>> {
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
                lease = gen_random_uuid(), agent = waiters.agent
           FROM numbered JOIN waiters USING (slot)
          WHERE t.id = numbered.id
         RETURNING ",
        task_columns!("t."),
        ", t.lease, numbered.slot - 1 AS slot"
    );
    let mut claimed: Vec<Claimed> = sqlx::query_as(sql)
        .bind(agents)
        .bind(agents.len() as i64)
        .fetch_all(pool)
        .await?;
    claimed.sort_by_key(|c| c.slot);
    Ok(claimed)
}

/// Puts back a task whose pick never reached an agent (its handler was gone), as if it had
/// never been picked. Fenced by the lease, so it cannot undo a later attempt.
pub async fn unclaim(pool: &PgPool, id: Uuid, lease: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE tasks SET status = 'queued', started_at = NULL, agent = NULL, lease = NULL,
                attempts = attempts - 1
          WHERE id = $1 AND lease = $2 AND status = 'in_progress'",
    )
    .bind(id)
    .bind(lease)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records the result of the attempt that `outcome.lease` identifies, if it is still the
/// current, unfinished one. `None` means nothing was written.
pub async fn finish(pool: &PgPool, id: Uuid, outcome: &Outcome) -> sqlx::Result<Option<Task>> {
    let sql = concat!(
        "UPDATE tasks
            SET status = $3, exit_code = $4, error = $5, stdout = $6, stderr = $7,
                stdout_lossy = $8, stderr_lossy = $9, finished_at = now()
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
    let sql = concat!(
        "SELECT ",
        task_columns!(),
        ", lease FROM tasks WHERE id = $1"
    );
    let row: Option<Row> = sqlx::query_as(sql).bind(id).fetch_optional(pool).await?;
    Ok(row.map(|r| (r.task, r.lease)))
}

/// Tells every listening API process that a task may be waiting.
pub async fn notify(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query(concat!("NOTIFY ", channel!()))
        .execute(pool)
        .await
        .map(|_| ())
}
