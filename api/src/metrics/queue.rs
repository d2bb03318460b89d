//! The queue's figures, from the database: one row (`metrics_snapshot`) that every API process
//! reads, refreshed by whichever process finds it older than `metrics_refresh_secs` (the row's
//! lock makes the others read it instead of counting again). Each process also keeps what it
//! read for as long, so scrapes in between cost no statement.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::AppConfig;
use crate::db::{DbError, Op};
use crate::Db;

/// The queue as last counted.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub taken_at: DateTime<Utc>,
    pub queued: i64,
    pub in_progress: i64,
    /// Age of the oldest queued task when the snapshot was taken.
    pub oldest_queued_secs: f64,
    pub stuck: i64,
    pub agents_idle: i64,
    pub agents_busy: i64,
    pub agents_gone: i64,
}

impl Snapshot {
    /// The oldest queued task's age now: its age at the snapshot plus the time since.
    pub fn oldest_queued_age(&self) -> f64 {
        if self.queued == 0 {
            return 0.0;
        }
        let since = (Utc::now() - self.taken_at).num_milliseconds().max(0) as f64 / 1000.0;
        self.oldest_queued_secs + since
    }
}

/// This process's copy of the snapshot.
pub struct Cache {
    refresh: Duration,
    last: Mutex<Option<(Instant, Snapshot)>>,
}

impl Cache {
    pub fn new(refresh: Duration) -> Cache {
        Cache { refresh, last: Mutex::new(None) }
    }

    /// The snapshot, read again when this process's copy is older than the refresh period
    /// (concurrent scrapes wait for one read).
    pub async fn get(&self, db: &Db, config: &AppConfig) -> Result<Snapshot, DbError> {
        let mut last = self.last.lock().await;
        if let Some((read_at, snapshot)) = *last {
            if read_at.elapsed() < self.refresh {
                return Ok(snapshot);
            }
        }
        let snapshot = read(db, self.refresh, config).await?;
        *last = Some((Instant::now(), snapshot));
        Ok(snapshot)
    }
}

/// One statement: counts the queue into the shared row if it is older than `refresh`, else
/// reads the row. Every count of tasks is served by a partial index (queued, in progress); the
/// agents are those seen in the last day.
async fn read(db: &Db, refresh: Duration, config: &AppConfig) -> Result<Snapshot, DbError> {
    sqlx::query_as!(
        Snapshot,
        r#"WITH refreshed AS (
               UPDATE metrics_snapshot SET
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
                                       + make_interval(secs => timeout_secs + $2) < now())),
                   (agents_idle, agents_busy, agents_gone) = (
                       SELECT count(*) FILTER (WHERE state = 'idle'),
                              count(*) FILTER (WHERE state = 'busy'),
                              count(*) FILTER (WHERE state = 'gone')
                         FROM agent_states($3))
                WHERE taken_at <= now() - make_interval(secs => $1)
            RETURNING taken_at, queued, in_progress, oldest_queued_secs, stuck,
                      agents_idle, agents_busy, agents_gone
           )
           SELECT taken_at AS "taken_at!", queued AS "queued!", in_progress AS "in_progress!",
                  oldest_queued_secs AS "oldest_queued_secs!", stuck AS "stuck!",
                  agents_idle AS "agents_idle!", agents_busy AS "agents_busy!",
                  agents_gone AS "agents_gone!"
             FROM refreshed
           UNION ALL
           SELECT taken_at, queued, in_progress, oldest_queued_secs, stuck,
                  agents_idle, agents_busy, agents_gone
             FROM metrics_snapshot
            WHERE NOT EXISTS (SELECT 1 FROM refreshed)"#,
        refresh.as_secs_f64(),
        config.kill_grace_secs as i32,
        config.lease_secs as i32,
    )
    .fetch_one(db.pool())
    .await
    .op("read the queue's figures")
}
