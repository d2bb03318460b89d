//! End to end: the real worker binary against the API and PostgreSQL.

use std::time::Duration;

use taskexec_tests::{TestApp, WorkerProcess, TOKEN};

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_runs_commands_and_reports_output_and_exit_codes() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "e2e-agent", &[]);
    let echo = app.create("echo hello").await;
    let exit = app.create("echo partial; exit 3").await;
    let stderr = app.create("echo oops >&2").await;

    let echo = app.until_done(echo["id"].as_str().unwrap()).await;
    let exit = app.until_done(exit["id"].as_str().unwrap()).await;
    let stderr = app.until_done(stderr["id"].as_str().unwrap()).await;

    assert_eq!(echo["status"], "finished");
    assert_eq!(echo["exit_code"], 0);
    assert_eq!(echo["stdout"], "hello\n");
    assert_eq!(echo["stderr"], "");
    assert_eq!(echo["agent"], "e2e-agent");
    assert_eq!(echo["attempts"], 1);
    let moments = ["created_at", "started_at", "running_at", "finished_at"].map(|f| {
        let text = echo[f].as_str().unwrap_or_else(|| panic!("{f} is set: {echo}"));
        chrono::DateTime::parse_from_rfc3339(text).unwrap()
    });
    assert!(moments.windows(2).all(|w| w[0] <= w[1]), "in order: {moments:?}");
    assert_eq!(exit["status"], "finished");
    assert_eq!(exit["exit_code"], 3);
    assert_eq!(exit["stdout"], "partial\n");
    assert_eq!(stderr["stdout"], "");
    assert_eq!(stderr["stderr"], "oops\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_killed_by_a_signal_fails_with_the_reason() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "agent", &[]);

    let task = app.create("echo before; kill -KILL $$").await;

    let task = app.until_done(task["id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "failed");
    assert_eq!(task["error"], "killed by signal 9 (SIGKILL)");
    assert_eq!(task["stdout"], "before\n");
    assert!(task["exit_code"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_output_is_reported_lossily_and_flagged() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "agent", &[]);

    let task = app.create(r"printf 'ok\000\377\376end'; printf 'clean' >&2").await;

    let task = app.until_done(task["id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "finished");
    assert_eq!(task["stdout"], "ok\u{FFFD}\u{FFFD}\u{FFFD}end");
    assert_eq!(task["stdout_lossy"], true);
    assert_eq!(task["stderr"], "clean");
    assert_eq!(task["stderr_lossy"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_do_not_see_the_agent_token_or_other_secrets() {
    let app = TestApp::spawn().await;
    let secrets = [("DB_PASSWORD", "hunter2"), ("SOME_API_KEY", "k-123"), ("HARMLESS", "visible")];
    let _worker = WorkerProcess::start(&app, "agent", &secrets);

    let task = app.create("env").await;

    let task = app.until_done(task["id"].as_str().unwrap()).await;
    let env = task["stdout"].as_str().unwrap();
    assert!(env.contains("HARMLESS=visible"), "the environment is passed on: {env}");
    for leaked in [TOKEN, "AGENT_TOKEN", "hunter2", "k-123"] {
        assert!(!env.contains(leaked), "{leaked} reached the command");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_cannot_read_the_agent_token_from_the_agents_proc_entries() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start_unprivileged(&app, "guarded", &[]);
    // The command's parent is the guard; the guard's parent is the agent.
    let command = "agent=$(awk '{print $4}' /proc/$PPID/stat); \
                   cat /proc/$PPID/environ /proc/$agent/environ 2>&1 | tr '\\0' '\\n'; \
                   echo checked $agent";

    let task = app.create(command).await;

    let task = app.until_done(task["id"].as_str().unwrap()).await;
    let seen = task["stdout"].as_str().unwrap();
    assert!(seen.contains("checked "), "{seen}");
    assert!(!seen.contains(TOKEN), "the token leaked through /proc: {seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_task_lets_it_finish_and_report_then_exits_0() {
    let app = TestApp::spawn().await;
    let dir = std::env::temp_dir().join(format!("taskexec-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut worker = WorkerProcess::start(&app, "draining", &[]);
    let command = format!(
        "touch {0}/started; while [ ! -e {0}/go ]; do sleep 0.02; done; echo done",
        dir.display()
    );
    let task = app.create(&command).await;
    let id = task["id"].as_str().unwrap();
    until_exists(&dir.join("started")).await;

    worker.signal(libc::SIGTERM);
    let later = app.create("echo must wait for another agent").await;
    std::fs::write(dir.join("go"), b"").unwrap();

    let status = worker.wait(Duration::from_secs(30)).await.expect("the worker exits");
    assert!(status.success(), "exit status {status}");
    let task = app.task(id).await;
    assert_eq!(task["status"], "finished");
    assert_eq!(task["stdout"], "done\n");
    assert_eq!(app.task(later["id"].as_str().unwrap()).await["status"], "queued");
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_idle_exits_0_at_once() {
    let app = TestApp::spawn().await;
    let mut worker = WorkerProcess::start(&app, "idle", &[]);
    app.until_parked(1).await;

    worker.signal(libc::SIGTERM);

    let status =
        worker.wait(Duration::from_secs(5)).await.expect("exits without waiting for the pick");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_keeps_trying_until_the_api_is_reachable() {
    // Reserve a port, start the worker against it while nothing listens, then start the API there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let placeholder = TestApp::spawn().await;
    let mut worker = {
        let mut app_url = placeholder.url.clone();
        app_url.truncate(app_url.rfind(':').unwrap());
        let url = format!("{app_url}:{port}");
        WorkerProcess::start_with_url(&url, "patient", &[])
    };
    let db = placeholder.stop().await;

    let app = TestApp::spawn_on(db, move |figment| figment.merge(("port", port))).await;
    let task = app.create("echo finally").await;

    let task = app.until_done(task["id"].as_str().unwrap()).await;
    assert_eq!(task["stdout"], "finally\n");
    assert!(worker.wait(Duration::from_millis(10)).await.is_none(), "still running");
}

async fn until_exists(path: &std::path::Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(tokio::time::Instant::now() < deadline, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
