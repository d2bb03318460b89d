//! `GET /agents`: the registry an operator reads. Real agents are started, given work, stopped
//! and killed; the registry must follow, from sightings written in batches.

use std::time::Duration;

use taskexec_protocol::{AgentInfo, AgentState, Role, TaskStatus};
use taskexec_tests::{TestApp, WorkerProcess};

/// Polls `GET /agents` until agent `name` is as `wanted` says, within `timeout`.
async fn agent_until(
    app: &TestApp,
    name: &str,
    timeout: Duration,
    wanted: impl Fn(&AgentInfo) -> bool,
) -> AgentInfo {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let agents = app.agents().await.unwrap();
        let found = agents.iter().find(|agent| agent.name == name);
        if let Some(agent) = found.filter(|agent| wanted(agent)) {
            return agent.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} never as wanted: {agents:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_is_idle_then_busy_with_its_task_then_gone_as_soon_as_it_exits() {
    let app = TestApp::spawn().await;
    let mut worker = WorkerProcess::start(&app, "alpha", &[("AGENT_TAGS", "linux, gpu,linux")]);
    // Its tags come with its first pick.
    let idle = agent_until(&app, "alpha", Duration::from_secs(30), |a| {
        a.state == AgentState::Idle && !a.tags.is_empty()
    })
    .await;
    assert_eq!(idle.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(idle.tags, ["gpu", "linux"], "AGENT_TAGS, sorted, without repeats");
    assert_eq!((idle.current_task, idle.tasks_finished), (None, 0));

    // Busy while its command waits for a file this test creates.
    let gate = std::env::temp_dir().join(format!("taskexec-gate-{}", uuid::Uuid::new_v4()));
    let command = format!("while [ ! -e {0} ]; do sleep 0.05; done; rm {0}", gate.display());
    let task = app.submit(&command).await;
    let busy =
        agent_until(&app, "alpha", Duration::from_secs(30), |a| a.state == AgentState::Busy).await;
    assert_eq!(busy.current_task, Some(task.id));
    std::fs::write(&gate, b"").unwrap();
    assert_eq!(app.until_done(task.id).await.status, TaskStatus::Finished);
    let after =
        agent_until(&app, "alpha", Duration::from_secs(30), |a| a.tasks_finished == 1).await;
    assert_eq!((after.state, after.current_task), (AgentState::Idle, None));

    // A graceful exit says goodbye: gone at the first look, not a lease later.
    worker.signal(libc::SIGTERM);
    assert!(worker.wait(Duration::from_secs(30)).await.is_some_and(|s| s.success()));
    let agents = app.agents().await.unwrap();
    let alpha = agents.iter().find(|a| a.name == "alpha").unwrap();
    assert_eq!(alpha.state, AgentState::Gone, "{agents:?}");
    assert_eq!(alpha.tasks_finished, 1);
    assert!(alpha.last_seen_at >= alpha.first_seen_at);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_is_gone_within_a_lease_and_the_metrics_count_agents_by_state() {
    let lease_secs = 3;
    let app = TestApp::spawn_with(|figment| {
        figment
            .merge(("lease_secs", lease_secs))
            .merge(("pick_confirm_secs", lease_secs))
            .merge(("kill_grace_secs", 1))
            .merge(("metrics_refresh_secs", 1))
    })
    .await;
    let mut worker = WorkerProcess::start(&app, "doomed", &[]);
    agent_until(&app, "doomed", Duration::from_secs(30), |a| a.state == AgentState::Idle).await;
    let metrics = scrape_until(&app, r#"taskexec_agents{state="idle"} 1"#).await;
    assert!(metrics.contains(r#"taskexec_agents{state="gone"} 0"#), "{metrics}");

    // No goodbye: its parked pick ends with its connection, and nothing of it is seen again.
    worker.signal(libc::SIGKILL);
    worker.wait(Duration::from_secs(10)).await.expect("killed");
    let killed = tokio::time::Instant::now();
    let gone =
        agent_until(&app, "doomed", Duration::from_secs(30), |a| a.state == AgentState::Gone).await;
    let took = killed.elapsed();
    // A present agent is written every third of the lease; gone once a lease passes without.
    assert!(took <= Duration::from_secs(lease_secs + 2), "gone after {took:?}");
    assert!(took >= Duration::from_secs(1), "gone at once, without a leave: {took:?}");
    assert_eq!(gone.current_task, None);
    scrape_until(&app, r#"taskexec_agents{state="gone"} 1"#).await;
}

/// Scrapes `/metrics` until a line is `line`.
async fn scrape_until(app: &TestApp, line: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let response = app.request(reqwest::Method::GET, "/metrics").send().await.unwrap();
        let text = response.text().await.unwrap();
        if text.lines().any(|l| l == line) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {line}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_registry_takes_only_what_an_agent_may_say() {
    let app = TestApp::spawn().await;
    // A version that is not a short visible string is refused, not stored.
    let response = app
        .agent(reqwest::Method::GET, "/tasks/pick?wait=0", "tester")
        .header("X-Agent-Version", "x".repeat(65))
        .send()
        .await
        .unwrap();
    taskexec_tests::assert_problem(response, 400, "X-Agent-Version").await;
    // A reader sees the registry; a submitter and an agent do not.
    let reader = app.as_user(&app.token("ops", Role::Reader).await);
    assert!(reader.agents().await.is_ok());
    let submitter = app.as_user(&app.token("dev", Role::Submitter).await);
    assert_eq!(submitter.agents().await.unwrap_err().status, 403);
    // Leaving needs a name, like every agent request.
    let response = app.agent(reqwest::Method::POST, "/agents/leave", "").send().await.unwrap();
    taskexec_tests::assert_problem(response, 400, "X-Agent-Name").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leave_holds_against_the_agents_last_requests_on_another_process() {
    let app = TestApp::spawn().await;
    let peer = app.spawn_peer().await;
    let run = uuid::Uuid::new_v4().to_string();
    // The agent's pick is parked on the other process, as behind a load balancer.
    let parked = {
        let (peer, run) = (peer.api.clone(), run.clone());
        tokio::spawn(async move {
            let request = peer.agent(reqwest::Method::GET, "/tasks/pick?wait=2", "x");
            request.header("X-Agent-Instance", run).send().await.unwrap().status()
        })
    };
    agent_until(&app, "x", Duration::from_secs(30), |a| a.state == AgentState::Idle).await;

    let leave = app.agent(reqwest::Method::POST, "/agents/leave", "x");
    let response = leave.header("X-Agent-Instance", &run).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let gone =
        |agents: &[AgentInfo]| agents.iter().any(|a| a.name == "x" && a.state == AgentState::Gone);
    assert!(gone(&app.agents().await.unwrap()));

    // The parked pick ends on the peer, which writes what it saw of it. Once another agent's
    // later request there is listed, the peer has written all it saw of x: x stays gone.
    assert_eq!(parked.await.unwrap(), 204);
    assert_eq!(peer.pick("y", 0).await.unwrap(), None);
    agent_until(&app, "y", Duration::from_secs(30), |_| true).await;
    let agents = app.agents().await.unwrap();
    assert!(gone(&agents), "a late sighting brought it back: {agents:?}");

    // A new run under the same name is alive.
    let back = peer.agent(reqwest::Method::GET, "/tasks/pick?wait=0", "x");
    let fresh = uuid::Uuid::new_v4().to_string();
    assert_eq!(back.header("X-Agent-Instance", fresh).send().await.unwrap().status(), 204);
    agent_until(&app, "x", Duration::from_secs(30), |a| a.state == AgentState::Idle).await;
}
