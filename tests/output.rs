//! Live output: streamed while the command runs, read by offset, followed, capped.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use taskexec_tests::{assert_problem, TestApp, WorkerProcess};
use tokio::time::Instant;

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers()[name].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn output_is_readable_while_the_task_runs() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "streamer", &[]);
    let task = app.create("for i in 1 2 3 4; do echo line $i; sleep 1; done").await;
    let id = task["id"].as_str().unwrap();

    let response = app
        .request(Method::GET, &format!("/tasks/{id}/output?stream=stdout&offset=0&wait=10"))
        .send()
        .await
        .unwrap();
    let status_then = app.task(id).await["status"].clone();

    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "taskexec-ended"), "false");
    let next: usize = header(&response, "taskexec-next-offset").parse().unwrap();
    let body = response.bytes().await.unwrap();
    assert!(body.starts_with(b"line 1\n"), "{:?}", String::from_utf8_lossy(&body));
    assert_eq!(next, body.len());
    assert_eq!(status_then, "in_progress", "the first line was readable before the task ended");
    let done = app.until_done(id).await;
    assert_eq!(done["stdout"], "line 1\nline 2\nline 3\nline 4\n");
    assert_eq!(done["stdout_bytes"], 28);
}

#[tokio::test(flavor = "multi_thread")]
async fn following_the_log_returns_both_streams_in_order_and_ends_with_the_task() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "follower", &[]);
    // Well within one upload tick (250 ms): the order must come from the agent's reads, not
    // from when it uploads.
    let task = app
        .create("echo a; sleep 0.05; echo b >&2; sleep 0.05; echo c; sleep 0.05; echo d >&2; sleep 0.05; echo e")
        .await;
    let id = task["id"].as_str().unwrap();

    let response =
        app.request(Method::GET, &format!("/tasks/{id}/log?follow=true")).send().await.unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "text/plain");
    let log =
        tokio::time::timeout(Duration::from_secs(30), response.text()).await.expect("the log ends");
    assert_eq!(log.unwrap(), "a\nb\nc\nd\ne\n");
    assert_eq!(app.task(id).await["status"], "finished", "it ended with the task");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_without_follow_is_what_there_is_so_far() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "plain", &[]);
    let task = app.create("echo out; echo err >&2").await;
    let id = task["id"].as_str().unwrap();
    app.until_done(id).await;

    let log = app.request(Method::GET, &format!("/tasks/{id}/log")).send().await.unwrap();

    let log = log.text().await.unwrap();
    // Written a microsecond apart to two pipes, read by two threads: either order is honest
    // (the follow test checks the order of writes that are apart).
    assert!(log == "out\nerr\n" || log == "err\nout\n", "{log:?}");
    let unknown = app
        .request(Method::GET, &format!("/tasks/{}/log", uuid::Uuid::new_v4()))
        .send()
        .await
        .unwrap();
    assert_problem(unknown, 404, "no task").await;
}

async fn upload(
    app: &TestApp,
    id: &str,
    lease: &Value,
    stream: &str,
    offset: u64,
    data: &[u8],
) -> reqwest::Response {
    app.agent(
        Method::POST,
        &format!("/tasks/{id}/output?stream={stream}&offset={offset}"),
        "manual",
    )
    .header("X-Lease", lease.as_str().unwrap())
    .header("content-type", "application/octet-stream")
    .body(data.to_vec())
    .send()
    .await
    .unwrap()
}

async fn read_all(app: &TestApp, id: &str, stream: &str) -> Vec<u8> {
    let response = app
        .request(Method::GET, &format!("/tasks/{id}/output?stream={stream}&offset=0"))
        .send()
        .await
        .unwrap();
    response.bytes().await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_chunk_is_stored_once_and_a_gap_says_where_to_resend_from() {
    let app = TestApp::spawn().await;
    app.create("true").await;
    let picked = app.pick("manual", 0).await.unwrap();
    let (id, lease) = (picked["id"].as_str().unwrap(), &picked["lease"]);

    let first = upload(&app, id, lease, "stdout", 0, b"hello ").await;
    let retried = upload(&app, id, lease, "stdout", 0, b"hello ").await;
    let gap = upload(&app, id, lease, "stdout", 20, b"later").await;
    let next = upload(&app, id, lease, "stdout", 6, b"world").await;
    let overlapping = upload(&app, id, lease, "stdout", 6, b"world!").await;

    assert_eq!(first.json::<Value>().await.unwrap()["next_offset"], 6);
    assert_eq!(retried.json::<Value>().await.unwrap()["next_offset"], 6);
    let problem = assert_problem(gap, 409, "resend from offset 6").await;
    assert_eq!(problem["expected_offset"], 6);
    assert_eq!(next.json::<Value>().await.unwrap()["next_offset"], 11);
    assert_eq!(overlapping.json::<Value>().await.unwrap()["next_offset"], 12);
    assert_eq!(read_all(&app, id, "stdout").await, b"hello world!");
    assert_eq!(read_all(&app, id, "stderr").await, b"");
    assert_eq!(app.task(id).await["stdout_bytes"], 12);

    let stale = app
        .agent(Method::POST, &format!("/tasks/{id}/output?stream=stdout&offset=12"), "manual")
        .header("X-Lease", uuid::Uuid::new_v4().to_string())
        .body("x")
        .send()
        .await
        .unwrap();
    assert_problem(stale, 409, "not running under this lease").await;
    let no_lease = app
        .agent(Method::POST, &format!("/tasks/{id}/output?stream=stdout&offset=12"), "m")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_problem(no_lease, 400, "X-Lease").await;
    let too_big = upload(&app, id, lease, "stdout", 12, &vec![b'x'; 64 * 1024 + 1]).await;
    assert_problem(too_big, 413, "larger than").await;
    let bad_stream = upload(&app, id, lease, "stdlog", 0, b"x").await;
    assert_problem(bad_stream, 400, "stdout or stderr").await;
    for offset in ["-1", "9223372036854775807", "lots"] {
        let path = format!("/tasks/{id}/output?stream=stdout&offset={offset}&skip=true");
        let response = app
            .agent(Method::POST, &path, "manual")
            .header("X-Lease", lease.as_str().unwrap())
            .body("x")
            .send()
            .await
            .unwrap();
        assert_problem(response, 400, "`offset` must be").await;
        let read = app
            .request(Method::GET, &format!("/tasks/{id}/output?offset={offset}"))
            .send()
            .await
            .unwrap();
        assert_problem(read, 400, "`offset` must be").await;
    }

    // The finish states the lengths; it is refused until the uploads reach them.
    let short = app
        .finish(id, json!({"lease": lease, "exit_code": 0, "stdout_bytes": 20, "stderr_bytes": 0}))
        .await;
    let problem = assert_problem(short, 409, "upload the rest").await;
    assert_eq!(
        (problem["stdout_bytes"].clone(), problem["stderr_bytes"].clone()),
        (json!(12), json!(0))
    );
    let whole = app
        .finish(id, json!({"lease": lease, "exit_code": 0, "stdout": "hello world!", "stdout_bytes": 12, "stderr_bytes": 0}))
        .await;
    assert_eq!(whole.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_is_capped_with_head_marker_and_tail_intact() {
    let app = TestApp::spawn_with(|f| f.merge(("max_output_bytes", 65536))).await;
    let _worker = WorkerProcess::start(&app, "flooded", &[]);
    let task =
        app.create("yes | head -c 3000000; echo the end; yes no | head -c 1000000 >&2").await;
    let id = task["id"].as_str().unwrap();

    let task = app.until_done(id).await;

    assert_eq!(task["status"], "finished");
    assert_eq!(task["stdout_truncated"], true);
    assert_eq!(task["stdout_bytes"], 3000008);
    let stdout = task["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("y\ny\ny\n"), "head kept");
    assert!(stdout.ends_with("y\ny\nthe end\n"), "tail kept");
    assert!(stdout.contains("\n[taskexec: 2934472 bytes of output dropped here]\n"), "marker");
    assert!(stdout.len() < 65536 + 100);
    // The streamed copy follows the same rule: the first half, then a jump to the last half.
    let head =
        app.request(Method::GET, &format!("/tasks/{id}/output?offset=0")).send().await.unwrap();
    assert_eq!(header(&head, "taskexec-next-offset"), "32768");
    assert_eq!(head.bytes().await.unwrap().len(), 32768);
    let tail =
        app.request(Method::GET, &format!("/tasks/{id}/output?offset=32768")).send().await.unwrap();
    assert_eq!(header(&tail, "taskexec-dropped"), "2934472");
    assert_eq!(header(&tail, "taskexec-ended"), "true");
    let tail = tail.bytes().await.unwrap();
    assert_eq!(tail.len(), 32768);
    assert!(tail.ends_with(b"y\nthe end\n"));
    let log = app
        .request(Method::GET, &format!("/tasks/{id}/log"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        log.contains("\n[taskexec: 2934472 bytes of stdout dropped here]\n"),
        "the log marks the drop"
    );
    assert_eq!(task["stderr_truncated"], true);
    assert_eq!(task["stderr_bytes"], 1000000);
    let stderr = task["stderr"].as_str().unwrap();
    assert!(stderr.starts_with("no\nno\n"));
    assert!(stderr.contains("\n[taskexec: 934464 bytes of output dropped here]\n"), "stderr too");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binary_flood_fits_the_cap_as_text_and_counts_the_drop_in_bytes() {
    let app = TestApp::spawn_with(|f| f.merge(("max_output_bytes", 65536))).await;
    let _worker = WorkerProcess::start(&app, "random", &[]);
    let task = app.create("head -c 3000000 /dev/urandom").await;

    let task = app.until_done(task["id"].as_str().unwrap()).await;

    let stdout = task["stdout"].as_str().unwrap();
    assert!(stdout.len() <= 65536 + 100, "{} bytes of text", stdout.len());
    assert_eq!(task["stdout_lossy"], true);
    assert_eq!(task["stdout_truncated"], true);
    let marker = stdout.split("[taskexec: ").nth(1).expect("a marker");
    let dropped: u64 = marker.split(' ').next().unwrap().parse().unwrap();
    assert!(dropped > 2_900_000 && dropped < 3_000_000, "the drop counts raw bytes: {dropped}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_that_are_not_utf8_survive_the_stream_and_are_flagged_in_the_task() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "binary", &[]);
    let task = app.create(r"printf '\377\376abc\000z'").await;
    let id = task["id"].as_str().unwrap();

    let task = app.until_done(id).await;

    assert_eq!(read_all(&app, id, "stdout").await, b"\xff\xfeabc\x00z", "raw bytes, as printed");
    assert_eq!(task["stdout"], "\u{FFFD}\u{FFFD}abc\u{FFFD}z", "the task holds text");
    assert_eq!(task["stdout_lossy"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_on_a_task_returns_when_it_ends() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "waited", &[]);
    let task = app.create("sleep 1; echo done").await;
    let id = task["id"].as_str().unwrap();
    let started = Instant::now();

    let response = app.request(Method::GET, &format!("/tasks/{id}?wait=30")).send().await.unwrap();

    let task: Value = response.json().await.unwrap();
    assert_eq!(task["status"], "finished");
    assert_eq!(task["stdout"], "done\n");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered at the end, not at the deadline"
    );
    let bad = app.request(Method::GET, &format!("/tasks/{id}?wait=forever")).send().await.unwrap();
    assert_problem(bad, 400, "`wait`").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_leave_the_output_out() {
    let app = TestApp::spawn().await;
    app.create("echo x").await;

    let page: Value = app.get_json("/tasks").await;

    let task = page["tasks"][0].as_object().unwrap();
    assert!(!task.contains_key("stdout") && !task.contains_key("stderr"));
    assert!(task.contains_key("stdout_bytes") && task.contains_key("status"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_printing_forever_keeps_the_agent_small_and_the_server_unharmed() {
    let app = TestApp::spawn().await;
    let worker = WorkerProcess::start(&app, "yes", &[]);
    let task = app.create("timeout 30 yes; echo stopped").await;
    let id = task["id"].as_str().unwrap().to_owned();

    let mut largest_rss_kib = 0;
    loop {
        let status = std::fs::read_to_string(format!("/proc/{}/status", worker.pid())).unwrap();
        let rss: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
            .unwrap();
        largest_rss_kib = largest_rss_kib.max(rss);
        let health = app.request(Method::GET, "/health").send().await.unwrap();
        assert_eq!(health.status(), 200, "the API stays healthy");
        if app.task(&id).await["finished_at"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let task = app.task(&id).await;
    assert_eq!(task["status"], "finished");
    assert!(task["stdout"].as_str().unwrap().ends_with("y\nstopped\n"));
    assert!(largest_rss_kib < 64 * 1024, "agent RSS reached {largest_rss_kib} KiB");
    let pool = app.db.pool().await;
    let stored: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(length(data)), 0)::bigint FROM task_output WHERE task_id = $1::text::uuid",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    eprintln!(
        "FIGURE yes for 30 s: agent RSS peak {} KiB, {stored} bytes of output stored, {} produced",
        largest_rss_kib, task["stdout_bytes"]
    );
    assert!(stored <= (1 << 20) + 64 * 1024, "the database keeps the cap: {stored} bytes");
}
