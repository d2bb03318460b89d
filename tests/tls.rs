//! TLS: the API serves HTTPS with a certificate made in the test, the agent runs a task over it
//! and refuses a server it cannot verify, and the API reaches PostgreSQL over TLS when its
//! database URL asks for it.

use std::sync::Arc;
use std::time::Duration;

use taskexec_protocol::TaskStatus;
use taskexec_tests::{PgCluster, TestApp, TestCa, TestDb, WorkerProcess};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_runs_a_task_over_https_end_to_end() {
    let ca = TestCa::new();
    let app = TestApp::spawn_tls(&ca).await;
    let ca_file = ca.ca().display().to_string();
    let _agent = WorkerProcess::start(&app, "tls-agent", &[("BACKEND_API_CA_FILE", &ca_file)]);

    let task = app.submit("echo over tls").await;
    let task = app.until_done(task.id).await;

    assert!(app.url.starts_with("https://"), "{}", app.url);
    assert_eq!(task.status, TaskStatus::Finished);
    assert_eq!(task.stdout.as_deref(), Some("over tls\n"));
    assert_eq!(task.agent.as_deref(), Some("tls-agent"));
    let plain = app.url.replace("https://", "http://");
    let refused = reqwest::get(format!("{plain}/health")).await;
    assert!(refused.is_err() || !refused.unwrap().status().is_success(), "no plain HTTP");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_cannot_verify_the_server_refuses_it_and_says_why() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let app = TestApp::spawn_tls(&ca).await;
    let wrong_ca = other.ca().display().to_string();
    let untrusting = WorkerProcess::start(&app, "no-ca", &[]);
    let mistrusting = WorkerProcess::start(&app, "wrong-ca", &[("BACKEND_API_CA_FILE", &wrong_ca)]);
    let task = app.submit("echo never").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    for agent in [&untrusting, &mistrusting] {
        while !agent.log().contains("TLS certificate was not accepted") {
            assert!(Instant::now() < deadline, "no clear error: {}", agent.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    assert_eq!(app.get(task.id).await.unwrap().status, TaskStatus::Queued, "nobody took it");
    assert_eq!(app.health().await.unwrap()["parked_picks"], 0, "no pick got through");
}

/// The API's connections to its database, and whether each uses TLS.
async fn connections(admin_url: &str, database: &str) -> Vec<bool> {
    let admin = sqlx::PgPool::connect(admin_url).await.unwrap();
    sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
          WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_all(&admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_reaches_postgresql_over_tls_when_its_url_asks() {
    let ca = TestCa::new();
    let cluster = PgCluster::start_tls(&ca);
    let root = ca.ca().display().to_string();

    for query in ["sslmode=require".to_owned(), format!("sslmode=verify-full&sslrootcert={root}")] {
        let db = Arc::new(TestDb::create_on(&cluster.admin_url).await);
        let url = format!("{}?{query}", db.url);
        let app = TestApp::spawn_on(db.clone(), move |f| {
            f.merge((taskexec_api::config::DATABASE_URL_KEY, url))
        })
        .await;
        let task = app.submit("true").await;
        app.get(task.id).await.unwrap();

        let ssl = connections(&cluster.admin_url, &db.name).await;
        assert!(!ssl.is_empty() && ssl.iter().all(|on| *on), "{query}: {ssl:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_that_cannot_verify_its_database_does_not_start() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let cluster = PgCluster::start_tls(&ca);
    let db = TestDb::create_on(&cluster.admin_url).await;
    let url = format!("{}?sslmode=verify-full&sslrootcert={}", db.url, other.ca().display());

    let figment = taskexec_tests::test_figment(&url);
    let ignited = taskexec_api::build(figment).ignite().await;

    let Err(error) = ignited else {
        panic!("the server started on a database it could not verify")
    };
    assert!(matches!(error.kind(), rocket::error::ErrorKind::FailedFairings(_)), "{error}");
    // The same, trusting the right CA, starts: the certificate was the reason.
    let trusted = format!("{}?sslmode=verify-full&sslrootcert={}", db.url, ca.ca().display());
    let ignited = taskexec_api::build(taskexec_tests::test_figment(&trusted)).ignite().await;
    assert!(ignited.is_ok(), "{:?}", ignited.err().map(|e| e.to_string()));
}
