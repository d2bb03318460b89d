//! What a cluster of API replicas depends on, tested with real processes: several replicas
//! started at once on an empty database all come up, and the schema is migrated once.

use taskexec_tests::{ApiProcess, TestDb};

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_started_at_once_on_an_empty_database_all_come_up_migrating_it_once() {
    let db = TestDb::create().await;

    // Each start returns once its process answers /health (it fails the test after 30 s).
    let (a, b, c) = tokio::join!(
        ApiProcess::start(&db.url, &[]),
        ApiProcess::start(&db.url, &[]),
        ApiProcess::start(&db.url, &[]),
    );

    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().path().extension().is_some_and(|e| e == "sql"))
        .count();
    let pool = db.pool().await;
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(applied.len(), migrations, "each migration recorded once: {applied:?}");
    assert!(applied.iter().all(|(_, success)| *success), "{applied:?}");
    for api in [&a, &b, &c] {
        let health = reqwest::get(format!("{}/health", api.url)).await.unwrap();
        assert_eq!(health.status(), 200, "{}", api.url);
    }
}
