//! The queue's and the agents' figures, from the database: one row (`metrics_snapshot`) that
//! every API process reads, counted again by one process when it is older than
//! `metrics_refresh_secs`. The counting process holds the row's lock; another that finds it
//! stale meanwhile waits for that lock and then reads the fresh count, so the counts run once
//! per period however many processes are scraped. Each process also keeps what it read for as
//! long, so scrapes in between cost no statement.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::AppConfig;
use crate::db::{DbError, Op};
use crate::Db;

/// The figures as last counted.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// When it was counted (to tell a new count from the one read before; never compared
    /// with this process's clock).
    pub taken_at: DateTime<Utc>,
    pub queued: i64,
    /// Of the queued, those not due yet (a `run_at` to come: a delay, a retry's backoff).
    pub delayed: i64,
    /// Of the queued, those whose tags no live agent has (every queued task when no agent is
    /// alive).
    pub unroutable: i64,
    pub in_progress: i64,
    /// How long the queued task due first has been due (since its creation, or its
    /// `run_at`) when the snapshot was taken.
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
        if self.snapshot.queued == self.snapshot.delayed {
            return 0.0;
        }
        self.snapshot.oldest_queued_secs + self.snapshot.age_secs + self.at.elapsed().as_secs_f64()
    }
}

/// The longest a scrape waits for the database's figures: past it, the scrape goes out with
/// the process's own (a scrape must not hang on a database that does not answer).
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// This process's copy of the snapshot.
pub struct Cache {
    refresh: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last: Option<Read>,
    /// When the last read failed: the next one waits a refresh period, so that scrapes of a
    /// process whose database is away do not each wait for it.
    failed_at: Option<Instant>,
}

/// Why there are no database figures for this scrape.
#[derive(Debug, thiserror::Error)]
pub enum Unread {
    #[error("{0}")]
    Database(#[from] DbError),
    #[error("the database did not answer within {READ_TIMEOUT:?}")]
    TimedOut,
    #[error("the last read failed; the next is due within the refresh period")]
    Backoff,
}

impl Cache {
    pub fn new(refresh: Duration) -> Cache {
        Cache { refresh, state: Mutex::default() }
    }

    /// The snapshot, read again when this process's copy is older than the refresh period
    /// (concurrent scrapes wait for one read, `READ_TIMEOUT` at most).
    pub async fn get(&self, db: &Db, config: &AppConfig) -> Result<Read, Unread> {
        let mut state = self.state.lock().await;
        if let Some(read) = state.last {
            if read.at.elapsed() < self.refresh {
                return Ok(read);
            }
        }
        if state.failed_at.is_some_and(|failed| failed.elapsed() < self.refresh) {
            return Err(Unread::Backoff);
        }
        // Dropped on the timeout, a transaction under way is rolled back.
        let outcome = tokio::time::timeout(READ_TIMEOUT, read(db, self.refresh, config)).await;
        match outcome {
            Ok(Ok(snapshot)) => {
                let read = Read { snapshot, at: Instant::now() };
                *state = State { last: Some(read), failed_at: None };
                Ok(read)
            }
            Ok(Err(e)) => {
                state.failed_at = Some(Instant::now());
                Err(e.into())
            }
            Err(_) => {
                state.failed_at = Some(Instant::now());
                Err(Unread::TimedOut)
            }
        }
    }
}

/// The shared snapshot: read when fresh (one statement); else counted again under the row's
/// lock, unless another process counted while this one waited for it.
async fn read(db: &Db, refresh: Duration, config: &AppConfig) -> Result<Snapshot, DbError> {
    const OP: &str = "read the queue's figures";
    let fresh = |snapshot: &Snapshot| snapshot.age_secs < refresh.as_secs_f64();
    let current = snapshot(db.pool(), false).await.op(OP)?;
    if fresh(&current) {
        return Ok(current);
    }
    let mut tx = db.pool().begin().await.op(OP)?;
    let locked = snapshot(&mut *tx, true).await.op(OP)?;
    // Counted while this process waited for the lock (however long the count took): read.
    if locked.taken_at != current.taken_at || fresh(&locked) {
        tx.commit().await.op(OP)?;
        return Ok(locked);
    }
    // Every count of tasks is served by a partial index (queued, in progress, delayed); the
    // agents are those seen in the last day. The unroutable tasks are counted by tag set, each
    // set against the live agents' tags.
    let counted = sqlx::query_as!(
        Snapshot,
        r#"UPDATE metrics_snapshot SET
               taken_at = now(),
               queued = (SELECT count(*) FROM tasks WHERE status = 'queued'),
               delayed = (SELECT count(*) FROM tasks WHERE status = 'queued' AND run_at > now()),
               unroutable = (
                   SELECT COALESCE(sum(q.n), 0)::bigint
                     FROM (SELECT tags, count(*) AS n FROM tasks WHERE status = 'queued'
                            GROUP BY tags) q
                    WHERE NOT EXISTS (
                        SELECT 1 FROM agent_states($2) s JOIN agents a USING (name)
                         WHERE s.state <> 'gone' AND q.tags <@ a.tags)),
               in_progress = (SELECT count(*) FROM tasks WHERE status = 'in_progress'),
               oldest_queued_secs = COALESCE(extract(epoch FROM now() - least(
                   (SELECT created_at FROM tasks WHERE status = 'queued' AND run_at IS NULL
                     ORDER BY seq LIMIT 1),
                   (SELECT greatest(created_at, run_at) FROM tasks
                     WHERE status = 'queued' AND run_at <= now() ORDER BY run_at LIMIT 1)
               ))::float8, 0),
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
           RETURNING taken_at, queued, delayed, unroutable, in_progress, oldest_queued_secs, stuck,
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
            r#"SELECT taken_at, queued, delayed, unroutable, in_progress, oldest_queued_secs, stuck,
                      agents_idle, agents_busy, agents_gone,
                      extract(epoch FROM now() - taken_at)::float8 AS "age_secs!"
                 FROM metrics_snapshot FOR UPDATE"#
        )
        .fetch_one(executor)
        .await
    } else {
        sqlx::query_as!(
            Snapshot,
            r#"SELECT taken_at, queued, delayed, unroutable, in_progress, oldest_queued_secs, stuck,
                      agents_idle, agents_busy, agents_gone,
                      extract(epoch FROM now() - taken_at)::float8 AS "age_secs!"
                 FROM metrics_snapshot"#
        )
        .fetch_one(executor)
        .await
    }
}
