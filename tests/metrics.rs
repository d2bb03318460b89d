//! `GET /metrics`: what an operator scrapes. The figures are checked against what the test did,
//! and the queue's figures against the database; a scrape's cost in statements is counted.

use std::sync::Arc;
use std::time::Duration;

use taskexec_protocol::{FinishReport, NewTask, TaskStatus};
use taskexec_tests::{PgProxy, TestApp, TestDb, ADMIN_TOKEN};

/// The scrape's text, after checking its format.
async fn scrape(app: &TestApp) -> String {
    let response = reqwest::Client::new()
        .get(format!("{}/metrics", app.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let format = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(format.starts_with("text/plain") && format.contains("version=0.0.4"), "{format}");
    response.text().await.unwrap()
}

/// The value of the sample `series` (name and labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_scrape_counts_what_happened_with_route_templates_not_ids() {
    let app = TestApp::spawn().await;
    let tasks: Vec<_> = submit_many(&app, 3).await;
    // One task picked and finished, one cancelled while queued, one left queued.
    let picked = app.pick("metered", 0).await.unwrap().expect("a task");
    let mut report = FinishReport::exited(picked.lease, 0);
    report.started_ms_ago = Some(5);
    let finished = app.finish(picked.task.id, &report).await.unwrap();
    assert_eq!(finished.status, TaskStatus::Finished);
    let cancelled = tasks.iter().find(|id| **id != picked.task.id).copied().unwrap();
    app.abort(cancelled).await.unwrap();
    let _ = app.get(cancelled).await;

    let text = scrape(&app).await;

    let value = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert_eq!(value(r#"taskexec_tasks{status="queued"}"#), 1.0);
    assert_eq!(value(r#"taskexec_tasks{status="in_progress"}"#), 0.0);
    assert!(value("taskexec_queue_oldest_age_seconds") > 0.0);
    assert_eq!(value("taskexec_tasks_stuck"), 0.0);
    assert_eq!(value(r#"taskexec_tasks_completed_total{status="finished"}"#), 1.0);
    assert_eq!(value(r#"taskexec_tasks_completed_total{status="cancelled"}"#), 1.0);
    assert_eq!(value("taskexec_pick_latency_seconds_count"), 1.0);
    assert_eq!(value("taskexec_task_run_seconds_count"), 1.0);
    assert_eq!(value("taskexec_parked_picks"), 0.0);
    assert_eq!(
        value(r#"taskexec_http_requests_total{method="POST",route="/tasks",status="201"}"#),
        3.0
    );
    assert_eq!(
        value(r#"taskexec_http_requests_total{method="GET",route="/tasks/<id>",status="200"}"#),
        1.0
    );
    assert!(value(r#"taskexec_db_pool_connections{state="idle"}"#) >= 0.0);
    assert_eq!(value("taskexec_listen_reconnects_total"), 0.0);
    assert_eq!(
        value(&format!(r#"taskexec_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION"))),
        1.0
    );
    for id in &tasks {
        assert!(!text.contains(&id.to_string()), "a task id in a label:\n{text}");
    }
    assert!(text.contains("# TYPE taskexec_pick_latency_seconds histogram"), "{text}");
    assert!(text.contains("# HELP taskexec_tasks_stuck "), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn delayed_tasks_and_tasks_no_live_agent_can_take_are_counted_apart() {
    let app = TestApp::spawn().await;
    // An agent declares its tags with its pick; the registry shows them once written.
    assert!(app.pick_tagged("gpu-box", "linux,gpu", 0).await.unwrap().is_none());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let agents = app.agents().await.unwrap();
        if agents.iter().any(|a| a.name == "gpu-box" && a.tags == ["gpu", "linux"]) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "tags never shown: {agents:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tagged = |tags: &[&str]| NewTask {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..NewTask::new("true")
    };
    app.create(&tagged(&["gpu"])).await.unwrap();
    app.create(&tagged(&["arm64"])).await.unwrap();
    app.create(&tagged(&["arm64", "gpu"])).await.unwrap();
    app.create(&NewTask { delay_secs: Some(3600), ..NewTask::new("later") }).await.unwrap();

    let text = scrape(&app).await;

    let value = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert_eq!(value(r#"taskexec_tasks{status="queued"}"#), 4.0);
    assert_eq!(value("taskexec_tasks_delayed"), 1.0);
    assert_eq!(value("taskexec_tasks_unroutable"), 2.0, "the arm64 tasks");
    assert!(text.contains("# HELP taskexec_tasks_unroutable "), "{text}");
}

/// Submits `count` tasks, returns their ids.
async fn submit_many(app: &TestApp, count: usize) -> Vec<taskexec_protocol::TaskId> {
    let mut ids = Vec::new();
    for n in 0..count {
        ids.push(app.submit(&format!("echo {n}")).await.id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn scrapes_count_the_queue_at_most_once_per_refresh_period() {
    let db = Arc::new(TestDb::create().await);
    let proxy = PgProxy::start(&db).await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_on(db.clone(), move |figment| {
        figment
            .merge((taskexec_api::config::DATABASE_URL_KEY, url))
            .merge(("metrics_refresh_secs", 3600))
    })
    .await;
    let peer = TestApp::spawn_on(db, |figment| figment.merge(("metrics_refresh_secs", 3600))).await;
    app.submit("true").await;
    let first = scrape(&app).await;
    assert_eq!(sample(&first, r#"taskexec_tasks{status="queued"}"#), Some(1.0));

    // Twenty scrapes more cost no statement: they read this process's copy.
    let before = proxy.statements();
    for _ in 0..20 {
        scrape(&app).await;
    }
    // Scrapes count as requests but reach the database only through the token check, which
    // the verifier caches.
    let spent = proxy.statements() - before;
    assert!(spent <= 1, "20 scrapes cost {spent} statements");

    // Another process finds the shared count fresh and reads it rather than counting again:
    // a task submitted meanwhile is not in it yet.
    peer.submit("true").await;
    let other = scrape(&peer).await;
    assert_eq!(sample(&other, r#"taskexec_tasks{status="queued"}"#), Some(1.0), "{other}");
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_that_find_the_count_stale_together_all_read_the_one_count() {
    let app = TestApp::spawn().await;
    let peer = app.spawn_peer().await;
    app.submit("true").await;
    app.submit("true").await;
    // The shared row held here, both processes find it stale and queue up behind its lock.
    let pool = app.db.pool().await;
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM metrics_snapshot FOR UPDATE").execute(&mut *holder).await.unwrap();
    let scrapes: Vec<_> = [app.url.clone(), peer.url.clone()]
        .into_iter()
        .map(|url| {
            tokio::spawn(async move {
                let response = reqwest::Client::new()
                    .get(format!("{url}/metrics"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.text().await.unwrap()
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{waiting} waiting for the row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    holder.commit().await.unwrap();
    // One counts; the other, having waited, reads that count (before, it read the row as it
    // was when its statement began: the seed, which failed the scrape).
    for scrape in scrapes {
        let text = scrape.await.unwrap();
        assert_eq!(sample(&text, r#"taskexec_tasks{status="queued"}"#), Some(2.0), "{text}");
    }
}

/// A Prometheus server of its own (Debian's `prometheus`, which `make test` installs with
/// promtool), scraping `target` every second with `token` and evaluating `rules`.
struct Prometheus {
    url: String,
    _dir: TempDir,
    _child: tokio::process::Child,
}

/// A folder removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Prometheus {
    async fn start(target: &str, token: &str, rules: &str) -> Prometheus {
        let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|path| std::path::Path::new(path).exists())
            .expect("prometheus is installed (scripts/promtool-check installs Debian's package)");
        let dir = std::env::temp_dir().join(format!("taskexec-prom-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("token"), token).unwrap();
        std::fs::write(dir.join("alerts.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n  - job_name: taskexec-api\n    authorization:\n      \
             credentials_file: {token}\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules = dir.join("alerts.yml").display(),
            token = dir.join("token").display(),
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = tokio::process::Command::new(binary)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ready = reqwest::get(format!("{url}/-/ready")).await;
            if ready.is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "prometheus never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Prometheus { url, _dir: TempDir(dir), _child: child }
    }

    async fn api(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.url)).await.unwrap().json().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_api_and_fires_the_no_agent_alert() {
    let app = TestApp::spawn_with(|figment| figment.merge(("metrics_refresh_secs", 1))).await;
    for n in 0..3 {
        app.submit(&format!("echo {n}")).await;
    }
    let reader = app.token("prometheus", taskexec_protocol::Role::Reader).await;
    // The shipped rules, with test-sized durations.
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml"),
    )
    .unwrap();
    let rules: String = shipped
        .lines()
        .map(|line| match line.split_once("for: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: 2s\n"),
            _ => format!("{line}\n"),
        })
        .collect();
    let target = app.url.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&target, &reader, &rules).await;

    // No agent runs: the alert fires in Prometheus itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let alerts = prometheus.api("/api/v1/alerts").await;
        let firing = alerts["data"]["alerts"].as_array().into_iter().flatten().any(|alert| {
            alert["labels"]["alertname"] == "TaskexecNoAgent" && alert["state"] == "firing"
        });
        if firing {
            break;
        }
        let targets = prometheus.api("/api/v1/targets").await;
        assert!(tokio::time::Instant::now() < deadline, "never firing: {alerts}\n{targets}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // What Prometheus read is the database's count.
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'queued'")
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap();
    let answer =
        prometheus.api("/api/v1/query?query=taskexec_tasks%7Bstatus%3D%22queued%22%7D").await;
    let value = answer["data"]["result"][0]["value"][1].as_str().unwrap_or_default().to_owned();
    assert_eq!(value, queued.to_string(), "{answer}");
    assert_eq!(queued, 3);

    // Every query of the shipped dashboard runs in Prometheus, and the queue's shows the queue.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/grafana/taskexec.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut queries = 0;
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$job", "taskexec-api");
            let mut url = reqwest::Url::parse(&format!("{}/api/v1/query", prometheus.url)).unwrap();
            url.query_pairs_mut().append_pair("query", &expr);
            let answer: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
            assert_eq!(answer["status"], "success", "{}: {expr}: {answer}", panel["title"]);
            // The panels of figures that exist from the first scrape show something (a wrong
            // name or label would show nothing); rates and quantiles need history.
            let result = answer["data"]["result"].as_array().unwrap();
            if !expr.contains('[') {
                assert!(!result.is_empty(), "{}: {expr}: nothing", panel["title"]);
            }
            if panel["title"] == "Queued" {
                assert_eq!(result[0]["value"][1], "3", "{answer}");
            }
            queries += 1;
        }
    }
    assert!(queries >= 16, "{queries} queries");
    // And names only metrics the API exports.
    let text = scrape(&app).await;
    let exported: std::collections::HashSet<&str> =
        text.lines().filter_map(|line| line.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    let named = dashboard.to_string();
    for name in named.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if let Some(name) = name.strip_prefix("taskexec_") {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(exported.contains(format!("taskexec_{base}").as_str()), "taskexec_{name}");
        }
    }
}
