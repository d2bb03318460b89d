//! What a cluster of API replicas depends on, tested with real processes: several replicas
//! started at once on an empty database all come up and migrate it once; a rolling update of
//! the replicas loses no task and runs none twice.

use std::time::Duration;

use taskexec_protocol::{NewTask, Task, TaskStatus};
use taskexec_tests::{until, Api, ApiProcess, TestApp, TestDb, WorkerProcess, ADMIN_TOKEN, TOKEN};

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

/// A rolling update: two API processes, agents given both addresses, a client submitting all
/// the while to whichever answers (as a Service sends requests to ready replicas only). Each
/// API is stopped with SIGTERM and started again in turn, twice. Every task the client was
/// told was created runs exactly once and finishes; no answer is a 5xx but a 503 of a
/// process shutting down.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_update_of_two_api_processes_loses_no_task_and_runs_none_twice() {
    let db = TestDb::create().await;
    let settings = [("ROCKET_LEASE_SECS", "10"), ("ROCKET_KILL_GRACE_SECS", "1")];
    let mut apis = vec![ApiProcess::start_logged(&db.url, &settings).await];
    apis.push(ApiProcess::start_logged(&db.url, &settings).await);
    let urls: Vec<String> = apis.iter().map(|api| api.url.clone()).collect();
    let dir = std::env::temp_dir().join(format!("taskexec-rolling-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let both = urls.join(",");
    let _agents: Vec<WorkerProcess> = (0..3)
        .map(|n| WorkerProcess::start_with_url(&both, &format!("rolling-{n}"), &[]))
        .collect();

    // The client: a task every 20 ms until told to stop, to the first address that answers.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = {
        let (urls, dir, count) = (urls.clone(), dir.clone(), count.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut created, mut refused) = (Vec::new(), Vec::new());
            let mut n = 0;
            while !*stopped.borrow() {
                n += 1;
                // Long enough that some run across each restart, on leases the restart keeps.
                let command = format!("sleep 0.3; printf x >> {}/{n}", dir.display());
                for url in urls.iter().cycle().skip(n % 2).take(2) {
                    let sent = http
                        .post(format!("{url}/tasks"))
                        .bearer_auth(ADMIN_TOKEN)
                        .json(&NewTask::new(command.clone()))
                        .send()
                        .await;
                    let Ok(response) = sent else { continue }; // not listening: the other one
                    let status = response.status().as_u16();
                    if status == 201 {
                        let task: Task = response.json().await.unwrap();
                        created.push((n, task.id));
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        break;
                    }
                    refused.push(status);
                    if status != 503 {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (created, refused)
        })
    };

    // Tasks go on being created (and running) before, between and after the restarts.
    let created_since = |from: usize| {
        let count = count.clone();
        move || count.load(std::sync::atomic::Ordering::SeqCst) >= from + 5
    };
    for _round in 0..2 {
        // In turn: the first is back and healthy before the second stops.
        for api in std::mem::take(&mut apis) {
            let from = count.load(std::sync::atomic::Ordering::SeqCst);
            until(Duration::from_secs(30), "tasks created", created_since(from)).await;
            apis.push(api.restart().await);
        }
    }
    let from = count.load(std::sync::atomic::Ordering::SeqCst);
    until(Duration::from_secs(30), "tasks created", created_since(from)).await;
    stop.send(true).unwrap();
    let (created, refused) = client.await.unwrap();

    eprintln!("rolling update: {} tasks created, answers refused: {refused:?}", created.len());
    assert!(created.len() >= 20, "only {} tasks were created", created.len());
    assert!(refused.iter().all(|&status| status == 503), "answers off the rule: {refused:?}");
    let api = Api::new(&apis[0].url, ADMIN_TOKEN, TOKEN);
    for (n, id) in &created {
        let task = api.until_done(*id).await;
        assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
        let ran = std::fs::read(dir.join(n.to_string())).unwrap_or_default();
        assert_eq!(ran, b"x", "task {n} ({id}) ran {} times", ran.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A scale-in under load: half the agents get SIGTERM while each runs a task (as a
/// Deployment scaled down would). A short task finishes within DRAIN_TIMEOUT; a long one is
/// stopped and handed back, and runs to its end on an agent that stays. Every task completes
/// its command once.
#[tokio::test(flavor = "multi_thread")]
async fn agents_scaled_in_while_busy_finish_or_hand_back_their_tasks_and_none_runs_twice() {
    let db = TestDb::create().await;
    let api = ApiProcess::start(&db.url, &[]).await;
    let dir = std::env::temp_dir().join(format!("taskexec-scale-in-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let client = Api::new(&api.url, ADMIN_TOKEN, TOKEN);
    let drain = [("DRAIN_TIMEOUT", "1s")];
    let mut leaving: Vec<WorkerProcess> = (0..2)
        .map(|n| WorkerProcess::start_with_url(&api.url, &format!("leaving-{n}"), &drain))
        .collect();
    // Each leaving agent takes one task: one that ends within the drain, one that does not.
    let mut tasks = Vec::new();
    for (n, secs) in [(0, "0.3"), (1, "5")] {
        let marker = dir.join(format!("started-{n}"));
        let command =
            format!("touch {}; sleep {secs}; printf x >> {}/{n}", marker.display(), dir.display());
        tasks.push((n, client.submit(&command).await.id));
    }
    until(Duration::from_secs(30), "both leaving agents busy", || {
        (0..2).all(|n| dir.join(format!("started-{n}")).exists())
    })
    .await;

    for agent in &leaving {
        agent.signal(libc::SIGTERM);
    }
    let staying = WorkerProcess::start_with_url(&api.url, "staying", &[]);
    for n in 2..12usize {
        let command = format!("printf x >> {}/{n}", dir.display());
        tasks.push((n, client.submit(&command).await.id));
    }

    for agent in &mut leaving {
        let status = agent.wait(Duration::from_secs(30)).await.expect("a leaving agent exits");
        assert!(status.success(), "{status}");
    }
    for (n, id) in &tasks {
        let task = client.until_done(*id).await;
        assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
        let ran = std::fs::read(dir.join(n.to_string())).unwrap_or_default();
        assert_eq!(ran, b"x", "task {n} completed {} times", ran.len());
    }
    let short = client.get(tasks[0].1).await.unwrap();
    let finisher = short.agent.unwrap_or_default();
    assert!(finisher.starts_with("leaving-"), "finished within the drain, by {finisher}");
    let long = client.get(tasks[1].1).await.unwrap();
    assert_eq!(long.agent.as_deref(), Some("staying"), "handed back, then run by the stayer");
    drop(staying);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The rule that makes rolling updates and rollbacks safe: a newer release's migrations only
/// add, and a release runs against a database a newer one has migrated. Played here with a
/// "next release" migration applied on top (a new column with a default, a new table, recorded
/// in `_sqlx_migrations` as sqlx would): this release starts on it and runs a task through.
#[tokio::test(flavor = "multi_thread")]
async fn a_release_keeps_working_on_a_schema_a_newer_release_extended() {
    let db = TestDb::create().await;
    let api = ApiProcess::start(&db.url, &[]).await;
    let pool = db.pool().await;
    for statement in [
        "ALTER TABLE tasks ADD COLUMN next_release_note text NOT NULL DEFAULT ''",
        "CREATE TABLE next_release_things (id bigint PRIMARY KEY)",
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99990101000000, 'next release', true, '\\x00', 1)",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }

    let api = api.restart().await;
    let _agent = WorkerProcess::start_with_url(&api.url, "older", &[]);
    let client = Api::new(&api.url, ADMIN_TOKEN, TOKEN);
    let task = client.submit("echo still works").await;

    let done = client.until_done(task.id).await;
    assert_eq!(done.status, TaskStatus::Finished, "{done:?}");
    assert_eq!(done.stdout.as_deref(), Some("still works\n"));
}

/// KEDA's query in deploy/kubernetes/keda-scaledobject.yaml, run against the real schema: it
/// counts the untagged tasks that are running or due, not the delayed, tagged or ended ones.
#[tokio::test(flavor = "multi_thread")]
async fn the_autoscalers_query_counts_the_tasks_an_agent_is_needed_for() {
    let manifest = include_str!("../deploy/kubernetes/keda-scaledobject.yaml");
    // The folded scalar after `query: >-`: its more-indented lines, joined by spaces.
    let mut lines = manifest.lines().skip_while(|line| !line.trim().starts_with("query: >-"));
    let indent = |line: &str| line.len() - line.trim_start().len();
    let head = lines.next().expect("a query in the ScaledObject");
    let query: Vec<&str> =
        lines.take_while(|line| indent(line) > indent(head)).map(str::trim).collect();
    let query = query.join(" ");
    let app = TestApp::spawn().await;
    for task in [
        NewTask::new("true"),
        NewTask::new("true"),
        NewTask { delay_secs: Some(3600), ..NewTask::new("later") },
        NewTask { tags: vec!["gpu".into()], ..NewTask::new("elsewhere") },
    ] {
        app.create(&task).await.unwrap();
    }
    let running = app.pick("busy", 0).await.unwrap().expect("a due task");
    let ended = app.submit("done").await;
    app.abort(ended.id).await.unwrap();

    let pool = app.db.pool().await;
    let count: i64 = sqlx::query_scalar(&query).fetch_one(&pool).await.unwrap();

    assert_eq!(
        count, 2,
        "one running ({}), one due; not the delayed, tagged or ended",
        running.task.id
    );
}
