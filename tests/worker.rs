//! End to end: the real worker binary against the API and PostgreSQL.

use std::time::Duration;

use taskexec_protocol::{FinishReport, Stream, Task, TaskStatus};
use taskexec_tests::{TestApp, WorkerProcess, TOKEN};

/// Asserts that `task` was created, picked, seen running and finished, in that order.
fn assert_moments_in_order(task: &Task) {
    let moments = [
        ("created_at", Some(task.created_at)),
        ("started_at", task.started_at),
        ("running_at", task.running_at),
        ("finished_at", task.finished_at),
    ]
    .map(|(name, at)| at.unwrap_or_else(|| panic!("{name} is set: {task:?}")));
    assert!(moments.windows(2).all(|w| w[0] <= w[1]), "in order: {moments:?} of {task:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_runs_commands_and_reports_output_and_exit_codes() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "e2e-agent", &[]);
    let echo = app.submit("echo hello").await;
    let exit = app.submit("echo partial; exit 3").await;
    let stderr = app.submit("echo oops >&2").await;

    let echo = app.until_done(echo.id).await;
    let exit = app.until_done(exit.id).await;
    let stderr = app.until_done(stderr.id).await;

    assert_eq!(echo.status, TaskStatus::Finished);
    assert_eq!(echo.exit_code, Some(0));
    assert_eq!(echo.stdout.as_deref(), Some("hello\n"));
    assert_eq!(echo.stderr.as_deref(), Some(""));
    assert_eq!(echo.agent.as_deref(), Some("e2e-agent"));
    assert_eq!(echo.attempts, 1);
    assert_eq!(exit.status, TaskStatus::Finished);
    assert_eq!(exit.exit_code, Some(3));
    assert_eq!(exit.stdout.as_deref(), Some("partial\n"));
    assert_eq!(stderr.stdout.as_deref(), Some(""));
    assert_eq!(stderr.stderr.as_deref(), Some("oops\n"));
    // Quick commands end before their first heartbeat: running_at is still set.
    for task in [&echo, &exit, &stderr] {
        assert_moments_in_order(task);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_that_ends_before_its_first_heartbeat_still_has_running_at() {
    let app = TestApp::spawn().await;
    let quick = app.submit("true").await;
    let picked = app.pick("quick", 0).await.unwrap().expect("the queued task");
    assert_eq!(picked.task.id, quick.id);
    assert_eq!(picked.task.running_at, None, "not running before a heartbeat");

    // No heartbeat: the command started 5 ms before the report and ended.
    let report = FinishReport { started_ms_ago: Some(5), ..FinishReport::exited(picked.lease, 0) };
    let quick = app.finish(quick.id, &report).await.unwrap();

    assert_eq!(quick.status, TaskStatus::Finished);
    assert_moments_in_order(&quick);
    let (running, finished) = (quick.running_at.unwrap(), quick.finished_at.unwrap());
    assert!(
        finished - running <= chrono::Duration::milliseconds(5),
        "running_at is the finish less how long ago it started: {quick:?}"
    );
    assert_eq!(app.get(quick.id).await.unwrap(), quick, "as stored");

    // A command that never started states no running time, and was never seen running.
    let unstarted = app.submit("no-such-command").await;
    let picked = app.pick("quick", 0).await.unwrap().expect("the queued task");
    assert_eq!(picked.task.id, unstarted.id);
    let report = FinishReport::failed(
        picked.lease,
        "could not start the command: No such file or directory (os error 2)",
    );

    let unstarted = app.finish(unstarted.id, &report).await.unwrap();

    assert_eq!(unstarted.status, TaskStatus::Failed);
    assert!(unstarted.started_at.is_some() && unstarted.finished_at.is_some(), "{unstarted:?}");
    assert_eq!(unstarted.running_at, None, "it never ran: {unstarted:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_killed_by_a_signal_fails_with_the_reason() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "agent", &[]);

    let task = app.submit("echo before; kill -KILL $$").await;

    let task = app.until_done(task.id).await;
    assert_eq!(task.status, TaskStatus::Failed);
    assert_eq!(task.error.as_deref(), Some("killed by signal 9 (SIGKILL)"));
    assert_eq!(task.stdout.as_deref(), Some("before\n"));
    assert_eq!(task.exit_code, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_output_is_reported_lossily_and_flagged() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "agent", &[]);

    let task = app.submit(r"printf 'ok\000\377\376end'; printf 'clean' >&2").await;

    let task = app.until_done(task.id).await;
    assert_eq!(task.status, TaskStatus::Finished);
    assert_eq!(task.stdout.as_deref(), Some("ok\u{FFFD}\u{FFFD}\u{FFFD}end"));
    assert!(task.stdout_lossy);
    assert_eq!(task.stderr.as_deref(), Some("clean"));
    assert!(!task.stderr_lossy);
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_do_not_see_the_agent_token_or_other_secrets() {
    let app = TestApp::spawn().await;
    // An allowlist: what TASK_ENV_ALLOW names (and PATH, HOME, ...) passes, nothing else does,
    // whatever its name looks like.
    let env = [
        ("DB_PASSWORD", "hunter2"),
        ("SOME_API_KEY", "k-123"),
        ("HARMLESS", "visible"),
        ("BUILD_NUMBER", "42"),
        ("UNLISTED", "hidden"),
        ("TASK_ENV_ALLOW", "HARMLESS,BUILD_*"),
    ];
    let _worker = WorkerProcess::start(&app, "agent", &env);

    let task = app.submit("env").await;

    let task = app.until_done(task.id).await;
    let env = task.stdout.as_deref().unwrap();
    for passed in ["HARMLESS=visible", "BUILD_NUMBER=42", "PATH="] {
        assert!(env.contains(passed), "{passed} is passed on: {env}");
    }
    for leaked in [TOKEN, "AGENT_TOKEN", "hunter2", "k-123", "hidden"] {
        assert!(!env.contains(leaked), "{leaked} reached the command");
    }
}

/// Waits until `worker` has asked for work (its pick is parked); a worker that exits or never
/// asks fails the test with its log, which says why.
async fn until_worker_parked(app: &TestApp, worker: &mut WorkerProcess) {
    let api = app.api.clone();
    let mut parked = tokio::spawn(async move { api.until_parked(1).await });
    let why = tokio::select! {
        parked = &mut parked => match parked {
            Ok(()) => return,
            Err(e) => format!("it never asked for work ({e})"),
        },
        status = worker.child.wait() => format!("it exited ({status:?}) before asking for work"),
    };
    parked.abort();
    // The log is read from the worker's stderr as it comes: give its last lines a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    panic!("the worker is not ready: {why}; its log:\n{}", worker.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_cannot_read_the_agent_token_from_the_agents_proc_entries() {
    let app = TestApp::spawn().await;
    let mut worker = WorkerProcess::start_unprivileged(&app, "guarded", &[]);
    until_worker_parked(&app, &mut worker).await;
    // The command's parent is the guard; the guard's parent is the agent.
    let command = "agent=$(awk '{print $4}' /proc/$PPID/stat); \
                   cat /proc/$PPID/environ /proc/$agent/environ 2>&1 | tr '\\0' '\\n'; \
                   echo checked $agent";

    let task = app.submit(command).await;

    let task = app.until_done(task.id).await;
    let seen = task.stdout.as_deref().unwrap();
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
        "echo started; while [ ! -e {}/go ]; do sleep 0.02; done; echo done",
        dir.display()
    );
    let task = app.submit(&command).await;
    // The command runs once its first line is streamed.
    let started = app.output(task.id, Stream::Stdout, 0, 30).await.unwrap();
    assert_eq!(started.data, b"started\n", "the command is running");

    worker.signal(libc::SIGTERM);
    let later = app.submit("echo must wait for another agent").await;
    std::fs::write(dir.join("go"), b"").unwrap();

    let status = worker.wait(Duration::from_secs(30)).await.expect("the worker exits");
    assert!(status.success(), "exit status {status}");
    let task = app.get(task.id).await.unwrap();
    assert_eq!(task.status, TaskStatus::Finished);
    assert_eq!(task.stdout.as_deref(), Some("started\ndone\n"));
    assert_eq!(app.get(later.id).await.unwrap().status, TaskStatus::Queued);
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
    let task = app.submit("echo finally").await;

    let task = app.until_done(task.id).await;
    assert_eq!(task.stdout.as_deref(), Some("finally\n"));
    assert!(worker.wait(Duration::from_millis(10)).await.is_none(), "still running");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_guard_runs_a_slots_commands_one_after_another_and_a_killed_one_is_replaced() {
    let app = TestApp::spawn().await;
    let worker = WorkerProcess::start(&app, "kept", &[]);
    // A burst of short commands, one after another on the slot: each may end before its guard
    // has said that it started it, and every one of them runs once, under the same guard.
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(app.submit("echo $PPID").await.id);
    }
    let mut guards = Vec::new();
    for id in ids {
        let task = app.until_done(id).await;
        assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
        assert_eq!(task.attempts, 1, "{task:?}");
        guards.push(task.stdout.clone().unwrap_or_default());
    }
    assert!(guards.windows(2).all(|w| w[0] == w[1]), "one guard for every task: {guards:?}");
    // That guard is the agent's child, and the command's parent.
    let parents = "echo $PPID $(awk '{print $4}' /proc/$PPID/stat)";
    let task = app.until_done(app.submit(parents).await.id).await;
    let line = task.stdout.clone().unwrap_or_default();
    let pids: Vec<i32> = line.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    assert_eq!(pids.len(), 2, "{line}");
    assert_eq!(pids[1], worker.pid(), "the guard is the agent's child: {line}");
    assert_eq!(pids[0].to_string(), guards[0].trim(), "the same guard: {line}");
    let kept = pids[0];

    // A command that kills its guard (it can, without RUN_AS) fails, its `sleep` killed by the
    // agent; the next command gets a new guard.
    let killer = app.until_done(app.submit("kill -9 $PPID; sleep 5").await.id).await;
    assert_eq!(killer.status, TaskStatus::Failed, "{killer:?}");
    let error = killer.error.clone().unwrap_or_default();
    // (Ended before or after the guard confirmed the start: either way, said.)
    assert!(error.contains("guard ended before"), "{error}");
    let next = app.until_done(app.submit(parents).await.id).await;
    assert_eq!(next.status, TaskStatus::Finished, "{next:?}");
    let line = next.stdout.clone().unwrap_or_default();
    let guard: i32 = line.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap();
    assert_ne!(guard, kept, "a new guard: {line}");
    // Gone, or its pid reused by a process that is not the agent's child.
    let stat = std::fs::read_to_string(format!("/proc/{kept}/stat")).unwrap_or_default();
    let parent = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1));
    assert_ne!(parent, Some(worker.pid().to_string().as_str()), "the killed guard is waited for");
}
