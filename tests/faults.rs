//! Fault tests with real processes: agents killed, stopped and drained; the API killed; the
//! database restarted. Each asserts the outcome. Leases, reaper and grace are short so that
//! the suite stays fast; the figures printed with "FIGURE" feed the README's reliability
//! section (run with --nocapture to see them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use rocket::figment::Figment;
use serde_json::{json, Value};
use taskexec_tests::{
    assert_problem, group_members, is_alive, until, AgentPool, ApiProcess, PgCluster, TestApp,
    TestDb, WorkerProcess,
};
use tokio::time::Instant;

const LEASE_SECS: u64 = 3;

/// Short lifecycle settings: a 3 s lease, a reaper every second, a 1 s kill grace.
fn fast(figment: Figment) -> Figment {
    figment
        .merge(("lease_secs", LEASE_SECS))
        .merge(("reaper_interval_secs", 1))
        .merge(("kill_grace_secs", 1))
        .merge(("max_attempts", 3))
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
    let task = app.create(&first_then_second(&dir, &sleep)).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let sleeper = read_pid(&dir.join("sleep.pid")).await;
    let escapee = read_pid(&dir.join("escapee.pid")).await;

    doomed.signal(libc::SIGKILL);
    let killed = Instant::now();
    doomed.wait(Duration::from_secs(10)).await.expect("the agent died");
    let _rescuer = WorkerProcess::start(&app, "rescuer", &[]);

    until(Duration::from_secs(10), "the command dies with its agent", || {
        !is_alive(sleeper) && !is_alive(escapee)
    })
    .await;
    let task = app.until_done(&id).await;
    eprintln!(
        "FIGURE kill -9 to finished elsewhere: {:.1} s (lease {LEASE_SECS} s)",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(task["status"], "finished");
    assert_eq!(task["stdout"], "second run\n");
    assert_eq!(task["attempts"], 2);
    assert_eq!(task["agent"], "rescuer");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_agent_is_fenced_off_and_only_one_result_is_recorded() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let mut frozen = WorkerProcess::start(&app, "frozen", &[]);
    let task = app.create(&first_then_second(&dir, "sleep 4; echo first run")).await;
    let id = task["id"].as_str().unwrap().to_owned();
    until(Duration::from_secs(30), "the first run started", || dir.join("ran").exists()).await;

    frozen.signal(libc::SIGSTOP);
    let _other = WorkerProcess::start(&app, "other", &[]);
    let rerun = app.until_done(&id).await;
    frozen.signal(libc::SIGCONT);

    assert_eq!(rerun["stdout"], "second run\n");
    assert_eq!(rerun["agent"], "other");
    // Thawed, the agent either hears 409 for its old lease, or (on a loaded machine, when its
    // last heartbeat times out) concludes by itself that the lease is gone; either way it stops
    // and drops the result. The 409s themselves are checked against the API directly, in
    // a_pick_whose_agent_never_reports_is_requeued_when_its_lease_expires.
    until(Duration::from_secs(20), "the thawed agent learns it was fenced off", || {
        let log = frozen.log();
        log.contains("fenced this attempt off") || log.contains("out of reach")
    })
    .await;
    let after = app.task(&id).await;
    assert_eq!(after["stdout"], "second run\n", "the old attempt's result is not recorded");
    assert_eq!(after["finished_at"], rerun["finished_at"]);
    assert_eq!(after["attempts"], 2);
    assert!(frozen.wait(Duration::from_millis(10)).await.is_none(), "the old agent carries on");
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_agents_killed_at_random_lose_no_task() {
    let app = TestApp::spawn_with(fast).await;
    let pool = AgentPool::start(&app.url, 16, &[]);

    let started = Instant::now();
    let killing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let killer = tokio::spawn({
        let killing = killing.clone();
        async move {
            let mut kills = 0;
            while killing.load(std::sync::atomic::Ordering::SeqCst) {
                pool.kill(spread(kills, pool.len().await)).await;
                kills += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (pool, kills)
        }
    });
    let mut ids = Vec::new();
    for n in 0..2000 {
        ids.push(
            app.create(&format!("sleep 0.0{}", n % 10)).await["id"].as_str().unwrap().to_owned(),
        );
    }
    // Kill on while the queue drains, then let the survivors finish.
    let open = |status: &'static str| {
        let (app, status) = (&app, status);
        async move {
            let page: Value = app.get_json(&format!("/tasks?status={status}&limit=1")).await;
            !page["tasks"].as_array().unwrap().is_empty()
        }
    };
    while open("queued").await {
        assert!(started.elapsed() < Duration::from_secs(240), "the queue never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    killing.store(false, std::sync::atomic::Ordering::SeqCst);
    let (_pool, kills) = killer.await.unwrap();
    while open("queued").await || open("in_progress").await {
        assert!(started.elapsed() < Duration::from_secs(240), "the queue never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut by_status: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let task = app.task(id).await;
        let status = task["status"].as_str().unwrap().to_owned();
        assert!(matches!(status.as_str(), "finished" | "failed"), "task {id} is {status}");
        assert!(task["attempts"].as_i64().unwrap() <= 3, "attempts beyond max_attempts: {task}");
        if status == "failed" {
            assert_eq!(task["error"], "agent lost", "{task}");
        }
        *by_status.entry(status).or_default() += 1;
    }
    eprintln!(
        "FIGURE 2000 tasks, 16 agents, {kills} kills: {by_status:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(by_status.values().sum::<usize>(), 2000);
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
    let task = app.create("kill -9 $(awk '{print $4}' /proc/$PPID/stat); sleep 5").await;

    let task = app.until_done(task["id"].as_str().unwrap()).await;

    assert_eq!(task["status"], "failed");
    assert_eq!(task["error"], "agent lost");
    assert_eq!(task["attempts"], 3);
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
    let response = app
        .request(Method::POST, "/tasks")
        .json(&json!({"command": command, "timeout_secs": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let task: Value = response.json().await.unwrap();
    assert_eq!(task["timeout_secs"], 1);
    let group = read_pid(&dir.join("pgid")).await;
    let escapee = read_pid(&dir.join("escapee")).await;

    let task = app.until_done(task["id"].as_str().unwrap()).await;

    assert_eq!(task["status"], "failed");
    assert_eq!(task["error"], "timed out after 1 s");
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
    for timeout in [json!(0), json!(61), json!(-5), json!("10")] {
        let response = app
            .request(Method::POST, "/tasks")
            .json(&json!({"command": "ls", "timeout_secs": timeout}))
            .send()
            .await
            .unwrap();
        assert_problem(response, 422, "`timeout_secs` must be").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn aborts_cancel_queued_tasks_stop_running_ones_and_refuse_finished_ones() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let queued = app.create("echo never").await;
    let cancelled = app.abort(queued["id"].as_str().unwrap()).await;
    assert_eq!(cancelled.status(), 200);
    let cancelled: Value = cancelled.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["finished_at"].is_string());

    let _worker = WorkerProcess::start(&app, "abortable", &[]);
    let command = format!("echo partial; touch {}/started; sleep 100", dir.display());
    let running = app.create(&command).await;
    let id = running["id"].as_str().unwrap().to_owned();
    until(Duration::from_secs(30), "the command started", || dir.join("started").exists()).await;
    let requested = Instant::now();
    let response = app.abort(&id).await;
    assert_eq!(response.status(), 202);
    assert!(response.json::<Value>().await.unwrap()["abort_requested_at"].is_string());
    let ended = app.until_done(&id).await;
    eprintln!(
        "FIGURE abort of a running task to cancelled: {:.2} s (kill grace 1 s)",
        requested.elapsed().as_secs_f64()
    );
    assert_eq!(ended["status"], "cancelled");
    assert_eq!(ended["stdout"], "partial\n", "the output so far is kept");

    assert!(requested.elapsed() < Duration::from_secs(3), "the agent learned of the abort at once");
    let again = app.abort(cancelled["id"].as_str().unwrap()).await;
    assert_problem(again, 409, "is cancelled").await;
    let failing = app.create("kill -KILL $$").await;
    let failing = app.until_done(failing["id"].as_str().unwrap()).await;
    assert_eq!(failing["status"], "failed");
    let refused = app.abort(failing["id"].as_str().unwrap()).await;
    assert_problem(refused, 409, "is failed").await;
    let done = app.create("echo done").await;
    let done = app.until_done(done["id"].as_str().unwrap()).await;
    let refused = app.abort(done["id"].as_str().unwrap()).await;
    assert_problem(refused, 409, "is finished").await;
    let unknown = app.abort(&uuid::Uuid::new_v4().to_string()).await;
    assert_problem(unknown, 404, "no task").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_with_a_stale_lease_is_409_and_a_current_one_extends_the_lease() {
    let app = TestApp::spawn_with(fast).await;
    app.create("sleep 1").await;
    let picked = app.pick("manual", 0).await.unwrap();
    let id = picked["id"].as_str().unwrap();

    let fresh = app.heartbeat(id, &picked["lease"], "").await;
    let stale = app.heartbeat(id, &json!(uuid::Uuid::new_v4()), "").await;

    assert_eq!(fresh.status(), 200);
    let fresh: Value = fresh.json().await.unwrap();
    assert_eq!(fresh["abort"], false);
    assert!(
        fresh["lease_expires_at"].as_str().unwrap() >= picked["lease_expires_at"].as_str().unwrap()
    );
    assert_problem(stale, 409, "another attempt").await;
    let too_long = app.heartbeat(id, &picked["lease"], "?wait=60").await;
    assert_problem(too_long, 400, "`wait`").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_api_servers_one_killed_lose_no_task_and_run_none_twice() {
    let db = TestDb::create().await;
    let a = ApiProcess::start(&db.url, &FAST_ENV).await;
    let b = ApiProcess::start(&db.url, &FAST_ENV).await;
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
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 0..300 {
        let command = format!("echo task-{n} >> {}; sleep 0.02", log.display());
        let response = http
            .post(format!("{}/tasks", b.url))
            .json(&json!({"command": command}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
        if n == 100 {
            a.signal(libc::SIGKILL);
        }
    }

    let mut requeued = 0;
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(60);
        let task = loop {
            let task: Value = http
                .get(format!("{}/tasks/{id}", b.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if task["status"] != "queued" && task["status"] != "in_progress" {
                break task;
            }
            assert!(Instant::now() < deadline, "task {id} never ended: {task}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(task["status"], "finished", "{task}");
        let attempts = task["attempts"].as_i64().unwrap();
        assert!(attempts <= 2, "an expired lease was requeued more than once: {task}");
        requeued += (attempts - 1) as usize;
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
    let db = std::sync::Arc::new(TestDb::create_on(&cluster.admin_url).await);
    let app = TestApp::spawn_on(db, fast).await;
    let _pool = AgentPool::start(&app.url, 4, &[]);
    let (url, http) = (app.url.clone(), app.http.clone());
    let submitting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let submitter = tokio::spawn({
        let submitting = submitting.clone();
        async move {
            let mut acknowledged = Vec::new();
            let mut statuses: HashMap<u16, usize> = HashMap::new();
            let mut slowest = Duration::ZERO;
            let mut n = 0;
            while submitting.load(std::sync::atomic::Ordering::SeqCst) {
                let sent = Instant::now();
                let response = http
                    .post(format!("{url}/tasks"))
                    .json(&json!({"command": format!("echo {n}")}))
                    .send()
                    .await
                    .unwrap();
                slowest = slowest.max(sent.elapsed());
                let status = response.status().as_u16();
                *statuses.entry(status).or_default() += 1;
                if status == 201 {
                    acknowledged.push(
                        response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned(),
                    );
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acknowledged, statuses, slowest)
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    cluster.stop_immediately();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.start_server();
    let restarted = Instant::now();
    app.eventually(|health: Value| health["status"] == "ok", "/health").await;
    let recovered = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    submitting.store(false, std::sync::atomic::Ordering::SeqCst);
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
    for id in &acknowledged {
        let task = app.until_done(id).await;
        assert_eq!(task["status"], "finished", "{task}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_agent_hands_back_a_task_that_outlives_the_drain_timeout() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let mut draining = WorkerProcess::start(&app, "draining", &[("DRAIN_TIMEOUT", "1s")]);
    let task = app.create(&first_then_second(&dir, "sleep 100")).await;
    let id = task["id"].as_str().unwrap().to_owned();
    until(Duration::from_secs(30), "the long task started", || dir.join("ran").exists()).await;

    draining.signal(libc::SIGTERM);
    let status = draining.wait(Duration::from_secs(20)).await.expect("the agent exits");
    let released = app.task(&id).await;
    let _successor = WorkerProcess::start(&app, "successor", &[]);
    let done = app.until_done(&id).await;

    assert!(status.success(), "exit status {status}");
    assert_eq!(released["status"], "queued", "handed back: {released}");
    assert_eq!(released["attempts"], 0, "a release is not a failed attempt");
    assert_eq!(done["stdout"], "second run\n");
    assert_eq!(done["agent"], "successor");
    assert_eq!(done["attempts"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_hands_the_task_back_at_once() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let mut draining = WorkerProcess::start(&app, "impatient", &[("DRAIN_TIMEOUT", "10m")]);
    let task = app.create(&first_then_second(&dir, "sleep 100")).await;
    let id = task["id"].as_str().unwrap().to_owned();
    until(Duration::from_secs(30), "the long task started", || dir.join("ran").exists()).await;

    draining.signal(libc::SIGTERM);
    draining.signal(libc::SIGINT);

    let status =
        draining.wait(Duration::from_secs(20)).await.expect("exits long before the 10 min drain");
    assert!(status.success());
    assert_eq!(app.task(&id).await["status"], "queued");
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
    let http = reqwest::Client::new();
    let command = format!("touch {}/started; sleep 2; echo survived", dir.display());
    let task: Value = http
        .post(format!("{}/tasks", api.url))
        .json(&json!({"command": command}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    until(Duration::from_secs(30), "the task started", || dir.join("started").exists()).await;

    let api = api.restart().await;

    let id = task["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let task: Value =
            http.get(format!("{}/tasks/{id}", api.url)).send().await.unwrap().json().await.unwrap();
        if task["status"] == "finished" {
            break task;
        }
        assert!(Instant::now() < deadline, "never finished: {task}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["stdout"], "survived\n");
    assert_eq!(done["attempts"], 1, "the lease held through the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pick_whose_agent_never_reports_is_requeued_when_its_lease_expires() {
    let app = TestApp::spawn_with(fast).await;
    let task = app.create("echo orphan").await;
    let lost = app.pick("vanished", 0).await.expect("picked, then the agent vanishes");

    let id = lost["id"].as_str().unwrap();
    let requeued =
        app.eventually(|task: Value| task["status"] == "queued", &format!("/tasks/{id}")).await;
    let again = app.pick("rescuer", 0).await.expect("picked again");

    // The lost pick was never confirmed by a heartbeat: its attempt is refunded.
    assert_eq!(requeued["attempts"], 0);
    assert_eq!(again["id"], task["id"]);
    assert_eq!(again["attempts"], 1);
    assert_ne!(again["lease"], lost["lease"]);
    let stale_finish = app.finish(id, json!({"lease": lost["lease"], "exit_code": 0})).await;
    assert_problem(stale_finish, 409, "another attempt").await;
    let stale_heartbeat = app.heartbeat(id, &lost["lease"], "").await;
    assert_problem(stale_heartbeat, 409, "another attempt").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_cannot_make_its_agent_hand_it_back() {
    let app = TestApp::spawn_with(fast).await;
    let mut worker = WorkerProcess::start(&app, "targeted", &[("DRAIN_TIMEOUT", "1s")]);
    // Our parent is the guard; its parent is the agent.
    let command = "agent=$(awk '{print $4}' /proc/$PPID/stat); kill -TERM $agent; \
                   kill -TERM $agent; sleep 2; echo still here";

    let task = app.create(command).await;

    let task = app.until_done(task["id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "finished", "{task}");
    assert_eq!(task["stdout"], "still here\n");
    assert_eq!(task["attempts"], 1);
    assert!(worker.wait(Duration::from_millis(10)).await.is_none(), "the agent carries on");
    assert!(worker.log().contains("from the running command"), "{}", worker.log());
}
