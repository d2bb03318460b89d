//! Scaling in and out: agents that leave while parked on a pick (SIGTERM, SIGKILL, waves of
//! them) must never hold a task. A pick whose connection has closed is found out when its task
//! is handed over (the response is never taken), and the task goes to the next waiter at once.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use rocket::figment::Figment;
use taskexec_protocol::TaskStatus;
use taskexec_tests::{TestApp, WorkerProcess, TOKEN};
use tokio::time::Instant;

/// No rescan, no reaper, a long confirmation window: a task handed to a gone pick could only
/// come back through the detection of its closed connection.
fn no_fallbacks(figment: Figment) -> Figment {
    figment
        .merge(("dispatch_rescan_secs", 3600))
        .merge(("reaper_interval_secs", 3600))
        .merge(("pick_confirm_secs", 60))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pick_whose_connection_closed_never_keeps_a_task() {
    let app = TestApp::spawn_with(no_fallbacks).await;
    // An agent that parks a pick and goes away: its connection closes, nothing more.
    let port = app.url.rsplit(':').next().unwrap();
    let mut gone = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    write!(
        gone,
        "GET /tasks/pick?wait=30 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         X-Agent-Name: gone\r\n\r\n"
    )
    .unwrap();
    app.until_parked(1).await;
    drop(gone);
    // The server sees the connection end and lets the pick go at once (the rescan is off).
    let left = Instant::now();
    app.until_parked(0).await;
    assert!(left.elapsed() < Duration::from_secs(5), "let go after {:?}", left.elapsed());
    let live = {
        let api = app.api.clone();
        tokio::spawn(async move { api.pick("live", 30).await })
    };
    app.until_parked(1).await;

    let created = Instant::now();
    let task = app.submit("echo hi").await;

    let picked = live.await.unwrap().unwrap().expect("the live pick gets the task");
    let took = created.elapsed();
    assert_eq!(picked.task.id, task.id);
    assert_eq!(picked.task.agent.as_deref(), Some("live"));
    assert_eq!(picked.task.attempts, 1, "the live pick got the task on its first attempt");
    assert!(took < Duration::from_secs(2), "the task reached the live pick after {took:?}");
}

/// Starts `count` idle agents and waits until all are parked.
async fn parked_agents(app: &TestApp, count: usize) -> Vec<WorkerProcess> {
    let agents: Vec<_> =
        (0..count).map(|n| WorkerProcess::start(app, &format!("agent-{n}"), &[])).collect();
    app.until_parked(count as u64).await;
    agents
}

/// Submits `count` tasks one after another, each once the previous has ended, and returns how
/// long each took from its creation to its end, asserting it finished on agent `survivor`.
async fn run_in_turn(app: &TestApp, count: usize, survivor: &str) -> Vec<Duration> {
    let mut took = Vec::new();
    for n in 0..count {
        let created = Instant::now();
        let task = app.submit(&format!("echo {n}")).await;
        let task = app.until_done(task.id).await;
        took.push(created.elapsed());
        assert_eq!(task.status, TaskStatus::Finished, "{task:?}");
        assert_eq!(task.stdout.as_deref(), Some(format!("{n}\n").as_str()));
        assert_eq!(task.agent.as_deref(), Some(survivor));
        assert_eq!(task.attempts, 1, "task {n} was handed to a gone agent: {task:?}");
    }
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_agents_stopped_with_sigterm_hold_no_task_back() {
    let app = TestApp::spawn().await;
    let mut agents = parked_agents(&app, 4).await;

    for agent in &agents[1..] {
        agent.signal(libc::SIGTERM);
    }
    for agent in &mut agents[1..] {
        let status = agent.wait(Duration::from_secs(10)).await.expect("the agent exits");
        assert!(status.success(), "exit status {status}");
    }
    let took = run_in_turn(&app, 6, "agent-0").await;

    println!("FIGURE scale-in by SIGTERM: six tasks took {took:?}");
    assert!(took.iter().all(|t| *t < Duration::from_secs(1)), "{took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_agents_killed_with_sigkill_hold_no_task_back() {
    let app = TestApp::spawn().await;
    let mut agents = parked_agents(&app, 3).await;

    for agent in &agents[1..] {
        agent.signal(libc::SIGKILL);
    }
    for agent in &mut agents[1..] {
        agent.wait(Duration::from_secs(10)).await.expect("the agent dies");
    }
    let took = run_in_turn(&app, 6, "agent-0").await;

    println!("FIGURE scale-in by SIGKILL: six tasks took {took:?}");
    assert!(took.iter().all(|t| *t < Duration::from_secs(5)), "{took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_added_and_removed_in_waves_run_each_of_400_tasks_exactly_once() {
    let app = TestApp::spawn().await;
    let runs = std::env::temp_dir().join(format!("taskexec-waves-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&runs).unwrap();
    let mut agents: Vec<WorkerProcess> = Vec::new();
    let mut next_agent = 0;
    let mut start = |agents: &mut Vec<WorkerProcess>| {
        agents.push(WorkerProcess::start(&app, &format!("wave-{next_agent}"), &[]));
        next_agent += 1;
    };
    for _ in 0..4 {
        start(&mut agents);
    }
    // Each run leaves a file named after its task and its shell's pid: one file per run.
    let mut tasks = Vec::new();
    for n in 0..400 {
        let command = format!("touch {}/{n}.$$; sleep 0.02; echo out-{n}", runs.display());
        tasks.push((n, app.submit(&command).await.id));
    }

    // Waves: two agents in, the two oldest out (SIGTERM: they drain and leave), until the
    // queue is empty.
    let mut stopped = Vec::new();
    let mut waves = 0;
    loop {
        let page = app.list("status=queued&limit=1").await.unwrap();
        if page.tasks.is_empty() {
            break;
        }
        start(&mut agents);
        start(&mut agents);
        for agent in agents.drain(..2) {
            agent.signal(libc::SIGTERM);
            stopped.push(agent);
        }
        waves += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut outcomes = HashMap::new();
    for (n, id) in &tasks {
        outcomes.insert(*n, app.until_done(*id).await);
    }
    for agent in &mut stopped {
        let status = agent.wait(Duration::from_secs(60)).await.expect("a stopped agent exits");
        assert!(status.success(), "exit status {status}");
    }

    println!("FIGURE waves: {waves} waves, {} agents stopped while 400 tasks ran", stopped.len());
    assert!(waves >= 3, "the tasks ran out before the waves could test anything");
    let mut per_task: HashMap<String, usize> = HashMap::new();
    for entry in std::fs::read_dir(&runs).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        *per_task.entry(name.split('.').next().unwrap().to_owned()).or_default() += 1;
    }
    for (n, task) in &outcomes {
        assert_eq!(task.status, TaskStatus::Finished, "task {n}: {task:?}");
        assert_eq!(task.stdout.as_deref(), Some(format!("out-{n}\n").as_str()), "task {n}");
        assert_eq!(per_task.get(&n.to_string()), Some(&1), "task {n} ran other than once");
    }
    std::fs::remove_dir_all(runs).ok();
}
