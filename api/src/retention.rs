//! Retention: tasks that ended more than `retention_days` ago are deleted with their output
//! (and agents not seen for as long), oldest first, `BATCH` rows a statement so that no
//! statement holds many locks for long. Run by the reaper's loop once a minute; `run_once` is
//! what it calls. `retention_days = 0` keeps everything.

use std::time::Duration;

use sqlx::PgPool;

use crate::db::{DbError, Op};
use crate::tasks::store::IDEMPOTENCY_HOURS;

/// Tasks deleted per statement.
pub const BATCH: i64 = 1000;

/// How often the reaper's loop runs a pass.
pub const EVERY: Duration = Duration::from_secs(60);

/// What a pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub tasks: u64,
    pub agents: u64,
    /// Idempotency keys older than their 24 hours.
    pub keys: u64,
}

/// Deletes, in batches of `batch`, the idempotency keys past their 24 hours, every task that
/// ended more than `days` ago, then the agents not seen for as long (no task nor agent when
/// `days` is 0).
///
/// # Errors
/// The database's; what was deleted before stays deleted, the next pass goes on.
pub async fn run_once(pool: &PgPool, days: u32, batch: i64) -> Result<Deleted, DbError> {
    let keys = in_batches(batch, || async {
        let gone = sqlx::query!(
            r#"DELETE FROM idempotency_keys
                WHERE (owner, key) IN (SELECT owner, key FROM idempotency_keys
                                        WHERE created_at <= now() - make_interval(hours => $1)
                                        ORDER BY created_at
                                        LIMIT $2
                                          FOR UPDATE SKIP LOCKED)"#,
            IDEMPOTENCY_HOURS,
            batch,
        )
        .execute(pool)
        .await
        .op("delete expired idempotency keys")?;
        Ok(gone.rows_affected())
    })
    .await?;
    let mut deleted = Deleted { keys, ..Deleted::default() };
    if days == 0 {
        return Ok(deleted);
    }
    let days = i32::try_from(days).unwrap_or(i32::MAX);
    deleted.tasks = in_batches(batch, || async {
        // SKIP LOCKED: a task another process is deleting is its to delete.
        let gone = sqlx::query!(
            r#"DELETE FROM tasks
                WHERE id IN (SELECT id FROM tasks
                              WHERE status IN ('finished', 'failed', 'cancelled')
                                AND finished_at < now() - make_interval(days => $1)
                              ORDER BY finished_at
                              LIMIT $2
                                FOR UPDATE SKIP LOCKED)"#,
            days,
            batch,
        )
        .execute(pool)
        .await
        .op("delete ended tasks past retention")?;
        Ok(gone.rows_affected())
    })
    .await?;
    deleted.agents = sqlx::query!(
        "DELETE FROM agents WHERE last_seen_at < now() - make_interval(days => $1)",
        days
    )
    .execute(pool)
    .await
    .op("delete agents past retention")?
    .rows_affected();
    if deleted.tasks > 0 || deleted.agents > 0 {
        log::info!(
            "retention: {} tasks and {} agents older than {days} days deleted",
            deleted.tasks,
            deleted.agents
        );
    }
    Ok(deleted)
}

/// Runs `delete` (one statement deleting at most `batch` rows) until a statement deletes fewer
/// than that; the rows deleted in all.
async fn in_batches<Delete, Deleting>(batch: i64, mut delete: Delete) -> Result<u64, DbError>
where
    Delete: FnMut() -> Deleting,
    Deleting: std::future::Future<Output = Result<u64, DbError>>,
{
    let mut deleted = 0;
    loop {
        let gone = delete().await?;
        deleted += gone;
        if gone < batch.max(1) as u64 {
            return Ok(deleted);
        }
    }
}
