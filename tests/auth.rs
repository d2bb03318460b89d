//! Who may do what: every endpoint against every kind of credential, from one table; tasks
//! that belong to their owners; the quota; revocation across API processes; no secret where it
//! could leak.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use taskexec_protocol::{
    FinishReport, LeaseToken, NewTask, NewToken, ProblemType, Role, TaskStatus,
};
use taskexec_tests::{
    binary, Aborted, Api, ApiProcess, TestApp, WorkerProcess, ADMIN_TOKEN, TOKEN,
};
use tokio::time::Instant;

/// A credential a request is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Nobody,
    Malformed,
    Unknown,
    Revoked,
    Expired,
    SharedAdmin,
    Admin,
    Submitter,
    Reader,
    SharedAgent,
    Agent,
}

const EVERYONE: [Who; 11] = [
    Who::Nobody,
    Who::Malformed,
    Who::Unknown,
    Who::Revoked,
    Who::Expired,
    Who::SharedAdmin,
    Who::Admin,
    Who::Submitter,
    Who::Reader,
    Who::SharedAgent,
    Who::Agent,
];

/// The `Authorization` header of each credential.
struct Credentials {
    admin: String,
    submitter: String,
    reader: String,
    agent: String,
    revoked: String,
    expired: String,
}

impl Credentials {
    async fn make(app: &TestApp) -> Credentials {
        let revoked = app.create_token(&token("gone", Role::Submitter)).await.unwrap();
        app.revoke_token(revoked.id).await.unwrap();
        let expired = app.create_token(&token("late", Role::Admin)).await.unwrap();
        // Expired by the clock, without waiting for it (and before it was ever verified).
        let pool = app.db.pool().await;
        sqlx::query(
            "UPDATE tokens SET created_at = now() - interval '2 hours',
                               expires_at = now() - interval '1 hour' WHERE id = $1",
        )
        .bind(expired.id.as_uuid())
        .execute(&pool)
        .await
        .unwrap();
        Credentials {
            admin: app.token("an-admin", Role::Admin).await,
            submitter: app.token("a-submitter", Role::Submitter).await,
            reader: app.token("a-reader", Role::Reader).await,
            agent: app.token("an-agent", Role::Agent).await,
            revoked: revoked.token,
            expired: expired.token,
        }
    }

    fn header(&self, who: Who) -> Option<String> {
        let bearer = |token: &str| Some(format!("Bearer {token}"));
        match who {
            Who::Nobody => None,
            Who::Malformed => Some(format!("Basic {ADMIN_TOKEN}")),
            Who::Unknown => bearer("tex_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            Who::Revoked => bearer(&self.revoked),
            Who::Expired => bearer(&self.expired),
            Who::SharedAdmin => bearer(ADMIN_TOKEN),
            Who::Admin => bearer(&self.admin),
            Who::Submitter => bearer(&self.submitter),
            Who::Reader => bearer(&self.reader),
            Who::SharedAgent => bearer(TOKEN),
            Who::Agent => bearer(&self.agent),
        }
    }
}

fn token(name: &str, role: Role) -> NewToken {
    NewToken { name: name.into(), role, expires_in_secs: None, agent_name: None }
}

/// One endpoint: how to call it (on fresh state made by the admin), and what each kind of
/// valid caller gets. Every credential that is not valid gets 401, on every endpoint but the
/// public ones.
struct Endpoint {
    name: &'static str,
    public: bool,
    /// The answer to [admin, submitter, reader, agent]. The tasks are the admin's, so a
    /// submitter that may read tasks gets 404 for them, not 403.
    answers: [u16; 4],
}

const ENDPOINTS: [Endpoint; 22] = [
    Endpoint { name: "GET /", public: true, answers: [200, 200, 200, 200] },
    Endpoint { name: "GET /health", public: true, answers: [200, 200, 200, 200] },
    Endpoint { name: "GET /openapi.json", public: true, answers: [200, 200, 200, 200] },
    Endpoint { name: "GET /docs", public: true, answers: [200, 200, 200, 200] },
    Endpoint { name: "POST /tasks", public: false, answers: [201, 201, 403, 403] },
    Endpoint { name: "GET /tasks", public: false, answers: [200, 200, 200, 403] },
    Endpoint { name: "GET /tasks/<id>", public: false, answers: [200, 404, 200, 403] },
    Endpoint { name: "GET /tasks/<id>/output", public: false, answers: [200, 404, 200, 403] },
    Endpoint { name: "GET /tasks/<id>/log", public: false, answers: [200, 404, 200, 403] },
    Endpoint { name: "GET /tasks/<id>/attempts", public: false, answers: [200, 404, 200, 403] },
    Endpoint { name: "POST /tasks/<id>/abort", public: false, answers: [200, 404, 403, 403] },
    Endpoint { name: "GET /tasks/pick", public: false, answers: [200, 403, 403, 200] },
    Endpoint { name: "POST /tasks/<id>/heartbeat", public: false, answers: [409, 403, 403, 409] },
    Endpoint { name: "POST /tasks/<id>/output", public: false, answers: [409, 403, 403, 409] },
    Endpoint { name: "POST /tasks/<id>/finish", public: false, answers: [409, 403, 403, 409] },
    Endpoint { name: "POST /tasks/<id>/release", public: false, answers: [409, 403, 403, 409] },
    Endpoint { name: "POST /tokens", public: false, answers: [201, 403, 403, 403] },
    Endpoint { name: "GET /tokens", public: false, answers: [200, 403, 403, 403] },
    Endpoint { name: "DELETE /tokens/<id>", public: false, answers: [204, 403, 403, 403] },
    Endpoint { name: "GET /metrics", public: false, answers: [200, 403, 200, 403] },
    Endpoint { name: "GET /agents", public: false, answers: [200, 403, 200, 403] },
    Endpoint { name: "POST /agents/leave", public: false, answers: [204, 403, 403, 204] },
];

/// A request to `endpoint` on fresh state: a new queued task of the admin's (the only queued
/// one, for a pick), a new token to revoke.
async fn call(app: &TestApp, endpoint: &str, authorization: Option<&str>) -> u16 {
    let pool = app.db.pool().await;
    sqlx::query(
        "UPDATE tasks SET status = 'cancelled', finished_at = now() WHERE status = 'queued'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let task = app.submit("true").await.id;
    let stale = json!({ "lease": LeaseToken::random() });
    let (method, path, body): (Method, String, Option<Value>) = match endpoint {
        "GET /" => (Method::GET, "/".into(), None),
        "GET /health" => (Method::GET, "/health".into(), None),
        "GET /openapi.json" => (Method::GET, "/openapi.json".into(), None),
        "GET /docs" => (Method::GET, "/docs/".into(), None),
        "POST /tasks" => (Method::POST, "/tasks".into(), Some(json!({"command": "true"}))),
        "GET /tasks" => (Method::GET, "/tasks".into(), None),
        "GET /tasks/<id>" => (Method::GET, format!("/tasks/{task}"), None),
        "GET /tasks/<id>/output" => (Method::GET, format!("/tasks/{task}/output"), None),
        "GET /tasks/<id>/log" => (Method::GET, format!("/tasks/{task}/log"), None),
        "GET /tasks/<id>/attempts" => (Method::GET, format!("/tasks/{task}/attempts"), None),
        "POST /tasks/<id>/abort" => (Method::POST, format!("/tasks/{task}/abort"), None),
        "GET /tasks/pick" => (Method::GET, "/tasks/pick?wait=0".into(), None),
        "POST /tasks/<id>/heartbeat" => {
            (Method::POST, format!("/tasks/{task}/heartbeat"), Some(stale))
        }
        "POST /tasks/<id>/output" => {
            (Method::POST, format!("/tasks/{task}/output?stream=stdout&offset=0"), None)
        }
        "POST /tasks/<id>/finish" => {
            let report = serde_json::to_value(FinishReport::exited(LeaseToken::random(), 0));
            (Method::POST, format!("/tasks/{task}/finish"), Some(report.unwrap()))
        }
        "POST /tasks/<id>/release" => (Method::POST, format!("/tasks/{task}/release"), Some(stale)),
        "POST /tokens" => {
            (Method::POST, "/tokens".into(), Some(json!({"name": "new", "role": "reader"})))
        }
        "GET /tokens" => (Method::GET, "/tokens".into(), None),
        "GET /metrics" => (Method::GET, "/metrics".into(), None),
        "GET /agents" => (Method::GET, "/agents".into(), None),
        "POST /agents/leave" => (Method::POST, "/agents/leave".into(), None),
        "DELETE /tokens/<id>" => {
            let doomed = app.create_token(&token("doomed", Role::Reader)).await.unwrap();
            (Method::DELETE, format!("/tokens/{}", doomed.id), None)
        }
        other => panic!("no request for {other}"),
    };
    let mut request = app.anonymous(method, &path).header("X-Agent-Name", "tester");
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    request = match (endpoint, body) {
        ("POST /tasks/<id>/output", _) => request
            .header("X-Lease", LeaseToken::random().to_string())
            .header("Content-Type", "application/octet-stream")
            .body("x"),
        (_, Some(body)) => request.json(&body),
        (_, None) => request,
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    if status >= 400 {
        let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert_eq!(kind, "application/problem+json", "{endpoint}: {status}");
        if status == 401 {
            // The challenge comes with every 401.
            assert!(response.headers().contains_key("www-authenticate"), "{endpoint}");
        }
    }
    status
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_answers_every_credential_as_the_table_says() {
    let app = TestApp::spawn().await;
    let credentials = Credentials::make(&app).await;
    let mut wrong = Vec::new();

    for endpoint in &ENDPOINTS {
        for who in EVERYONE {
            let expected = match who {
                _ if endpoint.public => 200,
                Who::Nobody | Who::Malformed | Who::Unknown | Who::Revoked | Who::Expired => 401,
                Who::SharedAdmin | Who::Admin => endpoint.answers[0],
                Who::Submitter => endpoint.answers[1],
                Who::Reader => endpoint.answers[2],
                Who::SharedAgent | Who::Agent => endpoint.answers[3],
            };
            let got = call(&app, endpoint.name, credentials.header(who).as_deref()).await;
            if got != expected {
                wrong.push(format!("{} as {who:?}: {got}, expected {expected}", endpoint.name));
            }
        }
    }

    assert!(wrong.is_empty(), "{} answers off the table:\n{}", wrong.len(), wrong.join("\n"));
}

/// The roles the OpenAPI document names for each operation are the roles the table lets in
/// (every answer but 403), and the public endpoints take no token there either.
#[test]
fn the_documents_roles_are_the_tables() {
    let document: Value = serde_json::from_str(taskexec_api::openapi::json()).unwrap();
    // Every operation of the document is in the table, so that none escapes both checks.
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let name =
                format!("{} {}", method.to_uppercase(), path.replace('{', "<").replace('}', ">"));
            assert!(ENDPOINTS.iter().any(|e| e.name == name), "{name} is not in the table");
        }
    }
    let roles = [Role::Admin, Role::Submitter, Role::Reader, Role::Agent];
    for endpoint in &ENDPOINTS {
        let (method, path) = endpoint.name.split_once(' ').unwrap();
        let path = path.replace('<', "{").replace('>', "}");
        if path == "/docs" {
            continue; // Swagger UI's pages, not an operation of the API.
        }
        let operation = &document["paths"][&path][method.to_lowercase()];
        assert!(operation.is_object(), "{} is not in the document", endpoint.name);
        let named: Option<Vec<&str>> = operation["security"].as_array().map(|requirements| {
            requirements
                .iter()
                .flat_map(|r| r["bearer"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .collect()
        });
        let allowed: Vec<&str> = roles
            .iter()
            .zip(endpoint.answers)
            .filter(|(_, answer)| *answer != 403)
            .map(|(role, _)| role.as_str())
            .collect();
        match named {
            None => assert!(endpoint.public, "{} names no roles", endpoint.name),
            Some(mut named) => {
                assert!(!endpoint.public, "{} is public but names roles", endpoint.name);
                named.sort_unstable();
                let mut allowed = allowed;
                allowed.sort_unstable();
                assert_eq!(named, allowed, "{}: the document's roles", endpoint.name);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn submitters_see_and_touch_only_their_own_tasks_and_readers_read_all_and_abort_none() {
    let app = TestApp::spawn().await;
    let alice = app.as_user(&app.token("alice", Role::Submitter).await);
    let bob = app.as_user(&app.token("bob", Role::Submitter).await);
    let reader = app.as_user(&app.token("auditor", Role::Reader).await);
    let hers = alice.submit("echo hers").await;
    let his = bob.submit("echo his").await;

    // Bob cannot find Alice's task by id or through the list.
    assert_eq!(bob.get(hers.id).await.unwrap_err().status, 404);
    assert_eq!(bob.wait(hers.id, 0).await.unwrap_err().status, 404);
    let output = bob.output(hers.id, taskexec_protocol::Stream::Stdout, 0, 0).await;
    assert_eq!(output.unwrap_err().status, 404);
    assert_eq!(bob.log(hers.id, true).await.unwrap_err().status, 404);
    assert_eq!(bob.abort(hers.id).await.unwrap_err().status, 404);
    let bobs: Vec<_> = bob.list("").await.unwrap().tasks.into_iter().map(|t| t.id).collect();
    assert_eq!(bobs, [his.id]);
    assert!(bob.list("owner=alice").await.unwrap().tasks.is_empty());
    // Alice's own: all of it, and her abort is recorded as hers.
    assert_eq!(alice.get(hers.id).await.unwrap().owner.as_deref(), Some("alice"));
    assert_eq!(reader.abort(hers.id).await.unwrap_err().status, 403);
    let Aborted::Cancelled(cancelled) = alice.abort(hers.id).await.unwrap() else {
        panic!("a queued task is cancelled at once")
    };
    assert_eq!(cancelled.aborted_by.as_deref(), Some("alice"));
    // The reader reads both, and may filter by owner; the admin too.
    assert_eq!(reader.get(his.id).await.unwrap().owner.as_deref(), Some("bob"));
    assert_eq!(reader.list("").await.unwrap().tasks.len(), 2);
    let alices = reader.list("owner=alice").await.unwrap().tasks;
    assert_eq!(alices.iter().map(|t| t.id).collect::<Vec<_>>(), [hers.id]);
    assert_eq!(app.list("owner=bob").await.unwrap().tasks[0].id, his.id);
    assert_eq!(reader.abort(his.id).await.unwrap_err().status, 403);
    assert_eq!(app.get(his.id).await.unwrap().status, TaskStatus::Queued, "refused: unchanged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submission_over_the_owners_quota_is_429_and_inserts_nothing() {
    let app = TestApp::spawn_with(|f| f.merge(("max_queued_per_owner", 3))).await;
    let alice = app.as_user(&app.token("alice", Role::Submitter).await);
    let bob = app.as_user(&app.token("bob", Role::Submitter).await);
    for n in 0..3 {
        alice.submit(&format!("echo {n}")).await;
    }

    let over = alice.request(Method::POST, "/tasks").json(&NewTask::new("echo 3")).send().await;
    let over = over.unwrap();

    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(over.headers().contains_key("retry-after"), "a 429 says when to retry");
    let problem: Value = over.json().await.unwrap();
    assert_eq!(problem["type"], ProblemType::QuotaExceeded.uri());
    assert_eq!(alice.list("").await.unwrap().tasks.len(), 3, "nothing was inserted");
    bob.submit("echo another owner").await;
    // A task that leaves the queue makes room again.
    app.pick("agent", 0).await.unwrap().expect("a queued task");
    alice.submit("echo 3").await;
    assert_eq!(alice.create(&NewTask::new("echo 4")).await.unwrap_err().status, 429);
}

/// Concurrent submissions of one owner reach the intake together and are checked as one batch:
/// the quota admits exactly as many as fit, not all or none, and never more.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_submissions_fill_the_quota_exactly() {
    let app = TestApp::spawn_with(|f| f.merge(("max_queued_per_owner", 10))).await;
    let alice = app.as_user(&app.token("alice", Role::Submitter).await);
    alice.submit("echo first").await;

    let mut submissions = tokio::task::JoinSet::new();
    for n in 0..40 {
        let alice = alice.clone();
        submissions.spawn(async move { alice.create(&NewTask::new(format!("echo {n}"))).await });
    }
    let (mut accepted, mut refused) = (0, 0);
    while let Some(answer) = submissions.join_next().await {
        match answer.unwrap() {
            Ok(_) => accepted += 1,
            Err(failure) if failure.status == 429 => refused += 1,
            Err(other) => panic!("{other}"),
        }
    }

    assert_eq!((accepted, refused), (9, 31));
    assert_eq!(alice.list("").await.unwrap().tasks.len(), 10);
}

/// Keyed submits go around the batched intake, but not around the quota: they count the room
/// this very process was granted (and may fill without counting) as taken, so that plain and
/// keyed submits of one owner, interleaved, never pass it together.
#[tokio::test(flavor = "multi_thread")]
async fn keyed_and_plain_submits_share_one_quota() {
    let app = TestApp::spawn_with(|f| f.merge(("max_queued_per_owner", 10))).await;
    let alice = app.as_user(&app.token("alice", Role::Submitter).await);

    let mut accepted = 0;
    for n in 0..30 {
        let task = NewTask::new(format!("echo {n}"));
        let answer = match n % 2 {
            0 => alice.create(&task).await.map(|_| ()),
            _ => alice.create_keyed(&task, &format!("key-{n}")).await.map(|_| ()),
        };
        match answer {
            Ok(()) => accepted += 1,
            Err(failure) => assert_eq!(failure.status, 429, "{failure}"),
        }
    }

    let queued = alice.list("limit=100").await.unwrap().tasks.len();
    assert_eq!(accepted, queued, "every 201 is a queued task");
    assert!(queued <= 10, "{queued} queued, over the quota of 10");
    assert!(queued >= 5, "only {queued} taken");
}

/// Three API processes share one owner's quota: each fills only the room the database granted
/// it, which the others take as filled, so that together they never pass it, whether the
/// submissions take turns between them or come at once. (Two would stay within it even if
/// each ignored the others' grants: each grant is at most half of the room.)
#[tokio::test(flavor = "multi_thread")]
async fn the_quota_holds_across_api_processes() {
    let quota = |f: rocket::figment::Figment| f.merge(("max_queued_per_owner", 10));
    let app = TestApp::spawn_with(quota).await;
    let peers = [
        TestApp::spawn_on(app.db.clone(), quota).await,
        TestApp::spawn_on(app.db.clone(), quota).await,
    ];
    let processes = [&*app, &*peers[0], &*peers[1]];

    for owner in ["in-turns", "at-once"] {
        let secret = app.token(owner, Role::Submitter).await;
        let submit = |n: usize| {
            let api = processes[n % 3].as_user(&secret);
            async move { api.create(&NewTask::new(format!("echo {n}"))).await }
        };
        let answers = if owner == "in-turns" {
            let mut answers = Vec::new();
            for n in 0..60 {
                answers.push(submit(n).await);
            }
            answers
        } else {
            let mut submissions = tokio::task::JoinSet::new();
            for n in 0..60 {
                submissions.spawn(submit(n));
            }
            submissions.join_all().await
        };
        let mut accepted = 0;
        for answer in answers {
            match answer {
                Ok(_) => accepted += 1,
                Err(failure) => assert_eq!(failure.status, 429, "{failure}"),
            }
        }
        let queued = app.list(&format!("owner={owner}&limit=100")).await.unwrap().tasks.len();
        assert!(queued <= 10, "{owner}: {queued} queued, over the quota of 10");
        assert_eq!(accepted, queued, "{owner}: every 201 is a queued task");
        assert!(accepted >= 5, "{owner}: only {accepted} taken");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_revoked_on_one_api_process_is_refused_by_another_within_5_s() {
    let app = TestApp::spawn().await;
    let peer = app.spawn_peer().await;
    let created = app.create_token(&token("short-lived", Role::Reader)).await.unwrap();
    let on_peer = peer.as_user(&created.token);
    let cached = Instant::now();
    on_peer.list("").await.expect("the peer takes the token (and caches it)");

    app.revoke_token(created.id).await.unwrap();
    let revoked = Instant::now();
    refused_soon(&on_peer).await;

    println!("FIGURE revocation seen by another API process after {:?}", revoked.elapsed());
    // The peer cached the token after `cached`: without the notice it would have taken it
    // until its cache entry expired, 4 s on.
    assert!(cached.elapsed() < CACHE_TTL, "refused only once the cache expired: no notice");
    let listed = app.tokens().await.unwrap();
    let info = listed.iter().find(|t| t.id == created.id).unwrap();
    assert!(info.revoked_at.is_some() && info.last_used_at.is_some(), "{info:?}");
}

/// How long an API process takes a verified token at its word (`auth::verifier::TTL`).
const CACHE_TTL: Duration = Duration::from_secs(4);

/// Waits until `api` refuses its token, for at most 5 s (the bound on a revocation).
async fn refused_soon(api: &Api) {
    let since = Instant::now();
    loop {
        match api.list("").await {
            Err(failure) if failure.status == 401 => return,
            Ok(_) => assert!(since.elapsed() < Duration::from_secs(5), "still taken after 5 s"),
            Err(other) => panic!("{other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_expires_while_cached_is_refused() {
    let app = TestApp::spawn().await;
    let new = NewToken { expires_in_secs: Some(1), ..token("brief", Role::Reader) };
    let created = app.create_token(&new).await.unwrap();
    let reader = app.as_user(&created.token);
    reader.list("").await.expect("taken while current (and cached)");

    let expires_at = created.expires_at.expect("an expiry");
    let left = (expires_at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(50)).await;

    assert_eq!(reader.list("").await.unwrap_err().status, 401, "expired, though cached");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_followed_log_ends_when_its_token_is_revoked() {
    let app = TestApp::spawn().await;
    let created = app.create_token(&token("follower", Role::Submitter)).await.unwrap();
    let follower = app.as_user(&created.token);
    let task = follower.submit("echo never picked").await;
    let follow = follower.request(Method::GET, &format!("/tasks/{}/log?follow=true", task.id));
    let response = follow.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    app.revoke_token(created.id).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(15), response.text()).await;

    let body = body.expect("the stream ended").unwrap();
    assert!(body.contains("the token was revoked or has expired"), "{body:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_followed_log_of_a_busy_task_ends_when_its_token_is_revoked() {
    // Output every 100 ms: the follower never waits long on its timer, and must still check
    // its token again.
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "busy", &[]);
    let created = app.create_token(&token("busy-follower", Role::Submitter)).await.unwrap();
    let follower = app.as_user(&created.token);
    let task = follower.submit("while true; do echo tick; sleep 0.1; done").await;
    let follow = follower.request(Method::GET, &format!("/tasks/{}/log?follow=true", task.id));
    let response = follow.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    app.revoke_token(created.id).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(15), response.text()).await;

    let body = body.expect("the stream ended while the task runs").unwrap();
    assert!(body.contains("the token was revoked or has expired"), "{body:?}");
    app.abort(task.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_token_bound_to_a_name_takes_no_other_name() {
    let app = TestApp::spawn().await;
    let bound = NewToken { agent_name: Some("runner-1".into()), ..token("runner", Role::Agent) };
    let secret = app.create_token(&bound).await.unwrap().token;
    let agent = app.as_agent(&secret);
    app.submit("true").await;

    let impostor = agent.pick("runner-2", 0).await.unwrap_err();
    let itself = agent.pick("runner-1", 0).await.unwrap();

    assert_eq!(impostor.status, 403);
    assert!(impostor.problem.detail.contains("runner-1"), "{}", impostor.problem.detail);
    assert!(itself.is_some(), "the bound name picks");
    let reader_bound = NewToken { agent_name: Some("x".into()), ..token("r", Role::Reader) };
    assert_eq!(app.create_token(&reader_bound).await.unwrap_err().status, 422);
    let spaced = NewToken { agent_name: Some(" runner-1".into()), ..token("a", Role::Agent) };
    assert_eq!(app.create_token(&spaced).await.unwrap_err().status, 422, "never presentable");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_line_creates_lists_and_revokes_tokens_on_the_servers_database() {
    let app = TestApp::spawn().await;
    let cli = |args: &[&str]| {
        std::process::Command::new(binary("taskexec-api"))
            .arg("token")
            .args(args)
            .env_clear()
            .env("DATABASE_URL", &app.db.url)
            .env("LOG_LEVEL", "trace")
            .output()
            .unwrap()
    };

    let created = cli(&["create", "--name", "ci", "--role", "submitter", "--expires", "90d"]);
    let secret = String::from_utf8(created.stdout).unwrap();
    let secret = secret.trim_end();
    let submitter = app.as_user(secret);
    let task = submitter.submit("echo from ci").await;
    let listed = cli(&["list"]);
    let listing = String::from_utf8(listed.stdout).unwrap();
    let id = app.tokens().await.unwrap().into_iter().find(|t| t.name == "ci").unwrap().id;
    let revoked = cli(&["revoke", &id.to_string()]);

    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    assert!(secret.starts_with("tex_") && !secret.contains('\n'), "the secret alone: {secret:?}");
    assert_eq!(task.owner.as_deref(), Some("ci"));
    assert!(listing.contains(&id.to_string()) && listing.contains("submitter"), "{listing}");
    assert!(!listing.contains(secret), "a list never shows a secret");
    assert!(revoked.status.success());
    refused_soon(&submitter).await;
    for output in [&created.stderr, &listed.stderr, &revoked.stderr] {
        assert!(!String::from_utf8_lossy(output).contains(secret), "no secret in a log");
    }
    let bad = cli(&["create", "--name", "x", "--role", "owner"]);
    assert_eq!(bad.status.code(), Some(2), "clap refuses an unknown role");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_the_database_a_log_line_or_a_command() {
    let db = taskexec_tests::TestDb::create().await;
    let api = ApiProcess::start_logged(&db.url, &[("LOG_LEVEL", "trace")]).await;
    let admin = Api::new(&api.url, ADMIN_TOKEN, TOKEN);
    let submitter = admin.token("alice", Role::Submitter).await;
    let agent_token = admin.token("runner", Role::Agent).await;
    let alice = admin.as_user(&submitter);
    let mut worker = WorkerProcess::start_with_url(
        &api.url,
        "runner",
        &[("AGENT_TOKEN", agent_token.as_str()), ("ADMIN_TOKEN", ADMIN_TOKEN)],
    );

    let task = alice.submit("env; echo done").await;
    let task = alice.until_done(task.id).await;
    let id = admin.tokens().await.unwrap().into_iter().find(|t| t.name == "alice").unwrap().id;
    admin.revoke_token(id).await.unwrap();
    assert_eq!(alice.list("").await.unwrap_err().status, 401);
    worker.signal(libc::SIGTERM);
    worker.wait(Duration::from_secs(10)).await;

    let secrets = [submitter.as_str(), agent_token.as_str(), ADMIN_TOKEN, TOKEN];
    let env = task.stdout.unwrap();
    assert!(env.contains("done"), "{env}");
    let pool = db.pool().await;
    let stored: Vec<String> = sqlx::query_scalar("SELECT row_to_json(t)::text FROM tokens t")
        .fetch_all(&pool)
        .await
        .unwrap();
    let logs = format!("{}\n{}", api.log(), worker.log());
    for secret in secrets {
        assert!(!env.contains(secret), "a command saw a token");
        assert!(!stored.iter().any(|row| row.contains(secret)), "a secret in the database");
        assert!(!logs.contains(secret), "a secret in a log line");
    }
    assert!(
        logs.contains("revoked"),
        "the trace log was captured: {}",
        &logs[..logs.len().min(500)]
    );
}
