//! The HTTP API against a real PostgreSQL: every endpoint's success and error paths.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use taskexec_protocol::{
    FinishReport, LeaseToken, NewTask, ProblemType, Stream, Task, TaskId, TaskPage, TaskStatus,
};
use taskexec_tests::{assert_problem, Api, PgProxy, TestApp, TestDb, ADMIN_TOKEN, TOKEN};
use tokio::time::Instant;

/// A server that rescans the queue only once an hour: a parked pick it answers within seconds
/// was woken by a notification, not by the fallback rescan.
async fn spawn_without_rescan() -> TestApp {
    TestApp::spawn_with(|figment| figment.merge(("dispatch_rescan_secs", 3600))).await
}

/// Asserts a 400 `bad-parameter` problem whose `parameter` member names `parameter`.
async fn assert_bad_parameter(response: reqwest::Response, parameter: &str, needle: &str) {
    let problem = assert_problem(response, 400, needle).await;
    assert_eq!(problem["type"], ProblemType::BadParameter.uri(), "{problem}");
    assert_eq!(problem["parameter"], parameter, "{problem}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_created_task_is_queued_located_and_readable() {
    let app = TestApp::spawn().await;

    // Raw, for the Location header and the exact JSON the user sees.
    let response =
        app.request(Method::POST, "/tasks").json(&NewTask::new("echo hi")).send().await.unwrap();

    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let task: Task = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(location, format!("/tasks/{}", task.id));
    assert_eq!(task.command, "echo hi");
    assert_eq!(task.status, TaskStatus::Queued);
    assert_eq!(task.attempts, 0);
    assert!(task.started_at.is_none() && task.finished_at.is_none(), "{task:?}");
    assert!(task.exit_code.is_none() && task.error.is_none() && task.agent.is_none(), "{task:?}");
    assert!(task.stdout.is_none() && task.stderr.is_none(), "{task:?}");
    assert!(body.get("lease").is_none(), "users must not see the lease");
    let created_at = body["created_at"].as_str().unwrap();
    assert!(created_at.ends_with('Z') && created_at.contains('T'), "RFC 3339: {created_at}");
    assert_eq!(app.get(task.id).await.unwrap(), task);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_bad_new_task_gets_a_problem_naming_it() {
    let app = TestApp::spawn().await;
    let too_long = "x".repeat(64 * 1024 + 1);
    let json_cases: Vec<(Value, &str)> = vec![
        (json!({"command": "ls", "status": "finished"}), "`status` is set by the server"),
        (json!({"command": "ls", "id": "x"}), "`id` is set by the server"),
        (json!({"command": "ls", "colour": 3}), "unknown field `colour`"),
        (json!({"command": "ls", "priority": 101}), "`priority` must be a whole number"),
        (json!({"command": "ls", "tags": ["GPU"]}), "`tags` holds \"GPU\""),
        (json!({"command": "ls", "env": {"1A": "x"}}), "`env` names \"1A\""),
        (json!({"command": "ls", "cwd": "tmp"}), "`cwd` must be an absolute path"),
        (json!({"command": "ls", "retries": 1}), "`retries` is set by the server"),
        (json!({}), "`command` is required"),
        (json!({"command": ""}), "empty"),
        (json!({"command": "  \n\t "}), "only whitespace"),
        (json!({"command": 42}), "must be a string"),
        (json!({"command": ["ls"]}), "must be a string"),
        (json!({"command": "echo a\u{0}b"}), "NUL"),
        (json!({"command": too_long}), "the limit is 65536"),
        (json!(["ls"]), "JSON object"),
    ];
    for (body, needle) in json_cases {
        let response = app.request(Method::POST, "/tasks").json(&body).send().await.unwrap();
        let problem = assert_problem(response, 422, needle).await;
        assert_eq!(problem["type"], ProblemType::InvalidRequest.uri(), "{body}");
    }

    let raw_cases: Vec<(&str, Vec<u8>, ProblemType, &str)> = vec![
        ("application/json", b"{\"command\": ".to_vec(), ProblemType::BadRequest, "not valid JSON"),
        ("application/json", b"".to_vec(), ProblemType::BadRequest, "not valid JSON"),
        ("application/json", vec![b'"'; 200 * 1024], ProblemType::PayloadTooLarge, "larger than"),
        (
            "text/plain",
            b"{\"command\": \"ls\"}".to_vec(),
            ProblemType::UnsupportedMediaType,
            "Content-Type: application/json",
        ),
        (
            "application/x-www-form-urlencoded",
            b"command=ls".to_vec(),
            ProblemType::UnsupportedMediaType,
            "application/json",
        ),
    ];
    for (content_type, body, kind, needle) in raw_cases {
        let response = app
            .request(Method::POST, "/tasks")
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, kind.status(), needle).await;
        assert_eq!(problem["type"], kind.uri(), "{content_type}");
    }

    let page = app.list("").await.unwrap();
    assert!(page.tasks.is_empty(), "a refused task must not be stored: {:?}", page.tasks);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_at_the_size_limit_is_accepted() {
    let app = TestApp::spawn().await;

    let task = app.submit(&"x".repeat(64 * 1024)).await;

    assert_eq!(task.command.len(), 64 * 1024);
    assert_eq!(app.get(task.id).await.unwrap().command, task.command);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_malformed_task_ids_are_4xx_problems() {
    let app = TestApp::spawn().await;

    let unknown = app.get(TaskId::random()).await.unwrap_err();
    let malformed = app.request(Method::GET, "/tasks/not-a-uuid").send().await.unwrap();
    let no_route = app.request(Method::GET, "/nowhere").send().await.unwrap();

    unknown.expect(404, "no task with id");
    assert_eq!(unknown.kind(), Some(ProblemType::NotFound));
    let malformed = assert_problem(malformed, 400, "not a task id").await;
    assert_eq!(malformed["type"], ProblemType::BadRequest.uri());
    let no_route = assert_problem(no_route, 404, "/nowhere").await;
    assert_eq!(no_route["type"], ProblemType::NotFound.uri());
}

fn ids(page: &TaskPage) -> Vec<TaskId> {
    page.tasks.iter().map(|task| task.id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_list_is_newest_first_and_filters_by_status() {
    let app = TestApp::spawn().await;
    let first = app.submit("echo 1").await;
    let second = app.submit("echo 2").await;
    let third = app.submit("echo 3").await;
    app.pick("a", 0).await.unwrap().expect("the first task is picked");

    let all = app.list("").await.unwrap();
    let queued = app.list("status=queued").await.unwrap();
    let running = app.list("status=in_progress").await.unwrap();

    assert_eq!(ids(&all), [third.id, second.id, first.id]);
    assert!(all.next.is_none());
    assert_eq!(ids(&queued), [third.id, second.id]);
    assert_eq!(ids(&running), [first.id]);
    assert_eq!(running.tasks[0].status, TaskStatus::InProgress);
}

#[tokio::test(flavor = "multi_thread")]
async fn walking_all_pages_sees_each_task_exactly_once_while_tasks_arrive() {
    let app = TestApp::spawn().await;
    let mut created = HashSet::new();
    for i in 0..23 {
        created.insert(app.submit(&format!("echo {i}")).await.id);
    }

    let mut seen = Vec::new();
    let mut query = "limit=5".to_owned();
    loop {
        let page = app.list(&query).await.unwrap();
        assert!(page.tasks.len() <= 5);
        seen.extend(ids(&page));
        // Newer tasks arriving mid-walk must neither shift nor repeat the older pages.
        app.submit("echo newcomer").await;
        match page.next {
            Some(cursor) => query = format!("limit=5&cursor={cursor}"),
            None => break,
        }
    }

    assert_eq!(seen.len(), 23, "each task once: {seen:?}");
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), created);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_list_parameters_are_400_problems() {
    let app = TestApp::spawn().await;
    let cases = [
        ("status=done", "status", "unknown status"),
        ("limit=0", "limit", "from 1 to 1000"),
        ("limit=1001", "limit", "from 1 to 1000"),
        ("limit=ten", "limit", "from 1 to 1000"),
        ("cursor=zzz", "cursor", "not a cursor"),
        ("cursor=s-1", "cursor", "not a cursor"),
    ];
    for (query, parameter, needle) in cases {
        let failure = app.list(query).await.unwrap_err();
        failure.expect(400, needle);
        assert_eq!(failure.kind(), Some(ProblemType::BadParameter), "{query}");
        assert_eq!(failure.problem.parameter.as_deref(), Some(parameter), "{query}");
    }

    assert!(app.list("limit=1000").await.is_ok(), "the largest limit is accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_repeated_and_malformed_query_parameters_are_400_problems_naming_them() {
    let app = TestApp::spawn().await;

    // A create with a query it does not take is refused before anything is stored.
    let create = app
        .request(Method::POST, "/tasks?wait=10")
        .json(&NewTask::new("echo never"))
        .send()
        .await
        .unwrap();
    assert_bad_parameter(create, "wait", "unknown query parameter `wait`").await;
    let page = app.list("").await.unwrap();
    assert!(page.tasks.is_empty(), "a refused create must not store a task: {:?}", page.tasks);

    let task = app.submit("echo parameters").await;
    let id = task.id;
    let cases = [
        (
            "/tasks?status=cancelled&status=cancelled".to_owned(),
            "status",
            "`status` is given more than once",
        ),
        ("/tasks?limit=2&limit=3".to_owned(), "limit", "`limit` is given more than once"),
        ("/tasks?stauts=queued".to_owned(), "stauts", "unknown query parameter `stauts`"),
        (format!("/tasks/{id}?wait=abc"), "wait", "`wait` must be a whole number"),
        (format!("/tasks/{id}/log?follow=tru"), "follow", "`follow` must be true, false, 1 or 0"),
        ("/health?x=1".to_owned(), "x", "takes no query parameters"),
    ];
    for (path, parameter, needle) in cases {
        let response = app.request(Method::GET, &path).send().await.unwrap();
        assert_bad_parameter(response, parameter, needle).await;
    }

    // Each spelling of a boolean is read as what it says: a followed log of an ended task ends
    // with how the task ended, an unfollowed one does not.
    let Ok(taskexec_tests::Aborted::Cancelled(_)) = app.abort(id).await else {
        panic!("a queued task is cancelled at once");
    };
    let ending = "\n[taskexec: task cancelled]\n";
    for (value, follows) in [("1", true), ("true", true), ("0", false), ("false", false)] {
        let response =
            app.request(Method::GET, &format!("/tasks/{id}/log?follow={value}")).send().await;
        let response = response.unwrap();
        assert_eq!(response.status(), 200, "follow={value}");
        let body = response.text().await.unwrap();
        assert_eq!(body.ends_with(ending), follows, "follow={value}: {body:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_endpoints_require_the_token_and_a_name() {
    let app = TestApp::spawn().await;
    let task = app.submit("true").await;

    let none = app
        .anonymous(Method::GET, "/tasks/pick?wait=0")
        .header("X-Agent-Name", "a")
        .send()
        .await
        .unwrap();
    let wrong = app
        .anonymous(Method::GET, "/tasks/pick?wait=0")
        .bearer_auth("not-the-token")
        .header("X-Agent-Name", "a")
        .send()
        .await
        .unwrap();
    let unnamed =
        app.anonymous(Method::GET, "/tasks/pick?wait=0").bearer_auth(TOKEN).send().await.unwrap();
    let finish = app
        .anonymous(Method::POST, &format!("/tasks/{}/finish", task.id))
        .json(&FinishReport::exited(LeaseToken::random(), 0))
        .send()
        .await
        .unwrap();

    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    let none = assert_problem(none, 401, "Bearer").await;
    assert_eq!(none["type"], ProblemType::Unauthorized.uri());
    assert_problem(wrong, 401, "token").await;
    let unnamed = assert_problem(unnamed, 400, "X-Agent-Name").await;
    assert_eq!(unnamed["type"], ProblemType::BadRequest.uri());
    assert_problem(finish, 401, "token").await;
    let stored = app.get(task.id).await.unwrap();
    assert_eq!(stored.status, TaskStatus::Queued, "refused requests change nothing");
    assert_eq!(stored.attempts, 0, "refused requests change nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pick_hands_out_the_oldest_task_with_a_lease() {
    let app = TestApp::spawn().await;
    let oldest = app.submit("echo first").await;
    app.submit("echo second").await;

    let picked = app.pick("agent-7", 0).await.unwrap().expect("a task");

    assert_eq!(picked.task.id, oldest.id);
    assert_eq!(picked.task.command, "echo first");
    assert_eq!(picked.task.attempts, 1);
    assert!(picked.lease_expires_at > chrono::Utc::now(), "the lease runs in the future");
    let stored = app.get(oldest.id).await.unwrap();
    assert_eq!(stored.status, TaskStatus::InProgress);
    assert_eq!(stored.agent.as_deref(), Some("agent-7"));
    assert!(stored.started_at.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn sequential_picks_follow_creation_order() {
    let app = TestApp::spawn().await;
    let mut created = Vec::new();
    for i in 0..20 {
        created.push(app.submit(&format!("echo {i}")).await.id);
    }

    let mut picked = Vec::new();
    while let Some(assignment) = app.pick("agent", 0).await.unwrap() {
        picked.push(assignment.task.id);
    }

    assert_eq!(picked, created);
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_concurrent_pickers_get_each_of_500_tasks_exactly_once() {
    let app = TestApp::spawn().await;
    for i in 0..500 {
        app.submit(&format!("echo {i}")).await;
    }

    let pickers: Vec<_> = (0..32)
        .map(|n| {
            let api = app.api.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                let name = format!("picker-{n}");
                while let Some(assignment) = api.pick(&name, 0).await.unwrap() {
                    mine.push(assignment.task.id);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for picker in pickers {
        all.extend(picker.await.unwrap());
    }

    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 500, "every task picked");
    assert_eq!(distinct.len(), 500, "no task picked twice");
    assert!(app.list("status=queued").await.unwrap().tasks.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_pick_wakes_when_a_task_is_created() {
    let app = spawn_without_rescan().await;
    let woken = "woken within 2 s of the create, not by a rescan or the 20 s deadline";
    woken_by(&app, app.submit("echo wake"), woken).await;
}

/// Parks a pick on `app`, then creates a task with `create`: the pick must get that task
/// within 2 s (`woken` says how it should have been woken).
async fn woken_by(app: &TestApp, create: impl std::future::Future<Output = Task>, woken: &str) {
    let pick = {
        let api = app.api.clone();
        tokio::spawn(async move { api.pick("parked", 20).await })
    };
    app.until_parked(1).await;

    let created = Instant::now();
    let task = create.await;

    let picked = tokio::time::timeout_at(created + Duration::from_secs(2), pick)
        .await
        .expect(woken)
        .unwrap()
        .unwrap()
        .expect("a task, not 204");
    assert_eq!(picked.task.id, task.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_created_on_another_api_process_wakes_a_parked_pick() {
    let app = spawn_without_rescan().await;
    let peer =
        TestApp::spawn_on(app.db.clone(), |figment| figment.merge(("dispatch_rescan_secs", 3600)))
            .await;
    let woken = "woken within 2 s of the peer's create, not by a rescan or the deadline";
    woken_by(&app, peer.submit("echo from the peer"), woken).await;
}

/// `listen_url` sends the LISTEN connection elsewhere than the pool (to PostgreSQL itself, when
/// the pool goes through a transaction-mode pooler): here through a counting proxy, while the
/// requests' statements go straight to the database.
#[tokio::test(flavor = "multi_thread")]
async fn the_listen_connection_goes_to_listen_url_and_the_pool_does_not() {
    let db = std::sync::Arc::new(TestDb::create().await);
    let proxy = PgProxy::start(&db).await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_on(db, move |figment| {
        figment
            .merge(("listen_url", url))
            .merge(("dispatch_rescan_secs", 3600))
            .merge(("listen_probe_secs", 3600))
    })
    .await;
    let woken = "woken within 2 s by a notification through listen_url";
    woken_by(&app, app.submit("echo wake"), woken).await;
    let through_proxy = proxy.statements();
    assert!(through_proxy >= 1, "the LISTEN went through listen_url");
    for _ in 0..20 {
        app.list("").await.unwrap();
    }
    assert_eq!(proxy.statements(), through_proxy, "requests do not use listen_url");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_pick_answers_204_at_its_deadline() {
    let app = TestApp::spawn().await;
    let started = Instant::now();

    let picked = app.pick("patient", 1).await.unwrap();

    assert!(picked.is_none());
    assert!(started.elapsed() >= Duration::from_secs(1), "held until the deadline");
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_beyond_the_maximum_is_refused() {
    let app = TestApp::spawn().await;
    for wait in ["61", "-1", "soon"] {
        let response =
            app.agent(Method::GET, &format!("/tasks/pick?wait={wait}"), "a").send().await.unwrap();
        assert_bad_parameter(response, "wait", "`wait` must be").await;
    }
    assert_eq!(app.health().await.unwrap()["parked_picks"], 0, "no refused pick is parked");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pick_with_max_gets_a_list_of_up_to_max_tasks_each_with_its_own_lease() {
    let app = TestApp::spawn().await;
    for (query, needle) in [
        ("max=0", "`max` must be a whole number from 1 to 64"),
        ("max=65", "`max` must be a whole number from 1 to 64"),
        ("max=two", "`max` must be a whole number"),
        ("max=2&max=3", "`max` is given more than once"),
    ] {
        let path = format!("/tasks/pick?wait=0&{query}");
        let response = app.agent(Method::GET, &path, "a").send().await.unwrap();
        assert_bad_parameter(response, "max", needle).await;
    }
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(app.submit(&format!("echo {n}")).await.id);
    }

    let picked = app.pick_many("slots", 2, 0).await.unwrap();

    let got: Vec<_> = picked.iter().map(|a| a.task.id).collect();
    assert_eq!(got, ids[..2], "the two oldest, in order");
    assert_ne!(picked[0].lease, picked[1].lease);
    // The list form even for one; none left after the last is an empty answer.
    let last = app.pick_many("slots", 5, 0).await.unwrap();
    assert_eq!(last.iter().map(|a| a.task.id).collect::<Vec<_>>(), ids[2..]);
    assert!(app.pick_many("slots", 5, 0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unstarted_release_is_as_if_never_picked_unless_a_heartbeat_said_it_ran() {
    let app = TestApp::spawn().await;
    let task = app.submit("echo once").await;

    // Confirmed by a heartbeat: released as started whatever the agent says, with its row.
    let picked = app.pick("a", 0).await.unwrap().expect("the task");
    app.heartbeat(task.id, picked.lease, 0).await.unwrap();
    let back = app.release_unstarted(task.id, picked.lease).await.unwrap();
    assert_eq!(back.status, TaskStatus::Queued);
    assert_eq!(app.attempts(task.id).await.unwrap().len(), 1, "a hand-back is recorded");

    // Never confirmed: queued again with no trace of the pick.
    let picked = app.pick("a", 0).await.unwrap().expect("the task again");
    let back = app.release_unstarted(task.id, picked.lease).await.unwrap();
    assert_eq!((back.status, back.attempts, back.agent), (TaskStatus::Queued, 0, None));
    assert_eq!(app.attempts(task.id).await.unwrap().len(), 1, "no row for an unstarted pick");
    // The lease is spent either way.
    assert!(app.release_unstarted(task.id, picked.lease).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn shutting_the_api_down_ends_parked_picks_with_204() {
    let app = TestApp::spawn().await;
    let pick = {
        let api = app.api.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let picked = api.pick("parked", 60).await;
            (picked, started.elapsed())
        })
    };
    app.until_parked(1).await;

    app.shutdown_handle().notify();

    let (picked, waited) = pick.await.unwrap();
    assert!(picked.unwrap().is_none(), "a 204, not a task");
    assert!(waited < Duration::from_secs(10), "ended by the shutdown, not the 60 s deadline");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finish_records_an_exit_code_or_an_error() {
    let app = TestApp::spawn().await;
    app.submit("echo ok").await;
    app.submit("kill -9 $$").await;
    let ran = app.pick("a", 0).await.unwrap().unwrap();
    let killed = app.pick("a", 0).await.unwrap().unwrap();

    app.upload(ran.task.id, ran.lease, Stream::Stdout, 0, false, b"ok\n").await.unwrap();
    let report = FinishReport {
        stdout: Some("ok\n".into()),
        stdout_bytes: Some(3),
        stderr_bytes: Some(0),
        ..FinishReport::exited(ran.lease, 0)
    };
    let finished = app.finish(ran.task.id, &report).await.unwrap();
    let failed = app
        .finish(killed.task.id, &FinishReport::failed(killed.lease, "killed by signal 9 (SIGKILL)"))
        .await
        .unwrap();

    assert_eq!(finished.status, TaskStatus::Finished);
    assert_eq!(finished.exit_code, Some(0));
    assert_eq!(finished.stdout.as_deref(), Some("ok\n"));
    assert_eq!(finished.agent.as_deref(), Some("a"));
    assert!(finished.finished_at.is_some());
    assert_eq!(failed.status, TaskStatus::Failed);
    assert_eq!(failed.error.as_deref(), Some("killed by signal 9 (SIGKILL)"));
    assert!(failed.exit_code.is_none());
    assert_eq!(app.get(ran.task.id).await.unwrap(), finished, "stored as answered");
    assert_eq!(app.get(killed.task.id).await.unwrap(), failed, "stored as answered");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finish_with_another_lease_is_409_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.submit("echo x").await;
    let picked = app.pick("a", 0).await.unwrap().unwrap();
    let id = picked.task.id;

    let refused = app.finish(id, &FinishReport::exited(LeaseToken::random(), 0)).await;

    let failure = refused.unwrap_err();
    failure.expect(409, "another attempt owns it");
    assert_eq!(failure.kind(), Some(ProblemType::LeaseNotCurrent));
    let stored = app.get(id).await.unwrap();
    assert_eq!(stored.status, TaskStatus::InProgress);
    assert!(stored.exit_code.is_none());
    // The holder of the lease can still finish it.
    app.finish(id, &FinishReport::exited(picked.lease, 0)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finish_of_a_task_not_in_progress_is_409() {
    let app = TestApp::spawn().await;
    let queued = app.submit("echo x").await;
    let cancelled = app.submit("echo y").await;
    app.abort(cancelled.id).await.unwrap();

    let on_queued = app.finish(queued.id, &FinishReport::exited(LeaseToken::random(), 0)).await;
    let on_cancelled =
        app.finish(cancelled.id, &FinishReport::exited(LeaseToken::random(), 0)).await;

    for (task, refused) in [(&queued, on_queued), (&cancelled, on_cancelled)] {
        let failure = refused.unwrap_err();
        let needle = format!("task {} is not running under this lease", task.id);
        failure.expect(409, &needle);
        assert_eq!(failure.kind(), Some(ProblemType::LeaseNotCurrent));
    }
    assert_eq!(app.get(queued.id).await.unwrap().status, TaskStatus::Queued);
    let cancelled = app.get(cancelled.id).await.unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert!(cancelled.exit_code.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_finish_answers_200_and_is_recorded_once() {
    let app = TestApp::spawn().await;
    app.submit("echo x").await;
    let picked = app.pick("a", 0).await.unwrap().unwrap();
    let id = picked.task.id;
    app.upload(id, picked.lease, Stream::Stdout, 0, false, b"x\n").await.unwrap();
    let report = FinishReport {
        stdout: Some("x\n".into()),
        stdout_bytes: Some(2),
        stderr_bytes: Some(0),
        ..FinishReport::exited(picked.lease, 0)
    };
    let first = app.finish(id, &report).await.unwrap();

    let again = app.finish(id, &report).await.unwrap();
    let different = app.finish(id, &FinishReport::exited(picked.lease, 1)).await;

    assert_eq!(again, first, "the same record, not a second write");
    let failure = different.unwrap_err();
    failure.expect(409, "different result");
    assert_eq!(failure.kind(), Some(ProblemType::ReportConflict));
    assert_eq!(app.get(id).await.unwrap().exit_code, Some(0), "the first report stands");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_finish_reports_are_refused_without_effect() {
    let app = TestApp::spawn().await;
    app.submit("echo x").await;
    let picked = app.pick("a", 0).await.unwrap().unwrap();
    let (id, lease) = (picked.task.id, picked.lease);
    let typed = [
        (FinishReport::exited(lease, 256), "between 0 and 255"),
        (FinishReport::exited(lease, -1), "between 0 and 255"),
        (FinishReport { exit_code: None, ..FinishReport::exited(lease, 0) }, "give `exit_code`"),
        (FinishReport { error: Some("both".into()), ..FinishReport::exited(lease, 0) }, "not both"),
        (FinishReport { stdout: Some("a\u{0}b".into()), ..FinishReport::exited(lease, 0) }, "NUL"),
    ];
    for (report, needle) in typed {
        let failure = app.finish(id, &report).await.unwrap_err();
        failure.expect(422, needle);
        assert_eq!(failure.kind(), Some(ProblemType::InvalidRequest));
    }
    // Bodies the protocol's types cannot even express.
    let raw = [
        (json!({"lease": "not-a-uuid", "exit_code": 0}), "UUID"),
        (json!({"exit_code": 0}), "lease"),
        (json!({"lease": lease, "exit_code": "0"}), "invalid type"),
    ];
    for (body, needle) in raw {
        let response =
            app.agent(Method::POST, &format!("/tasks/{id}/finish"), "a").json(&body).send().await;
        let problem = assert_problem(response.unwrap(), 422, needle).await;
        assert_eq!(problem["type"], ProblemType::InvalidRequest.uri(), "{body}");
    }

    let unknown = app.finish(TaskId::random(), &FinishReport::exited(lease, 0)).await;

    unknown.unwrap_err().expect(404, "no task");
    let stored = app.get(id).await.unwrap();
    assert_eq!(stored.status, TaskStatus::InProgress);
    assert!(stored.exit_code.is_none() && stored.error.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_root_names_the_service_and_health_checks_the_database() {
    let app = TestApp::spawn().await;

    let root: Value = app.get_json("/").await.unwrap();
    let health = app.health().await.unwrap();

    assert_eq!(root["service"], "taskexec-api");
    assert!(root["version"].is_string());
    assert_eq!(health["database"], "ok");
    assert_eq!(health["status"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_503_while_the_database_is_gone_and_recovers_by_itself() {
    let db = std::sync::Arc::new(TestDb::create().await);
    let proxy = PgProxy::start(&db).await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_on(db, move |figment| {
        figment.merge((taskexec_api::config::DATABASE_URL_KEY, url))
    })
    .await;
    proxy.cut();

    let started = Instant::now();
    let health = app.health().await.unwrap_err();
    let create = app.create(&NewTask::new("ls")).await.unwrap_err();
    let list = app.list("").await.unwrap_err();

    for failure in [health, create, list] {
        failure.expect(503, "database");
        assert_eq!(failure.kind(), Some(ProblemType::Unavailable));
    }
    assert!(started.elapsed() < Duration::from_secs(15), "503s come within seconds, not a hang");
    proxy.restore();
    // Nothing announces the recovery: poll /health as a load balancer would.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match app.health().await {
            Ok(health) if health["status"] == "ok" => break,
            answer => assert!(Instant::now() < deadline, "never recovered: {answer:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.submit("echo back").await.status, TaskStatus::Queued);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_refuses_to_start_without_an_agent_token() {
    let db = TestDb::create().await;

    let output = tokio::process::Command::new(taskexec_tests::binary("taskexec-api"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("SERVER_PORT", "0")
        .output()
        .await
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("AGENT_TOKEN is not set"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_server_ends_parked_picks_with_204_and_exits_0() {
    let db = TestDb::create().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = tokio::process::Command::new(taskexec_tests::binary("taskexec-api"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("AGENT_TOKEN", TOKEN)
        .env("SERVER_PORT", port.to_string())
        .env("LOG_LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let api = Api::new(&format!("http://127.0.0.1:{port}"), ADMIN_TOKEN, TOKEN);
    // The process announces nothing when it listens: try until it answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.request(Method::GET, "/health").send().await.is_err() {
        assert!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pick = tokio::spawn({
        let api = api.clone();
        async move { api.pick("parked", 60).await }
    });
    api.until_parked(1).await;

    // SAFETY: signals our own child.
    unsafe { libc::kill(server.id().unwrap() as i32, libc::SIGTERM) };

    let picked =
        tokio::time::timeout(Duration::from_secs(10), pick).await.expect("the pick ends promptly");
    assert!(picked.unwrap().unwrap().is_none(), "a 204, not a task");
    let exit = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("the server exits");
    assert!(exit.unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_submissions_are_each_stored_once_with_their_own_command() {
    let app = TestApp::spawn().await;

    let creates: Vec<_> = (0..200u32)
        .map(|n| {
            let api = app.api.clone();
            tokio::spawn(async move {
                let new =
                    NewTask { timeout_secs: Some(n + 1), ..NewTask::new(format!("echo {n}")) };
                (n, api.create(&new).await.unwrap())
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for create in creates {
        let (n, task) = create.await.unwrap();
        assert_eq!(task.command, format!("echo {n}"));
        assert_eq!(task.timeout_secs, n as i32 + 1);
        assert!(ids.insert(task.id), "{} handed out twice", task.id);
        assert_eq!(app.get(task.id).await.unwrap(), task, "stored as answered");
    }

    let page = app.list("limit=1000").await.unwrap();
    assert_eq!(page.tasks.len(), 200);
}
