//! The agent registry's statements.

use sqlx::PgPool;
use taskexec_protocol::{AgentInfo, AgentState, TaskId};
use uuid::Uuid;

use super::sightings::Sighting;
use crate::db::{DbError, Op};

/// Writes a batch of sightings in one statement; `leaving`: theirs are the agents' farewells.
/// A sighting of a run of an agent that has left (its last requests, written late by another
/// process) is no sign of life; a new run's is.
pub async fn record(pool: &PgPool, rows: &[Sighting], leaving: bool) -> Result<(), DbError> {
    let names: Vec<&str> = rows.iter().map(|row| row.name.as_str()).collect();
    let versions: Vec<Option<&str>> = rows.iter().map(|row| row.version.as_deref()).collect();
    let instances: Vec<Option<Uuid>> = rows.iter().map(|row| row.instance).collect();
    let tags: Vec<Option<&str>> = rows.iter().map(|row| row.tags.as_deref()).collect();
    let ago: Vec<f64> = rows.iter().map(|row| row.ago_secs).collect();
    let finished: Vec<i64> =
        rows.iter().map(|row| i64::try_from(row.finished).unwrap_or(i64::MAX)).collect();
    sqlx::query!(
        r#"INSERT INTO agents AS a (name, version, instance, first_seen_at, last_seen_at,
                                   left_at, left_instance, tasks_finished, tags)
           SELECT s.name, s.version, s.instance,
                  now() - make_interval(secs => s.ago), now() - make_interval(secs => s.ago),
                  CASE WHEN $6 THEN now() END, CASE WHEN $6 THEN s.instance END, s.finished,
                  string_to_array(s.tags, ',')
             FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::float8[], $5::int8[], $7::text[])
                  AS s(name, version, instance, ago, finished, tags)
           ON CONFLICT (name) DO UPDATE SET
               version = CASE WHEN EXCLUDED.instance = a.left_instance THEN a.version
                              ELSE COALESCE(EXCLUDED.version, a.version) END,
               instance = CASE WHEN EXCLUDED.instance = a.left_instance THEN a.instance
                               ELSE COALESCE(EXCLUDED.instance, a.instance) END,
               tags = CASE WHEN EXCLUDED.instance = a.left_instance THEN a.tags
                           ELSE COALESCE(EXCLUDED.tags, a.tags) END,
               last_seen_at = CASE
                   WHEN EXCLUDED.left_at IS NOT NULL
                       THEN GREATEST(a.last_seen_at, EXCLUDED.last_seen_at)
                   WHEN EXCLUDED.instance = a.left_instance THEN a.last_seen_at
                   ELSE GREATEST(a.last_seen_at, EXCLUDED.last_seen_at)
               END,
               -- Not before a sighting already written (another process's clock of the same
               -- database, a transaction that began a moment later).
               left_at = CASE WHEN EXCLUDED.left_at IS NULL THEN a.left_at
                              ELSE GREATEST(EXCLUDED.left_at, a.last_seen_at) END,
               left_instance = CASE WHEN EXCLUDED.left_at IS NULL THEN a.left_instance
                                    ELSE EXCLUDED.left_instance END,
               tasks_finished = a.tasks_finished + EXCLUDED.tasks_finished"#,
        &names as &[&str],
        &versions as &[Option<&str>],
        &instances as &[Option<Uuid>],
        &ago,
        &finished,
        leaving,
        &tags as &[Option<&str>],
    )
    .execute(pool)
    .await
    .op("record the agents' sightings")?;
    Ok(())
}

/// Every agent seen in the last day, by name.
pub async fn list(pool: &PgPool, lease_secs: u32) -> Result<Vec<AgentInfo>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT s.name AS "name!", s.state AS "state!: AgentState", s.version,
                  s.first_seen_at AS "first_seen_at!", s.last_seen_at AS "last_seen_at!",
                  s.current_task AS "current_task: TaskId", s.tasks_finished AS "tasks_finished!",
                  coalesce(a.tags, '{}') AS "tags!"
             FROM agent_states($1) s JOIN agents a USING (name)
            ORDER BY s.name"#,
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
            tags: row.tags,
        })
        .collect())
}
