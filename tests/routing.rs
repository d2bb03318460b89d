//! What a task may say besides its command, end to end through the API: tags route it,
//! priority orders it, `run_at` delays it, retries bring it back on a schedule, an
//! Idempotency-Key makes a submit safe to repeat, `env` and `cwd` reach the command, and every
//! attempt is on record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskexec_api::tasks::store;
use taskexec_protocol::{
    Assignment, AttemptOutcome, FinishReport, NewTask, Role, Task, TaskId, TaskStatus,
};
use taskexec_tests::{TestApp, WorkerProcess};

fn tagged(command: &str, tags: &[&str]) -> NewTask {
    NewTask { tags: tags.iter().map(|t| t.to_string()).collect(), ..NewTask::new(command) }
}

async fn create(app: &TestApp, task: &NewTask) -> Task {
    app.create(task).await.unwrap_or_else(|e| panic!("create {task:?}: {e}"))
}

/// One look at the queue (`wait=0`) for an agent with `tags`: the task it got, if any.
async fn look(app: &TestApp, agent: &str, tags: &str) -> Option<Assignment> {
    app.pick_tagged(agent, tags, 0).await.unwrap()
}

/// Lets a delayed (or backed-off) task be claimed now, as if its time had come.
async fn due_now(app: &TestApp, id: TaskId) {
    let id: uuid::Uuid = id.to_string().parse().unwrap();
    sqlx::query("UPDATE tasks SET run_at = now() WHERE id = $1")
        .bind(id)
        .execute(&app.db.pool().await)
        .await
        .unwrap();
}

fn secs(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds() as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tagged_task_waits_for_its_agent_while_untagged_tasks_flow_past_it() {
    let app = TestApp::spawn().await;
    let gpu = create(&app, &tagged("train", &["gpu", "linux"])).await;
    let mut untagged = Vec::new();
    for n in 0..3 {
        untagged.push(app.submit(&format!("echo {n}")).await.id);
    }

    // An agent without tags, and one with only one of the two, take the untagged tasks in
    // order and never the tagged one.
    for (n, (agent, tags)) in
        [("plain", ""), ("linux-only", "linux"), ("plain", "")].iter().enumerate()
    {
        let got = look(&app, agent, tags).await.expect("an untagged task");
        assert_eq!(got.task.id, untagged[n], "{agent} takes the oldest untagged task");
    }
    assert!(
        look(&app, "plain", "").await.is_none(),
        "the tagged task is not for an untagged agent"
    );
    assert!(look(&app, "linux-only", "linux").await.is_none(), "nor for one lacking a tag");
    assert_eq!(app.get(gpu.id).await.unwrap().status, TaskStatus::Queued);

    // An agent with every tag of the task, and more, takes it.
    let got = look(&app, "big", "cuda,gpu,linux").await.expect("the gpu task");
    assert_eq!(got.task.id, gpu.id);
    assert_eq!(got.task.options.tags, ["gpu", "linux"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_tags_takes_untagged_tasks_too() {
    let app = TestApp::spawn().await;
    let task = app.submit("echo anywhere").await;

    let got = look(&app, "gpu-box", "gpu,linux").await.expect("the untagged task");

    assert_eq!(got.task.id, task.id);
    assert_eq!(got.task.agent.as_deref(), Some("gpu-box"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_pick_gets_a_task_for_its_tags_as_soon_as_one_is_submitted() {
    // No rescan within the test: only the submit's notification can wake the picks.
    let app = TestApp::spawn_with(|f| f.merge(("dispatch_rescan_secs", 3600))).await;
    let gpu_pick = {
        let api = app.api.clone();
        tokio::spawn(async move { api.pick_tagged("gpu-box", "gpu", 20).await })
    };
    let plain_pick = {
        let api = app.api.clone();
        tokio::spawn(async move { api.pick_tagged("plain", "", 20).await })
    };
    app.until_parked(2).await;

    let task = create(&app, &tagged("train", &["gpu"])).await;

    let got = gpu_pick.await.unwrap().unwrap().expect("the gpu task");
    assert_eq!(got.task.id, task.id);
    // The untagged agent is still parked: the task was not for it.
    app.until_parked(1).await;
    let untagged = app.submit("echo plain").await;
    assert_eq!(plain_pick.await.unwrap().unwrap().expect("a task").task.id, untagged.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn higher_priority_goes_first_then_creation_order() {
    let app = TestApp::spawn().await;
    let mut made = Vec::new();
    for (n, priority) in [0, -5, 10, 0, 10, 100, -100].into_iter().enumerate() {
        let task = NewTask { priority: Some(priority), ..NewTask::new(format!("echo {n}")) };
        made.push((priority, create(&app, &task).await.id));
    }
    // Stable: equal priorities keep their creation order.
    let mut expected = made.clone();
    expected.sort_by_key(|(priority, _)| -priority);

    let mut picked = Vec::new();
    while let Some(got) = look(&app, "a", "").await {
        picked.push((got.task.options.priority, got.task.id));
    }

    assert_eq!(picked, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delayed_task_is_not_picked_early_and_is_picked_within_100_ms_of_its_time() {
    // No rescan within the test: a pick parked before the task is due is answered only if
    // the dispatcher wakes for the task's time by itself.
    let app = TestApp::spawn_with(|f| f.merge(("dispatch_rescan_secs", 3600))).await;
    let task = create(&app, &NewTask { delay_secs: Some(2), ..NewTask::new("echo later") }).await;
    let run_at = task.options.run_at.expect("a delayed task has its run_at");
    assert!((1.99..2.01).contains(&secs(task.created_at, run_at)), "{task:?}");
    assert!(look(&app, "early", "").await.is_none(), "picked before its time");

    let got = app.pick("punctual", 10).await.unwrap().expect("the task, once due");

    assert_eq!(got.task.id, task.id);
    let started = got.task.started_at.expect("claimed");
    let late = secs(run_at, started);
    assert!((0.0..0.1).contains(&late), "claimed {late} s after its run_at");

    // An explicit run_at is kept as given.
    let at = DateTime::from_timestamp(Utc::now().timestamp() + 3600, 0).unwrap();
    let far = create(&app, &NewTask { run_at: Some(at), ..NewTask::new("echo far") }).await;
    assert_eq!(far.options.run_at, Some(at));
    assert!(look(&app, "early", "").await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_command_is_retried_on_the_backoff_schedule_and_its_last_outcome_stands() {
    let app = TestApp::spawn().await;
    let task =
        NewTask { max_retries: Some(2), retry_backoff_secs: Some(10), ..NewTask::new("exit 1") };
    let id = create(&app, &task).await.id;

    // Each failure brings it back after 10 s × 2^(retry − 1), less up to a fifth of jitter.
    for (retry, full) in [(1, 10.0), (2, 20.0)] {
        let got = look(&app, "a", "").await.expect("the task, due");
        let after = app.finish(id, &FinishReport::exited(got.lease, 1)).await.unwrap();
        assert_eq!((after.status, after.retries), (TaskStatus::Queued, retry));
        assert_eq!(after.exit_code, None, "a queued task shows no result");
        let attempts = app.attempts(id).await.unwrap();
        let ended = attempts.last().unwrap().finished_at.unwrap();
        let delay = secs(ended, after.options.run_at.expect("backed off"));
        assert!((0.8 * full - 0.01..=full + 0.01).contains(&delay), "retry {retry}: {delay} s");
        assert!(look(&app, "a", "").await.is_none(), "picked during its backoff");
        due_now(&app, id).await;
    }

    let got = look(&app, "a", "").await.expect("the last try");
    let last = app.finish(id, &FinishReport::exited(got.lease, 1)).await.unwrap();

    assert_eq!((last.status, last.exit_code, last.retries), (TaskStatus::Finished, Some(1), 2));
    assert_eq!(last.attempts, 3);
    let outcomes: Vec<_> =
        app.attempts(id).await.unwrap().iter().map(|a| (a.outcome, a.exit_code)).collect();
    use AttemptOutcome::{Finished, Retried};
    assert_eq!(
        outcomes,
        [(Some(Retried), Some(1)), (Some(Retried), Some(1)), (Some(Finished), Some(1))]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_backoff_is_capped_at_an_hour_and_success_is_never_retried() {
    let app = TestApp::spawn().await;
    let task =
        NewTask { max_retries: Some(3), retry_backoff_secs: Some(3000), ..NewTask::new("exit 1") };
    let id = create(&app, &task).await.id;
    let mut delays = Vec::new();
    for _ in 0..2 {
        let got = look(&app, "a", "").await.expect("the task, due");
        let after = app.finish(id, &FinishReport::exited(got.lease, 1)).await.unwrap();
        let ended = app.attempts(id).await.unwrap().last().unwrap().finished_at.unwrap();
        delays.push(secs(ended, after.options.run_at.unwrap()));
        due_now(&app, id).await;
    }
    assert!((2400.0 - 0.01..=3000.01).contains(&delays[0]), "{delays:?}");
    assert!(
        (2880.0 - 0.01..=3600.01).contains(&delays[1]),
        "3000 × 2 is capped at 3600: {delays:?}"
    );

    let got = look(&app, "a", "").await.expect("the task, due");
    let done = app.finish(id, &FinishReport::exited(got.lease, 0)).await.unwrap();
    assert_eq!((done.status, done.exit_code, done.retries), (TaskStatus::Finished, Some(0), 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_is_retried_and_an_abort_never_is() {
    let app = TestApp::spawn().await;
    let retried = |command: &str| NewTask {
        max_retries: Some(3),
        retry_backoff_secs: Some(0),
        ..NewTask::new(command)
    };

    let slow = create(&app, &retried("sleep 100")).await.id;
    let got = look(&app, "a", "").await.expect("the slow task");
    let report =
        FinishReport { timed_out: true, ..FinishReport::failed(got.lease, "timed out after 60 s") };
    let after = app.finish(slow, &report).await.unwrap();
    assert_eq!((after.status, after.retries), (TaskStatus::Queued, 1));
    // A backoff of 0: due at once.
    assert_eq!(look(&app, "a", "").await.expect("again").task.id, slow);

    let doomed = create(&app, &retried("sleep 100")).await.id;
    let got = loop {
        let got = look(&app, "b", "").await.expect("a task");
        if got.task.id == doomed {
            break got;
        }
    };
    app.abort(doomed).await.unwrap();
    // The agent stops the command at the abort: it ends with a signal's exit code.
    let report = FinishReport { aborted: true, ..FinishReport::exited(got.lease, 143) };
    let after = app.finish(doomed, &report).await.unwrap();

    assert_eq!((after.status, after.retries), (TaskStatus::Cancelled, 0));
    let outcomes: Vec<_> = app.attempts(doomed).await.unwrap().iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, [Some(AttemptOutcome::Cancelled)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_idempotency_key_creates_one_task_however_many_submit_it_at_once() {
    let app = TestApp::spawn().await;
    let task = NewTask { priority: Some(7), ..NewTask::new("echo once") };
    let submits = (0..16).map(|_| {
        let (api, task) = (app.api.clone(), task.clone());
        tokio::spawn(async move { api.create_keyed(&task, "deploy-2026-12-04").await.unwrap() })
    });
    let mut answers = Vec::new();
    for submit in submits {
        answers.push(submit.await.unwrap());
    }

    let created: Vec<&Task> = answers.iter().filter(|(_, new)| *new).map(|(t, _)| t).collect();
    assert_eq!(created.len(), 1, "exactly one 201");
    let id = created[0].id;
    assert!(answers.iter().all(|(t, _)| t.id == id), "every answer is the first task");
    assert_eq!(app.list("").await.unwrap().tasks.len(), 1);

    // The same key with another body is refused, naming the key.
    let other = NewTask::new("echo twice");
    app.create_keyed(&other, "deploy-2026-12-04").await.unwrap_err().expect(422, "Idempotency-Key");
    // A key is per owner: another submitter's same key is its own.
    let token = app.token("someone-else", Role::Submitter).await;
    let (theirs, new) = app.as_user(&token).create_keyed(&task, "deploy-2026-12-04").await.unwrap();
    assert!(new && theirs.id != id);
    // Keys the header rule refuses.
    for bad in ["", &"k".repeat(256), "has space", "tab\there"] {
        let response = app
            .request(reqwest::Method::POST, "/tasks")
            .header("Idempotency-Key", bad)
            .json(&task)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "key {bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn env_and_cwd_reach_the_command_and_what_cannot_run_fails_without_retry() {
    let app = TestApp::spawn().await;
    let dir = std::env::temp_dir().join(format!("taskexec-cwd-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let cwd = dir.canonicalize().unwrap().display().to_string();
    let _worker = WorkerProcess::start(&app, "env-agent", &[("TASK_ENV_OVERRIDE", "HOME")]);
    let env: BTreeMap<String, String> = [("GREETING", "hello world"), ("HOME", "/nowhere")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let task = NewTask {
        env,
        cwd: Some(cwd.clone()),
        ..NewTask::new(r#"printf '%s|%s|%s' "$GREETING" "$HOME" "$(pwd -P)""#)
    };
    let id = create(&app, &task).await.id;
    let done = app.until_done(id).await;
    assert_eq!(done.exit_code, Some(0), "{done:?}");
    assert_eq!(done.stdout.as_deref(), Some(format!("hello world|/nowhere|{cwd}").as_str()));

    // PATH is not among the variables this agent lets a task set: refused, not retried.
    let path = NewTask {
        env: [("PATH".to_owned(), "/tmp/evil".to_owned())].into(),
        max_retries: Some(3),
        ..NewTask::new("true")
    };
    let refused = app.until_done(create(&app, &path).await.id).await;
    assert_eq!(refused.status, TaskStatus::Failed);
    assert!(refused.error.as_deref().unwrap().contains("PATH"), "{refused:?}");
    assert_eq!((refused.attempts, refused.retries), (1, 0));

    // A directory missing on the agent: a clear error, no retry loop.
    let missing = NewTask {
        cwd: Some(format!("{cwd}/missing")),
        max_retries: Some(3),
        ..NewTask::new("true")
    };
    let failed = app.until_done(create(&app, &missing).await.id).await;
    assert_eq!(failed.status, TaskStatus::Failed);
    assert!(failed.error.as_deref().unwrap().contains("does not exist"), "{failed:?}");
    assert_eq!((failed.attempts, failed.retries), (1, 0));
    std::fs::remove_dir(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn attempts_show_a_hand_back_a_lost_lease_retries_and_the_running_one() {
    let app = TestApp::spawn().await;
    let pool = app.db.pool().await;
    let task = NewTask { max_retries: Some(1), retry_backoff_secs: Some(0), ..NewTask::new("x") };
    let id = create(&app, &task).await.id;
    assert!(app.attempts(id).await.unwrap().is_empty(), "no attempt while queued");

    // Handed back by a draining agent.
    let got = look(&app, "drainer", "").await.unwrap();
    app.heartbeat(id, got.lease, 0).await.unwrap();
    app.release(id, got.lease).await.unwrap();
    // Confirmed, then the agent vanished: the reaper requeues it.
    let got = look(&app, "vanished", "").await.unwrap();
    app.heartbeat(id, got.lease, 0).await.unwrap();
    sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(store::reap(&pool, 3, 40).await.unwrap().requeued(), 1);
    // Failed and retried.
    let got = look(&app, "failer", "").await.unwrap();
    app.finish(id, &FinishReport::exited(got.lease, 3)).await.unwrap();
    // Running now.
    let got = look(&app, "finisher", "").await.unwrap();
    let running = app.attempts(id).await.unwrap();
    assert_eq!(running.len(), 4);
    let current = running.last().unwrap();
    assert_eq!(
        (current.agent.as_str(), current.outcome, current.finished_at),
        ("finisher", None, None)
    );

    app.finish(id, &FinishReport::exited(got.lease, 0)).await.unwrap();

    let attempts = app.attempts(id).await.unwrap();
    let seen: Vec<_> =
        attempts.iter().map(|a| (a.agent.as_str(), a.outcome, a.exit_code)).collect();
    use AttemptOutcome::{Finished, Released, Requeued, Retried};
    assert_eq!(
        seen,
        [
            ("drainer", Some(Released), None),
            ("vanished", Some(Requeued), None),
            ("failer", Some(Retried), Some(3)),
            ("finisher", Some(Finished), Some(0)),
        ]
    );
    assert!(attempts[1].error.as_deref().unwrap().contains("agent lost"), "{attempts:?}");
    for pair in attempts.windows(2) {
        assert!(pair[0].started_at <= pair[1].started_at, "oldest first: {attempts:?}");
    }
    assert!(attempts.iter().all(|a| a.finished_at.is_some()), "{attempts:?}");
    // The two that heartbeat ran; the others reported no start time.
    assert!(attempts[..2].iter().all(|a| a.running_at.is_some()), "{attempts:?}");
    // The task keeps showing its last attempt.
    let task = app.get(id).await.unwrap();
    assert_eq!((task.agent.as_deref(), task.exit_code), (Some("finisher"), Some(0)));

    // Another submitter cannot see them.
    let token = app.token("stranger", Role::Submitter).await;
    app.as_user(&token).attempts(id).await.unwrap_err().expect(404, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_pickers_with_mixed_tags_and_priorities_get_each_task_exactly_once() {
    let app = TestApp::spawn().await;
    let tag_sets: [&[&str]; 4] = [&[], &["gpu"], &["linux"], &["gpu", "linux"]];
    let mut tasks: HashMap<TaskId, Vec<String>> = HashMap::new();
    for n in 0..400 {
        let tags = tag_sets[n % 4];
        let task =
            NewTask { priority: Some([-1, 0, 1][n % 3]), ..tagged(&format!("echo {n}"), tags) };
        tasks.insert(create(&app, &task).await.id, task.tags);
    }
    let total = tasks.len();
    let done = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pickers = (0..32).map(|n| {
        let (api, done, seen) = (app.api.clone(), done.clone(), seen.clone());
        let tags = tag_sets[n % 4].join(",");
        tokio::spawn(async move {
            let agent = format!("picker-{n}");
            while done.load(Ordering::SeqCst) < total {
                let Some(got) = api.pick_tagged(&agent, &tags, 1).await.unwrap() else { continue };
                seen.lock().unwrap().push((got.task.id, tags.clone()));
                api.finish(got.task.id, &FinishReport::exited(got.lease, 0)).await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    });
    for picker in pickers.collect::<Vec<_>>() {
        tokio::time::timeout(Duration::from_secs(120), picker).await.expect("drained").unwrap();
    }

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), total, "every task picked once, none twice");
    let ids: HashSet<TaskId> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), total, "no task twice");
    for (id, agent_tags) in seen.iter() {
        let agent_tags: Vec<&str> = agent_tags.split(',').filter(|t| !t.is_empty()).collect();
        assert!(
            tasks[id].iter().all(|t| agent_tags.contains(&t.as_str())),
            "task {id} with tags {:?} went to an agent with {agent_tags:?}",
            tasks[id]
        );
    }
}
