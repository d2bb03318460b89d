//! Fault tests with real processes: agents killed, stopped and drained; the API killed; the
//! database restarted. Each asserts the outcome. Leases, reaper and grace are short so that
//! the suite stays fast; the figures printed with "FIGURE" feed the README's reliability
//! section (run with --nocapture to see them).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use rocket::figment::Figment;
use serde_json::json;
use taskexec_protocol::{FinishReport, LeaseToken, NewTask, ProblemType, TaskId, TaskStatus};
use taskexec_tests::{
    assert_problem, group_members, is_alive, until, Aborted, AgentPool, Api, ApiProcess, PgCluster,
    TestApp, TestDb, WorkerProcess, ADMIN_TOKEN, TOKEN,
};
use tokio::time::Instant;

const LEASE_SECS: u64 = 3;
const MAX_ATTEMPTS: i32 = 3;

/// Short lifecycle settings: a 3 s lease, a reaper every second, a 1 s kill grace.
fn fast(figment: Figment) -> Figment {
    figment
        .merge(("lease_secs", LEASE_SECS))
        .merge(("reaper_interval_secs", 1))
        .merge(("kill_grace_secs", 1))
        .merge(("max_attempts", MAX_ATTEMPTS))
}

const FAST_ENV: [(&str, &str); 4] = [
    ("ROCKET_LEASE_SECS", "3"),
    ("ROCKET_REAPER_INTERVAL_SECS", "1"),
    ("ROCKET_KILL_GRACE_SECS", "1"),
    ("ROCKET_MAX_ATTEMPTS", "3"),
];

fn scratch() -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("taskexec-fault-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A command that on its first run (marked by `dir/ran`) runs `first`, and on any later run
/// prints "second run".
fn first_then_second(dir: &Path, first: &str) -> String {
    let d = dir.display();
    format!("if [ -e {d}/ran ]; then echo second run; else touch {d}/ran; {first}; fi")
}

async fn read_pid(path: &Path) -> i32 {
    until(Duration::from_secs(30), "the command wrote its pid", || {
        std::fs::read_to_string(path).map(|s| !s.trim().is_empty()).unwrap_or(false)
    })
    .await;
    std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_task_is_replaced_and_leaves_no_orphan() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let mut doomed = WorkerProcess::start(&app, "doomed", &[]);
    let sleep = format!(
        "sleep 300 & echo $! > {0}/sleep.pid; setsid sleep 302 & echo $! > {0}/escapee.pid; wait",
        dir.display()
    );
    let task = app.submit(&first_then_second(&dir, &sleep)).await;
    let sleeper = read_pid(&dir.join("sleep.pid")).await;
    let escapee = read_pid(&dir.join("escapee.pid")).await;
    // Confirmed running: the lost attempt counts (a pick never confirmed is refunded).
    app.until_running(task.id).await;

    doomed.signal(libc::SIGKILL);
    let killed = Instant::now();
    doomed.wait(Duration::from_secs(10)).await.expect("the agent died");
    let _rescuer = WorkerProcess::start(&app, "rescuer", &[]);

    until(Duration::from_secs(10), "the command dies with its agent", || {
        !is_alive(sleeper) && !is_alive(escapee)
    })
    .await;
    let task = app.until_done(task.id).await;
    eprintln!(
        "FIGURE kill -9 to finished elsewhere: {:.1} s (lease {LEASE_SECS} s)",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
    assert_eq!(task.stdout.as_deref(), Some("second run\n"));
    assert_eq!(task.attempts, 2);
    assert_eq!(task.agent.as_deref(), Some("rescuer"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_agent_is_fenced_off_and_only_one_result_is_recorded() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let mut frozen = WorkerProcess::start(&app, "frozen", &[]);
    let task = app.submit(&first_then_second(&dir, "sleep 4; echo first run")).await;
    until(Duration::from_secs(30), "the first run started", || dir.join("ran").exists()).await;
    // And its first heartbeat is in: frozen before it, the pick would be unconfirmed and its
    // attempt refunded (attempts 1, not 2), which a loaded machine made happen.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while app.get(task.id).await.unwrap().running_at.is_none() {
        assert!(std::time::Instant::now() < deadline, "the first heartbeat never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    frozen.signal(libc::SIGSTOP);
    let _other = WorkerProcess::start(&app, "other", &[]);
    let rerun = app.until_done(task.id).await;
    frozen.signal(libc::SIGCONT);

    assert_eq!(rerun.status, TaskStatus::Finished, "{rerun:?}");
    assert_eq!(rerun.stdout.as_deref(), Some("second run\n"));
    assert_eq!(rerun.agent.as_deref(), Some("other"));
    // Thawed, the agent either hears 409 for its old lease, or (on a loaded machine, when its
    // last heartbeat times out) concludes by itself that the lease is gone; either way it stops
    // and drops the result. The 409s themselves are checked against the API directly, in
    // a_pick_whose_agent_never_reports_is_requeued_when_its_lease_expires.
    until(Duration::from_secs(20), "the thawed agent learns it was fenced off", || {
        let log = frozen.log();
        log.contains("fenced this attempt off") || log.contains("out of reach")
    })
    .await;
    let after = app.get(task.id).await.unwrap();
    assert_eq!(
        after.stdout.as_deref(),
        Some("second run\n"),
        "the old attempt's result is not recorded"
    );
    assert_eq!(after.finished_at, rerun.finished_at);
    assert_eq!(after.attempts, 2);
    assert!(frozen.wait(Duration::from_millis(10)).await.is_none(), "the old agent carries on");
}

/// Agents under fire: every tick one of them, alive, gets SIGKILL and is started again, as a
/// supervisor would. Counts the SIGKILLs that landed: the worker was alive when signalled and
/// died of that very signal.
struct Firing {
    url: String,
    workers: Vec<WorkerProcess>,
    kills: usize,
    /// Exits that were not our SIGKILL (a worker that died by itself, or before the signal).
    other_exits: Vec<String>,
}

impl Firing {
    fn start(url: &str, count: usize) -> Firing {
        let workers = (0..count).map(|n| Firing::worker(url, n)).collect();
        Firing { url: url.to_owned(), workers, kills: 0, other_exits: Vec::new() }
    }

    fn worker(url: &str, n: usize) -> WorkerProcess {
        WorkerProcess::start_with_url(url, &format!("fired-{n}"), &[])
    }

    /// Restarts any worker that exited by itself, then kills worker `n` and starts it again.
    async fn kill(&mut self, n: usize) {
        for (i, worker) in self.workers.iter_mut().enumerate() {
            if let Ok(Some(status)) = worker.child.try_wait() {
                self.other_exits.push(format!("fired-{i}: {status}"));
                *worker = Firing::worker(&self.url, i);
            }
        }
        let worker = &mut self.workers[n];
        // Not reaped (try_wait above said so), so the pid is still this worker's.
        worker.signal(libc::SIGKILL);
        let status = worker.wait(Duration::from_secs(10)).await.expect("a SIGKILLed worker dies");
        if status.signal() == Some(libc::SIGKILL) {
            self.kills += 1;
        } else {
            self.other_exits.push(format!("fired-{n}: {status}"));
        }
        *worker = Firing::worker(&self.url, n);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_agents_killed_at_random_lose_no_task() {
    let app = TestApp::spawn_with(fast).await;
    let mut firing = Firing::start(&app.url, 16);

    // Kill one agent every 100 ms until every task has been submitted and the queue is empty.
    let started = Instant::now();
    let submitted = Arc::new(AtomicBool::new(false));
    let killer = tokio::spawn({
        let (submitted, api) = (submitted.clone(), app.api.clone());
        async move {
            let mut tick = 0;
            loop {
                if submitted.load(Ordering::SeqCst)
                    && api.list("status=queued&limit=1").await.unwrap().tasks.is_empty()
                {
                    return firing;
                }
                assert!(started.elapsed() < Duration::from_secs(240), "the queue never drained");
                firing.kill(spread(tick, firing.workers.len())).await;
                tick += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let mut expected = HashMap::new();
    for n in 0..2000 {
        let task = app.submit(&format!("echo task-{n}; sleep 0.0{}", n % 10)).await;
        expected.insert(task.id, format!("task-{n}\n"));
    }
    submitted.store(true, Ordering::SeqCst);
    let firing = killer.await.unwrap();

    // The survivors (and the restarted) finish what is left; every task ends.
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    let mut retried = 0;
    for (id, stdout) in &expected {
        let task = app.until_done(*id).await;
        assert!(
            task.attempts >= 1 && task.attempts <= MAX_ATTEMPTS,
            "attempts beyond max_attempts: {task:?}"
        );
        match task.status {
            TaskStatus::Finished => {
                assert_eq!(task.exit_code, Some(0), "{task:?}");
                assert_eq!(task.stdout.as_deref(), Some(stdout.as_str()), "{task:?}");
                assert_eq!(task.error, None, "{task:?}");
            }
            TaskStatus::Failed => {
                assert_eq!(task.error.as_deref(), Some("agent lost"), "{task:?}");
                assert_eq!(task.attempts, MAX_ATTEMPTS, "lost only on its last attempt: {task:?}");
            }
            other => panic!("task {id} is {other}: {task:?}"),
        }
        if task.attempts > 1 {
            retried += 1;
        }
        *by_status.entry(task.status.as_str()).or_default() += 1;
    }
    // A kill in a command's first moments leaves a pick never confirmed, refunded rather than
    // counted: the attempts' rows show every interrupted attempt.
    let pool = sqlx::PgPool::connect(&app.db.url).await.unwrap();
    let interrupted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_attempts WHERE outcome IN ('requeued', 'failed')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let kills = firing.kills;
    eprintln!(
        "FIGURE 2000 tasks, 16 agents, {kills} kills: {by_status:?}, {retried} retried, \
         {interrupted} attempts interrupted, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(kills > 50, "too few agents were killed to test anything: {kills}");
    assert!(interrupted > 0, "no kill ever interrupted a task: {kills} kills");
    assert!(firing.other_exits.is_empty(), "agents exited by themselves: {:?}", firing.other_exits);
}

/// A spread of indexes without a random number crate: a multiplicative hash of `n`.
fn spread(n: usize, len: usize) -> usize {
    (n.wrapping_mul(2654435761) >> 7) % len
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_kills_its_agent_fails_as_agent_lost_after_max_attempts() {
    let app = TestApp::spawn_with(fast).await;
    let _pool = AgentPool::start(&app.url, 2, &[]);
    // Our parent is the guard; its parent is the agent.
    let task = app.submit("kill -9 $(awk '{print $4}' /proc/$PPID/stat); sleep 5").await;

    let task = app.until_done(task.id).await;

    assert_eq!(task.status, TaskStatus::Failed, "{task:?}");
    assert_eq!(task.error.as_deref(), Some("agent lost"));
    assert_eq!(task.attempts, MAX_ATTEMPTS);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timed_out_command_gets_term_then_kill_and_none_of_its_descendants_survive() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let _worker = WorkerProcess::start(&app, "timer", &[]);
    let d = dir.display();
    // The shell notes SIGTERM and loops on, so only SIGKILL (after the grace) ends it; one
    // descendant leaves the process group with setsid.
    let command = format!(
        "awk '{{print $5}}' /proc/$$/stat > {d}/pgid; setsid sleep 301 & echo $! > {d}/escapee; \
         trap 'echo TERM >> {d}/signals' TERM; sleep 100 & while true; do sleep 0.2; done"
    );
    let task =
        app.create(&NewTask { timeout_secs: Some(1), ..NewTask::new(command) }).await.unwrap();
    assert_eq!(task.timeout_secs, 1);
    let group = read_pid(&dir.join("pgid")).await;
    let escapee = read_pid(&dir.join("escapee")).await;

    let task = app.until_done(task.id).await;

    assert_eq!(task.status, TaskStatus::Failed, "{task:?}");
    assert_eq!(task.error.as_deref(), Some("timed out after 1 s"));
    let signals = std::fs::read_to_string(dir.join("signals")).unwrap_or_default();
    assert!(signals.contains("TERM"), "SIGTERM came first: {signals:?}");
    until(Duration::from_secs(5), "no process of the command survives", || {
        group_members(group).is_empty() && !is_alive(escapee)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_out_of_range_is_refused() {
    let app = TestApp::spawn_with(|f| {
        f.merge(("max_timeout_secs", 60)).merge(("default_timeout_secs", 60))
    })
    .await;
    for timeout in [0, 61] {
        let refused = app
            .create(&NewTask { timeout_secs: Some(timeout), ..NewTask::new("ls") })
            .await
            .unwrap_err();
        refused.expect(422, "`timeout_secs` must be");
        assert_eq!(refused.kind(), Some(ProblemType::InvalidRequest));
    }
    // Values the typed body cannot carry: a negative number, a string.
    for timeout in [json!(-5), json!("10")] {
        let response = app
            .request(Method::POST, "/tasks")
            .json(&json!({"command": "ls", "timeout_secs": timeout}))
            .send()
            .await
            .unwrap();
        assert_problem(response, 422, "`timeout_secs` must be").await;
    }
    assert!(app.list("").await.unwrap().tasks.is_empty(), "no task was created");
}

#[tokio::test(flavor = "multi_thread")]
async fn aborts_cancel_queued_tasks_stop_running_ones_and_refuse_finished_ones() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let queued = app.submit("echo never").await;
    let cancelled = match app.abort(queued.id).await.unwrap() {
        Aborted::Cancelled(task) => task,
        other => panic!("a queued task is cancelled at once (200): {other:?}"),
    };
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert!(cancelled.finished_at.is_some());

    let _worker = WorkerProcess::start(&app, "abortable", &[]);
    let command = format!("echo partial; touch {}/started; sleep 100", dir.display());
    let running = app.submit(&command).await;
    until(Duration::from_secs(30), "the command started", || dir.join("started").exists()).await;
    let requested = Instant::now();
    match app.abort(running.id).await.unwrap() {
        Aborted::Requested(task) => assert!(task.abort_requested_at.is_some(), "{task:?}"),
        other => panic!("a running task's abort is requested of its agent (202): {other:?}"),
    }
    let ended = app.until_done(running.id).await;
    eprintln!(
        "FIGURE abort of a running task to cancelled: {:.2} s (kill grace 1 s)",
        requested.elapsed().as_secs_f64()
    );
    assert_eq!(ended.status, TaskStatus::Cancelled, "{ended:?}");
    assert_eq!(ended.stdout.as_deref(), Some("partial\n"), "the output so far is kept");

    assert!(requested.elapsed() < Duration::from_secs(3), "the agent learned of the abort at once");
    let again = app.abort(cancelled.id).await.unwrap_err();
    again.expect(409, "is cancelled");
    assert_eq!(again.kind(), Some(ProblemType::TaskEnded));
    let failing = app.submit("kill -KILL $$").await;
    let failing = app.until_done(failing.id).await;
    assert_eq!(failing.status, TaskStatus::Failed, "{failing:?}");
    let refused = app.abort(failing.id).await.unwrap_err();
    refused.expect(409, "is failed");
    assert_eq!(refused.kind(), Some(ProblemType::TaskEnded));
    let done = app.submit("echo done").await;
    let done = app.until_done(done.id).await;
    let refused = app.abort(done.id).await.unwrap_err();
    refused.expect(409, "is finished");
    assert_eq!(refused.kind(), Some(ProblemType::TaskEnded));
    let unknown = app.abort(TaskId::random()).await.unwrap_err();
    unknown.expect(404, "no task");
    assert_eq!(unknown.kind(), Some(ProblemType::NotFound));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_with_a_stale_lease_is_409_and_a_current_one_extends_the_lease() {
    let app = TestApp::spawn_with(fast).await;
    let task = app.submit("sleep 1").await;
    let picked = app.pick("manual", 0).await.unwrap().expect("the queued task is picked");
    assert_eq!(picked.task.id, task.id);

    let fresh = app.heartbeat(task.id, picked.lease, 0).await;
    let stale = app.heartbeat(task.id, LeaseToken::random(), 0).await;

    let fresh = fresh.unwrap();
    assert!(!fresh.abort);
    assert!(fresh.lease_expires_at >= picked.lease_expires_at, "{fresh:?} {picked:?}");
    let stale = stale.unwrap_err();
    stale.expect(409, "another attempt");
    assert_eq!(stale.kind(), Some(ProblemType::LeaseNotCurrent));
    let too_long = app.heartbeat(task.id, picked.lease, 60).await.unwrap_err();
    too_long.expect(400, "`wait`");
    assert_eq!(too_long.kind(), Some(ProblemType::BadParameter));
    assert_eq!(too_long.problem.parameter.as_deref(), Some("wait"));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_api_servers_one_killed_lose_no_task_and_run_none_twice() {
    let db = TestDb::create().await;
    let a = ApiProcess::start(&db.url, &FAST_ENV).await;
    let b = ApiProcess::start(&db.url, &FAST_ENV).await;
    let survivor = Api::new(&b.url, ADMIN_TOKEN, TOKEN);
    let dir = scratch();
    let log = dir.join("ran");
    let mut workers = Vec::new();
    for n in 0..8 {
        let urls = if n % 2 == 0 {
            format!("{},{}", a.url, b.url)
        } else {
            format!("{},{}", b.url, a.url)
        };
        workers.push(WorkerProcess::start_with_url(&urls, &format!("spread-{n}"), &[]));
    }
    let mut ids = Vec::new();
    for n in 0..300 {
        let command = format!("echo task-{n} >> {}; sleep 0.02", log.display());
        ids.push(survivor.submit(&command).await.id);
        if n == 100 {
            a.signal(libc::SIGKILL);
        }
    }

    let mut requeued = 0;
    for id in &ids {
        let task = survivor.until_done(*id).await;
        assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
        assert!(task.attempts <= 2, "an expired lease was requeued more than once: {task:?}");
        requeued += (task.attempts - 1) as usize;
    }
    let ran = std::fs::read_to_string(&log).unwrap();
    let mut runs: HashMap<&str, usize> = HashMap::new();
    for line in ran.lines() {
        *runs.entry(line).or_default() += 1;
    }
    eprintln!(
        "FIGURE API killed under load: 300 tasks finished, {requeued} requeued after lease expiry"
    );
    assert_eq!(runs.len(), 300, "every task ran");
    assert!(
        runs.values().all(|n| *n == 1),
        "a task ran twice: {:?}",
        runs.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_restart_under_load_loses_no_acknowledged_task() {
    let cluster = PgCluster::start();
    let db = Arc::new(TestDb::create_on(&cluster.admin_url).await);
    let app = TestApp::spawn_on(db, fast).await;
    let _pool = AgentPool::start(&app.url, 4, &[]);
    let submitting = Arc::new(AtomicBool::new(true));
    let acked = Arc::new(AtomicUsize::new(0));
    let submitter = tokio::spawn({
        let (submitting, acked, api) = (submitting.clone(), acked.clone(), app.api.clone());
        async move {
            let mut acknowledged = Vec::new();
            let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
            let mut slowest = Duration::ZERO;
            let mut n = 0;
            while submitting.load(Ordering::SeqCst) {
                let sent = Instant::now();
                let answer = api.create(&NewTask::new(format!("echo {n}"))).await;
                slowest = slowest.max(sent.elapsed());
                let status = match answer {
                    Ok(task) => {
                        acknowledged.push(task.id);
                        acked.fetch_add(1, Ordering::SeqCst);
                        201
                    }
                    Err(failure) => failure.status,
                };
                *statuses.entry(status).or_default() += 1;
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acknowledged, statuses, slowest)
        }
    });
    let acked_at_least = |count: usize, what: &'static str| {
        let acked = acked.clone();
        async move {
            until(Duration::from_secs(30), what, || acked.load(Ordering::SeqCst) >= count).await
        }
    };
    acked_at_least(10, "tasks are acknowledged before the outage").await;

    cluster.stop_immediately();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.start_server();
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(30);
    while !matches!(app.health().await, Ok(health) if health["status"] == "ok") {
        assert!(Instant::now() < deadline, "never healthy after the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = restarted.elapsed();
    acked_at_least(acked.load(Ordering::SeqCst) + 10, "tasks are acknowledged after the restart")
        .await;
    submitting.store(false, Ordering::SeqCst);
    let (acknowledged, statuses, slowest) = submitter.await.unwrap();

    eprintln!(
        "FIGURE PostgreSQL down {:.1} s: submit statuses {statuses:?}, slowest answer {:.1} s, healthy {:.1} s after restart",
        (restarted - down).as_secs_f64(),
        slowest.as_secs_f64(),
        recovered.as_secs_f64()
    );
    assert!(statuses.keys().all(|s| *s == 201 || *s == 503), "only 201 or 503: {statuses:?}");
    assert!(statuses.get(&503).copied().unwrap_or(0) > 0, "the outage answered 503: {statuses:?}");
    assert!(slowest < Duration::from_secs(10), "no request hung: {slowest:?}");
    for id in acknowledged {
        let task = app.until_done(id).await;
        assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_agent_hands_back_a_task_that_outlives_the_drain_timeout() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let mut draining = WorkerProcess::start(&app, "draining", &[("DRAIN_TIMEOUT", "1s")]);
    let task = app.submit(&first_then_second(&dir, "sleep 100")).await;
    until(Duration::from_secs(30), "the long task started", || dir.join("ran").exists()).await;

    draining.signal(libc::SIGTERM);
    let status = draining.wait(Duration::from_secs(20)).await.expect("the agent exits");
    let released = app.get(task.id).await.unwrap();
    let _successor = WorkerProcess::start(&app, "successor", &[]);
    let done = app.until_done(task.id).await;

    assert!(status.success(), "exit status {status}");
    assert_eq!(released.status, TaskStatus::Queued, "handed back: {released:?}");
    assert_eq!(released.attempts, 0, "a release is not a failed attempt");
    assert_eq!(done.status, TaskStatus::Finished, "{done:?}");
    assert_eq!(done.stdout.as_deref(), Some("second run\n"));
    assert_eq!(done.agent.as_deref(), Some("successor"));
    assert_eq!(done.attempts, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_hands_the_task_back_at_once() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let mut draining = WorkerProcess::start(&app, "impatient", &[("DRAIN_TIMEOUT", "10m")]);
    let task = app.submit(&first_then_second(&dir, "sleep 100")).await;
    until(Duration::from_secs(30), "the long task started", || dir.join("ran").exists()).await;

    draining.signal(libc::SIGTERM);
    draining.signal(libc::SIGINT);

    let status =
        draining.wait(Duration::from_secs(20)).await.expect("exits long before the 10 min drain");
    assert!(status.success(), "exit status {status}");
    let released = app.get(task.id).await.unwrap();
    assert_eq!(released.status, TaskStatus::Queued, "handed back: {released:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_restart_keeps_running_tasks_on_their_lease() {
    let db = TestDb::create().await;
    // A lease long enough for a restart on a loaded machine.
    let api =
        ApiProcess::start(&db.url, &[("ROCKET_LEASE_SECS", "10"), ("ROCKET_KILL_GRACE_SECS", "1")])
            .await;
    let dir = scratch();
    let _worker = WorkerProcess::start_with_url(&api.url, "steady", &[]);
    let command = format!("touch {}/started; sleep 2; echo survived", dir.display());
    let task = Api::new(&api.url, ADMIN_TOKEN, TOKEN).submit(&command).await;
    until(Duration::from_secs(30), "the task started", || dir.join("started").exists()).await;

    let api = api.restart().await;

    let done = Api::new(&api.url, ADMIN_TOKEN, TOKEN).until_done(task.id).await;
    assert_eq!(done.status, TaskStatus::Finished, "{done:?}");
    assert_eq!(done.stdout.as_deref(), Some("survived\n"));
    assert_eq!(done.attempts, 1, "the lease held through the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pick_whose_agent_never_reports_is_requeued_when_its_lease_expires() {
    let app = TestApp::spawn_with(fast).await;
    let task = app.submit("echo orphan").await;
    let lost = app.pick("vanished", 0).await.unwrap().expect("picked, then the agent vanishes");
    assert_eq!(lost.task.id, task.id);
    assert_eq!(app.get(task.id).await.unwrap().status, TaskStatus::InProgress);

    // Held until the lease expires and the reaper puts the task back in the queue.
    let again = app.pick("rescuer", 20).await.unwrap().expect("picked again once requeued");

    assert_eq!(again.task.id, task.id);
    // The lost pick was never confirmed by a heartbeat: its attempt was refunded.
    assert_eq!(lost.task.attempts, 1);
    assert_eq!(again.task.attempts, 1);
    assert_ne!(again.lease, lost.lease);
    let stale_finish = app.finish(task.id, &FinishReport::exited(lost.lease, 0)).await.unwrap_err();
    stale_finish.expect(409, "another attempt");
    assert_eq!(stale_finish.kind(), Some(ProblemType::LeaseNotCurrent));
    let stale_heartbeat = app.heartbeat(task.id, lost.lease, 0).await.unwrap_err();
    stale_heartbeat.expect(409, "another attempt");
    assert_eq!(stale_heartbeat.kind(), Some(ProblemType::LeaseNotCurrent));
    let current = app.get(task.id).await.unwrap();
    assert_eq!(current.status, TaskStatus::InProgress, "the stale writes changed nothing");
    assert_eq!(current.agent.as_deref(), Some("rescuer"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_cannot_make_its_agent_hand_it_back() {
    let app = TestApp::spawn_with(fast).await;
    let mut worker = WorkerProcess::start(&app, "targeted", &[("DRAIN_TIMEOUT", "1s")]);
    // Our parent is the guard; its parent is the agent.
    let command = "agent=$(awk '{print $4}' /proc/$PPID/stat); kill -TERM $agent; \
                   kill -TERM $agent; sleep 2; echo still here";

    let task = app.submit(command).await;

    let task = app.until_done(task.id).await;
    assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
    assert_eq!(task.stdout.as_deref(), Some("still here\n"));
    assert_eq!(task.attempts, 1);
    assert!(worker.wait(Duration::from_millis(10)).await.is_none(), "the agent carries on");
    assert!(worker.log().contains("from a command"), "{}", worker.log());
}
