//! The queue's and the agents' figures, from the database: one row (`metrics_snapshot`) that
//! every API process reads, counted again by one process when it is older than
//! `metrics_refresh_secs`. The counting process holds the row's lock; another that finds it
//! stale meanwhile waits for that lock and then reads the fresh count, so the counts run once
//! per period however many processes are scraped. Each process also keeps what it read for as
//! long, so scrapes in between cost no statement.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::AppConfig;
use crate::db::{DbError, Op};
use crate::Db;

/// The figures as last counted.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub queued: i64,
    pub in_progress: i64,
    /// Age of the oldest queued task when the snapshot was taken.
    pub oldest_queued_secs: f64,
    pub stuck: i64,
    pub agents_idle: i64,
    pub agents_busy: i64,
    pub agents_gone: i64,
    /// The snapshot's age when it was read, by the database's clock.
    pub age_secs: f64,
}

/// A snapshot and when this process read it.
#[derive(Debug, Clone, Copy)]
pub struct Read {
    pub snapshot: Snapshot,
    pub at: Instant,
}

impl Read {
    /// The oldest queued task's age now: its age at the count plus the time since, measured
    /// by the database's clock to the read and by this process's from there (the two clocks
    /// are never compared).
    pub fn oldest_queued_age(&self) -> f64 {
        if self.snapshot.queued == 0 {
            return 0.0;
        }
        self.snapshot.oldest_queued_secs + self.snapshot.age_secs + self.at.elapsed().as_secs_f64()
    }
}

/// This process's copy of the snapshot.
pub struct Cache {
    refresh: Duration,
    last: Mutex<Option<Read>>,
}

impl Cache {
    pub fn new(refresh: Duration) -> Cache {
        Cache { refresh, last: Mutex::new(None) }
    }

    /// The snapshot, read again when this process's copy is older than the refresh period
    /// (concurrent scrapes wait for one read). On a database error, the last copy if there is
    /// one.
    pub async fn get(&self, db: &Db, config: &AppConfig) -> Result<Read, DbError> {
        let mut last = self.last.lock().await;
        if let Some(read) = *last {
            if read.at.elapsed() < self.refresh {
                return Ok(read);
            }
        }
        let snapshot = match read(db, self.refresh, config).await {
            Ok(snapshot) => snapshot,
            Err(e) => return last.ok_or(e),
        };
        let read = Read { snapshot, at: Instant::now() };
        *last = Some(read);
        Ok(read)
    }
}

/// The shared snapshot: read when fresh (one statement); else counted again under the row's
/// lock, unless another process did so while this one waited for it.
async fn read(db: &Db, refresh: Duration, config: &AppConfig) -> Result<Snapshot, DbError> {
    const OP: &str = "read the queue's figures";
    let fresh = |snapshot: &Snapshot| snapshot.age_secs < refresh.as_secs_f64();
    let current = snapshot(db.pool(), false).await.op(OP)?;
    if fresh(&current) {
        return Ok(current);
    }
    let mut tx = db.pool().begin().await.op(OP)?;
    let locked = snapshot(&mut *tx, true).await.op(OP)?;
    if fresh(&locked) {
        tx.commit().await.op(OP)?;
        return Ok(locked);
    }
    // Every count of tasks is served by a partial index (queued, in progress); the agents are
    // those seen in the last day.
    let counted = sqlx::query_as!(
        Snapshot,
        r#"UPDATE metrics_snapshot SET
               taken_at = now(),
               queued = (SELECT count(*) FROM tasks WHERE status = 'queued'),
               in_progress = (SELECT count(*) FROM tasks WHERE status = 'in_progress'),
               oldest_queued_secs = COALESCE((
                   SELECT extract(epoch FROM now() - created_at)::float8
                     FROM tasks WHERE status = 'queued' ORDER BY seq LIMIT 1), 0),
               stuck = (SELECT count(*) FROM tasks
                         WHERE status = 'in_progress'
                           AND (lease_expires_at < now()
                                OR COALESCE(running_at, started_at)
                                   + make_interval(secs => timeout_secs + $1) < now())),
               (agents_idle, agents_busy, agents_gone) = (
                   SELECT count(*) FILTER (WHERE state = 'idle'),
                          count(*) FILTER (WHERE state = 'busy'),
                          count(*) FILTER (WHERE state = 'gone')
                     FROM agent_states($2))
           RETURNING queued, in_progress, oldest_queued_secs, stuck,
                     agents_idle, agents_busy, agents_gone, 0::float8 AS "age_secs!""#,
        config.kill_grace_secs as i32,
        config.lease_secs as i32,
    )
    .fetch_one(&mut *tx)
    .await
    .op(OP)?;
    tx.commit().await.op(OP)?;
    Ok(counted)
}

/// The row as it stands, with its age; `lock` takes its lock (waiting for a process that is
/// counting, and then reading what it counted).
async fn snapshot<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    lock: bool,
) -> Result<Snapshot, sqlx::Error> {
    if lock {
        sqlx::query_as!(
            Snapshot,
            r#"SELECT queued, in_progress, oldest_queued_secs, stuck,
                      agents_idle, agents_busy, agents_gone,
                      extract(epoch FROM now() - taken_at)::float8 AS "age_secs!"
                 FROM metrics_snapshot FOR UPDATE"#
        )
        .fetch_one(executor)
        .await
    } else {
        sqlx::query_as!(
            Snapshot,
            r#"SELECT queued, in_progress, oldest_queued_secs, stuck,
                      agents_idle, agents_busy, agents_gone,
                      extract(epoch FROM now() - taken_at)::float8 AS "age_secs!"
                 FROM metrics_snapshot"#
        )
        .fetch_one(executor)
        .await
    }
}
