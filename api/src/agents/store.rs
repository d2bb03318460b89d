//! The agent registry's statements.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use taskexec_protocol::{AgentInfo, AgentState, TaskId};

use super::sightings::Sighting;
use crate::db::{DbError, Op};

/// Writes a batch of sightings in one statement; `left` marks them as leaving at that time.
pub async fn record(
    pool: &PgPool,
    rows: &[Sighting],
    left: Option<DateTime<Utc>>,
) -> Result<(), DbError> {
    let names: Vec<&str> = rows.iter().map(|row| row.name.as_str()).collect();
    let versions: Vec<Option<&str>> = rows.iter().map(|row| row.version.as_deref()).collect();
    let seen: Vec<DateTime<Utc>> = rows.iter().map(|row| row.seen).collect();
    let finished: Vec<i64> =
        rows.iter().map(|row| i64::try_from(row.finished).unwrap_or(i64::MAX)).collect();
    sqlx::query!(
        r#"INSERT INTO agents AS a (name, version, first_seen_at, last_seen_at, left_at, tasks_finished)
           SELECT s.name, s.version, s.seen, s.seen, $5, s.finished
             FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::int8[])
                  AS s(name, version, seen, finished)
           ON CONFLICT (name) DO UPDATE SET
               version = COALESCE(EXCLUDED.version, a.version),
               last_seen_at = GREATEST(a.last_seen_at, EXCLUDED.last_seen_at),
               left_at = COALESCE(EXCLUDED.left_at, a.left_at),
               tasks_finished = a.tasks_finished + EXCLUDED.tasks_finished"#,
        &names as &[&str],
        &versions as &[Option<&str>],
        &seen,
        &finished,
        left,
    )
    .execute(pool)
    .await
    .op("record the agents' sightings")?;
    Ok(())
}

/// Every agent seen in the last day, by name.
pub async fn list(pool: &PgPool, lease_secs: u32) -> Result<Vec<AgentInfo>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT name AS "name!", state AS "state!: AgentState", version,
                  first_seen_at AS "first_seen_at!", last_seen_at AS "last_seen_at!",
                  current_task AS "current_task: TaskId", tasks_finished AS "tasks_finished!"
             FROM agent_states($1)
            ORDER BY name"#,
        lease_secs as i32,
    )
    .fetch_all(pool)
    .await
    .op("list the agents")?;
    Ok(rows
        .into_iter()
        .map(|row| AgentInfo {
            name: row.name,
            state: row.state,
            version: row.version,
            first_seen_at: row.first_seen_at,
            last_seen_at: row.last_seen_at,
            current_task: row.current_task,
            tasks_finished: u64::try_from(row.tasks_finished).unwrap_or_default(),
        })
        .collect())
}
