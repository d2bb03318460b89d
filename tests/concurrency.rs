//! One agent, several slots (`CONCURRENCY`): tasks run at once, each under a lease of its own
//! that fences it alone; a drain and a kill -9 with every slot busy; a slot's clean-up that
//! spares the other slots' commands.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rocket::figment::Figment;
use sqlx::PgPool;
use taskexec_protocol::{Task, TaskId, TaskStatus};
use taskexec_tests::{is_alive, is_root, until, TestApp, TestUser, WorkerProcess};

/// A 3 s lease (heartbeats every third of a second), a reaper every second, a 1 s kill grace.
fn fast(figment: Figment) -> Figment {
    figment
        .merge(("lease_secs", 3))
        .merge(("reaper_interval_secs", 1))
        .merge(("kill_grace_secs", 1))
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taskexec-slots-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A command that writes its shell's pid to `dir/pid-<n>`, waits for `dir/go`, then prints
/// "done <n>": it can end only once every command the test waits for has started.
fn wait_for_go(dir: &Path, n: usize) -> String {
    let d = dir.display();
    format!("echo $$ > {d}/pid-{n}.tmp; mv {d}/pid-{n}.tmp {d}/pid-{n}; until [ -e {d}/go ]; do sleep 0.05; done; echo done {n}")
}

/// The pid command `n` wrote, once it has.
async fn pid_of(dir: &Path, n: usize) -> i32 {
    let path = dir.join(format!("pid-{n}"));
    until(Duration::from_secs(30), "the command started", || path.exists()).await;
    std::fs::read_to_string(&path).unwrap().trim().parse().unwrap()
}

async fn submit_all(app: &TestApp, commands: &[String]) -> Vec<Task> {
    let mut tasks = Vec::new();
    for command in commands {
        tasks.push(app.submit(command).await);
    }
    tasks
}

/// The lease and agent of each task, as the database holds them.
async fn leases(app: &TestApp, ids: &[TaskId]) -> Vec<(Option<uuid::Uuid>, Option<String>)> {
    let pool = PgPool::connect(&app.db.url).await.unwrap();
    let mut found = Vec::new();
    for id in ids {
        let row: (Option<uuid::Uuid>, Option<String>) =
            sqlx::query_as("SELECT lease, agent FROM tasks WHERE id = $1")
                .bind(id.as_uuid())
                .fetch_one(&pool)
                .await
                .unwrap();
        found.push(row);
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn n_tasks_run_at_once_on_one_agent_each_fenced_by_its_own_lease() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let _agent = WorkerProcess::start(&app, "slots", &[("CONCURRENCY", "3")]);
    let commands: Vec<String> = (0..3).map(|n| wait_for_go(&dir, n)).collect();
    let tasks = submit_all(&app, &commands).await;
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();

    // Each waits for the others: run one at a time, the first would never end.
    let mut pids = Vec::new();
    for n in 0..3 {
        pids.push(pid_of(&dir, n).await);
    }
    for id in &ids {
        app.until_running(*id).await;
    }
    let held = leases(&app, &ids).await;
    assert!(held.iter().all(|(_, agent)| agent.as_deref() == Some("slots")), "{held:?}");
    let distinct: HashSet<_> = held.iter().map(|(lease, _)| lease.expect("leased")).collect();
    assert_eq!(distinct.len(), 3, "each task has a lease of its own: {held:?}");

    // Another attempt takes task 0 over: only its command stops, at its next heartbeat.
    let pool = PgPool::connect(&app.db.url).await.unwrap();
    sqlx::query("UPDATE tasks SET lease = gen_random_uuid() WHERE id = $1")
        .bind(ids[0].as_uuid())
        .execute(&pool)
        .await
        .unwrap();
    until(Duration::from_secs(10), "the fenced command is stopped", || !is_alive(pids[0])).await;
    assert!(is_alive(pids[1]) && is_alive(pids[2]), "the other slots' commands run on");

    std::fs::write(dir.join("go"), "").unwrap();
    for (n, id) in ids.iter().enumerate().skip(1) {
        let task = app.until_done(*id).await;
        assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
        assert_eq!(task.stdout, Some(format!("done {n}\n")));
        assert_eq!(task.attempts, 1);
    }
    // The fenced attempt's result was dropped: its lease ran out, and it ran again.
    let fenced = app.until_done(ids[0]).await;
    assert_eq!(fenced.status, TaskStatus::Finished, "{fenced:?}");
    assert_eq!(fenced.attempts, 2, "{fenced:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_with_every_slot_busy_lets_them_finish_and_hands_back_what_overruns() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    // Four slots, three busy: the fourth's pick stays parked through the drain.
    let env = [("CONCURRENCY", "4"), ("DRAIN_TIMEOUT", "3s"), ("LOG_LEVEL", "info")];
    let mut agent = WorkerProcess::start(&app, "draining", &env);
    let mut commands: Vec<String> = (0..2).map(|n| wait_for_go(&dir, n)).collect();
    let d = dir.display();
    commands.push(format!("echo $$ > {d}/pid-2.tmp; mv {d}/pid-2.tmp {d}/pid-2; sleep 300"));
    let tasks = submit_all(&app, &commands).await;
    let mut pids = Vec::new();
    for n in 0..3 {
        pids.push(pid_of(&dir, n).await);
    }
    app.until_parked(1).await;

    agent.signal(libc::SIGTERM);
    // Draining: a task the parked pick gets is handed back unstarted, without counting.
    let late = app.submit("echo late").await;
    let handed_back = format!("task {}: picked while stopping", late.id);
    until(Duration::from_secs(10), "the late task is handed back", || {
        agent.log().contains(&handed_back)
    })
    .await;
    std::fs::write(dir.join("go"), "").unwrap();
    let status = agent.wait(Duration::from_secs(30)).await.expect("the agent exits");

    assert!(status.success(), "exit status {status}");
    for (n, task) in tasks.iter().enumerate().take(2) {
        let task = app.get(task.id).await.unwrap();
        assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
        assert_eq!(task.stdout, Some(format!("done {n}\n")));
    }
    let overran = app.get(tasks[2].id).await.unwrap();
    assert_eq!(overran.status, TaskStatus::Queued, "handed back: {overran:?}");
    assert_eq!(overran.attempts, 0, "a release is not a failed attempt");
    assert!(!is_alive(pids[2]), "the overrunning command was stopped");
    let late_id = late.id;
    let late = app.get(late_id).await.unwrap();
    assert_eq!(late.status, TaskStatus::Queued, "nothing new started while draining: {late:?}");
    assert_eq!(late.attempts, 0, "{late:?}");
    let pool = PgPool::connect(&app.db.url).await.unwrap();
    let (releases, lost): (i32, i32) =
        sqlx::query_as("SELECT releases, lost_picks FROM tasks WHERE id = $1")
            .bind(late_id.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((releases, lost), (0, 0), "an unstarted task's hand-back costs it nothing");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_with_every_slot_busy_requeues_all_of_them() {
    let app = TestApp::spawn_with(fast).await;
    let dir = scratch();
    let mut doomed = WorkerProcess::start(&app, "doomed", &[("CONCURRENCY", "3")]);
    let d = dir.display();
    // The first run of each sleeps (after writing its pid); a later one prints.
    let commands: Vec<String> = (0..3)
        .map(|n| {
            format!(
                "if [ -e {d}/ran-{n} ]; then echo second run {n}; else touch {d}/ran-{n}; \
                 echo $$ > {d}/pid-{n}.tmp; mv {d}/pid-{n}.tmp {d}/pid-{n}; sleep 300; fi"
            )
        })
        .collect();
    let tasks = submit_all(&app, &commands).await;
    let mut pids = Vec::new();
    for n in 0..3 {
        pids.push(pid_of(&dir, n).await);
    }
    // Confirmed running, so that each lost attempt counts.
    for task in &tasks {
        app.until_running(task.id).await;
    }

    doomed.signal(libc::SIGKILL);
    doomed.wait(Duration::from_secs(10)).await.expect("the agent died");
    until(Duration::from_secs(10), "the commands die with their agent", || {
        pids.iter().all(|pid| !is_alive(*pid))
    })
    .await;
    let _rescuer = WorkerProcess::start(&app, "rescuer", &[("CONCURRENCY", "3")]);

    for (n, task) in tasks.iter().enumerate() {
        let task = app.until_done(task.id).await;
        assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
        assert_eq!(task.stdout, Some(format!("second run {n}\n")));
        assert_eq!(task.attempts, 2, "{task:?}");
        assert_eq!(task.agent.as_deref(), Some("rescuer"));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_whose_guard_was_killed_is_swept_without_touching_the_other_slots() {
    // Without RUN_AS a command can kill its guard; its processes come back to the agent,
    // which kills them, but not the command of the other slot, whose guard still lives.
    let app = TestApp::spawn().await;
    let dir = scratch();
    let _agent = WorkerProcess::start(&app, "sweeper", &[("CONCURRENCY", "2")]);
    let waiting = app.submit(&wait_for_go(&dir, 0)).await;
    let survivor = pid_of(&dir, 0).await;
    let killer = app
        .submit(
            "sleep 300 & echo $!; setsid sleep 301 & echo $!; sleep 0.1; kill -9 $PPID; sleep 302",
        )
        .await;

    let killer = app.until_done(killer.id).await;

    assert_eq!(killer.status, TaskStatus::Failed, "{killer:?}");
    let error = killer.error.clone().unwrap_or_default();
    assert!(error.contains("guard ended before its processes"), "{error}");
    let stdout = killer.stdout.clone().unwrap_or_default();
    let pids: Vec<i32> = stdout.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(pids.len(), 2, "{stdout}");
    for pid in pids {
        assert!(!is_alive(pid), "pid {pid} outlived its task");
    }
    assert!(is_alive(survivor), "the other slot's command was killed by the sweep");
    std::fs::write(dir.join("go"), "").unwrap();
    let waiting = app.until_done(waiting.id).await;
    assert_eq!(waiting.status, TaskStatus::Finished, "{waiting:?}");
    assert_eq!(waiting.stdout.as_deref(), Some("done 0\n"));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn each_slot_runs_as_a_user_of_its_own_whose_clean_up_spares_the_other_slot() {
    if !is_root() {
        eprintln!("skipped: creating run-as users needs root, as CI runs the tests");
        return;
    }
    let app = TestApp::spawn().await;
    let dir = scratch();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let prefix = format!("tes{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let users = [TestUser::named(&format!("{prefix}0")), TestUser::named(&format!("{prefix}1"))];
    let run_as = format!("{prefix}{{slot}}");
    let _agent =
        WorkerProcess::start(&app, "users", &[("CONCURRENCY", "2"), ("RUN_AS", run_as.as_str())]);
    let d = dir.display();
    let waiting = app.submit(&format!("id -u; {}", wait_for_go(&dir, 0))).await;
    let survivor = pid_of(&dir, 0).await;
    // The other slot's task leaves a daemon behind: its user's processes are all killed.
    let leaver = app.submit(&format!("id -u; setsid sleep 300 & echo $! > {d}/daemon")).await;

    let leaver = app.until_done(leaver.id).await;

    assert_eq!(leaver.status, TaskStatus::Finished, "{leaver:?}");
    let daemon: i32 = std::fs::read_to_string(dir.join("daemon")).unwrap().trim().parse().unwrap();
    assert!(!is_alive(daemon), "the daemon outlived its task");
    assert!(is_alive(survivor), "the other slot's command was killed with the other user's");
    std::fs::write(dir.join("go"), "").unwrap();
    let waiting = app.until_done(waiting.id).await;
    assert_eq!(waiting.status, TaskStatus::Finished, "{waiting:?}");
    let uid = |task: &Task| -> u32 {
        task.stdout.as_deref().unwrap_or("").lines().next().unwrap().parse().unwrap()
    };
    let uids: HashSet<u32> = [uid(&waiting), uid(&leaver)].into();
    let expected: HashSet<u32> = users.iter().map(|u| u.uid).collect();
    assert_eq!(uids, expected, "each slot ran as its own user");
    std::fs::remove_dir_all(&dir).ok();
}
