//! The logs an operator reads: JSON lines on request (`LOG_FORMAT=json`) from the API and the
//! agent, a request id that ties a client's error to its log line, and no polling noise at
//! info.

use std::time::Duration;

use serde_json::Value;
use taskexec_protocol::Problem;
use taskexec_tests::{until, Api, ApiProcess, TestDb, WorkerProcess, ADMIN_TOKEN, TOKEN};

/// The log's lines as JSON objects; panics on a line that is not one.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(value.is_object(), "{line}");
            for field in ["time", "level", "target", "message"] {
                assert!(value[field].is_string(), "{field} in {line}");
            }
            value
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_lines_carry_the_request_id_the_response_and_its_problem_name() {
    let db = TestDb::create().await;
    let env = [("LOG_FORMAT", "json"), ("LOG_LEVEL", "info")];
    let api = ApiProcess::start_logged(&db.url, &env).await;
    let admin = Api::new(&api.url, ADMIN_TOKEN, TOKEN);
    let http = reqwest::Client::new();

    // A client's id is echoed, and is the id of its request's line.
    let response = http
        .post(format!("{}/tasks", api.url))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-Request-Id", "report-42")
        .json(&serde_json::json!({"command": "echo hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-request-id"], "report-42");
    let task: taskexec_protocol::Task = response.json().await.unwrap();

    // An id that is not a short token is replaced; the problem names the id the server used.
    let response = http
        .get(format!("{}/tasks/not-an-id", api.url))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-Request-Id", "two words")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let given = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(given.len() == 32 && given.bytes().all(|b| b.is_ascii_hexdigit()), "{given}");
    let problem: Problem = response.json().await.unwrap();
    assert_eq!(problem.instance, Some(format!("urn:taskexec:request:{given}")));

    // An agent's polling stays out of the info log; what it picked is in it.
    let picked = admin.pick("poller", 0).await.unwrap().expect("the task");
    assert_eq!(admin.pick("poller", 0).await.unwrap(), None);
    until(Duration::from_secs(10), "the lines are logged", || {
        let log = api.log();
        log.contains(&given) && log.contains("task picked")
    })
    .await;

    let lines = json_lines(&api.log());
    let request = lines.iter().find(|line| line["request_id"] == "report-42").expect("its line");
    assert_eq!(request["method"], "POST");
    assert_eq!(request["route"], "/tasks");
    assert_eq!(request["status"], 201);
    assert!(request["duration_ms"].is_number(), "{request}");
    let failed = lines.iter().find(|line| line["request_id"] == given.as_str()).unwrap();
    assert_eq!(
        (failed["status"].clone(), failed["route"].clone()),
        (400.into(), "/tasks/<id>".into())
    );
    let created =
        lines.iter().find(|line| line["message"] == r#"task created by "admin""#).unwrap();
    assert_eq!(created["task"], task.id.to_string());
    let line =
        lines.iter().find(|line| line["message"] == r#"task picked by "poller" (attempt 1)"#);
    assert_eq!(line.unwrap()["task"], picked.task.id.to_string());
    assert!(!lines.iter().any(|line| line["route"] == "/tasks/pick"), "a poll at info: {lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn text_lines_by_default_and_an_unknown_format_stops_the_start() {
    let db = TestDb::create().await;
    let api = ApiProcess::start_logged(&db.url, &[("LOG_LEVEL", "info")]).await;
    let response = reqwest::Client::new()
        .get(format!("{}/tasks", api.url))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-Request-Id", "plain-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    until(Duration::from_secs(10), "the line is logged", || api.log().contains("plain-1")).await;
    let log = api.log();
    let line = log.lines().find(|line| line.contains("plain-1")).unwrap();
    assert!(line.contains("INFO") && line.contains("GET /tasks 200"), "{line}");
    assert!(line.ends_with("request_id=plain-1"), "{line}");

    let refused = std::process::Command::new(taskexec_tests::binary("taskexec-api"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("AGENT_TOKEN", TOKEN)
        .env("SERVER_PORT", "0")
        .env("LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("log_format"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_agent_line_is_json_and_names_its_agent() {
    let db = TestDb::create().await;
    let api = ApiProcess::start(&db.url, &[]).await;
    let mut worker = WorkerProcess::start_with_url(
        &api.url,
        "loggy",
        &[("LOG_FORMAT", "json"), ("LOG_LEVEL", "info")],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !worker.log().contains("taking tasks") {
        assert!(tokio::time::Instant::now() < deadline, "{}", worker.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.signal(libc::SIGTERM);
    worker.wait(Duration::from_secs(10)).await.expect("it stops");
    let lines = json_lines(&worker.log());
    assert!(lines.len() >= 2, "{lines:?}");
    for line in &lines {
        assert_eq!(line["agent"], "loggy", "{line}");
    }
}
