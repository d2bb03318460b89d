//! Retention: ended tasks older than `retention_days` go, with their output; nothing else does.

use taskexec_api::retention;
use taskexec_protocol::{FinishReport, Stream, TaskId, TaskStatus};
use taskexec_tests::TestApp;

/// Moves every time of `ids` `days` into the past, as if they had run then.
async fn age(app: &TestApp, ids: &[TaskId], days: i32) {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.to_string().parse().unwrap()).collect();
    sqlx::query(
        "UPDATE tasks SET created_at = created_at - make_interval(days => $2),
                          started_at = started_at - make_interval(days => $2),
                          running_at = running_at - make_interval(days => $2),
                          finished_at = finished_at - make_interval(days => $2)
          WHERE id = ANY($1)",
    )
    .bind(&ids)
    .bind(days)
    .execute(&app.db.pool().await)
    .await
    .unwrap();
}

/// A task run to its end with some output, by the test acting as its agent.
async fn finished(app: &TestApp, n: usize) -> TaskId {
    let id = app.submit(&format!("echo {n}")).await.id;
    let picked = app.pick("keeper", 0).await.unwrap().expect("the task");
    assert_eq!(picked.task.id, id);
    app.upload(id, picked.lease, Stream::Stdout, 0, false, b"out\n").await.unwrap();
    let task = app.finish(id, &FinishReport::exited(picked.lease, 0)).await.unwrap();
    assert_eq!(task.status, TaskStatus::Finished);
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_ended_past_retention_go_with_their_output_and_nothing_else_does() {
    let app = TestApp::spawn_with(|figment| figment.merge(("retention_days", 0))).await;
    let old_done = finished(&app, 1).await;
    let old_done_too = finished(&app, 2).await;
    let recent_done = finished(&app, 3).await;
    let old_cancelled = app.submit("echo 4").await.id;
    app.abort(old_cancelled).await.unwrap();
    // Created long ago but not ended: kept, whatever their age.
    let old_running = app.submit("sleep 1").await.id;
    let running = app.pick("keeper", 0).await.unwrap().expect("the task");
    assert_eq!(running.task.id, old_running);
    let old_queued = app.submit("echo queued").await.id;
    // Idempotency keys: one past its 24 hours, one not; their tasks are queued and stay.
    let keyed = taskexec_protocol::NewTask::new("echo keyed");
    let (stale_key_task, _) = app.create_keyed(&keyed, "stale").await.unwrap();
    app.create_keyed(&keyed, "fresh").await.unwrap();
    age(&app, &[old_done, old_done_too, old_cancelled, old_running, old_queued], 31).await;
    let pool = app.db.pool().await;
    sqlx::query(
        "INSERT INTO agents (name, first_seen_at, last_seen_at)
                 VALUES ('ancient', now() - interval '40 days', now() - interval '40 days'),
                        ('recent', now(), now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'stale'",
    )
    .execute(&pool)
    .await
    .unwrap();

    // 0 keeps everything.
    // 0 keeps every task (keys expire all the same: they are not history).
    let deleted = retention::run_once(&pool, 0, 1000).await.unwrap();
    assert_eq!(deleted, retention::Deleted { tasks: 0, agents: 0, keys: 1 });

    // Batches of one: every old ended task goes all the same.
    let deleted = retention::run_once(&pool, 30, 1).await.unwrap();
    assert_eq!(deleted, retention::Deleted { tasks: 3, agents: 1, keys: 0 });
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT key FROM idempotency_keys").fetch_all(&pool).await.unwrap();
    assert_eq!(keys, ["fresh"]);
    assert!(app.get(stale_key_task.id).await.is_ok(), "a key's expiry leaves its task");
    // The stale key is free again: it makes a new task.
    let (again, created) = app.create_keyed(&keyed, "stale").await.unwrap();
    assert!(created && again.id != stale_key_task.id);
    for id in [old_done, old_done_too, old_cancelled] {
        assert_eq!(app.get(id).await.unwrap_err().status, 404, "{id} kept");
    }
    for id in [recent_done, old_running, old_queued] {
        assert!(app.get(id).await.is_ok(), "{id} deleted");
    }
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_output o WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = o.task_id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0);
    // Attempts go with their task: only the recent task's one is left.
    let attempts: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT task_id FROM task_attempts").fetch_all(&pool).await.unwrap();
    assert_eq!(attempts, [recent_done.to_string().parse::<uuid::Uuid>().unwrap()]);
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM task_output").fetch_one(&pool).await.unwrap();
    assert!(kept >= 1, "the recent task's output is kept");
    let agents: Vec<String> =
        sqlx::query_scalar("SELECT name FROM agents ORDER BY name").fetch_all(&pool).await.unwrap();
    assert!(!agents.contains(&"ancient".to_owned()) && agents.contains(&"recent".to_owned()));

    // A second pass finds nothing more.
    assert_eq!(retention::run_once(&pool, 30, 1000).await.unwrap().tasks, 0);
}
