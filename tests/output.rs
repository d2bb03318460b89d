//! Live output: streamed while the command runs, read by offset, followed, capped.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use taskexec_protocol::{
    output::headers, FinishReport, LeaseToken, Problem, ProblemType, Stream, TaskId, TaskStatus,
};
use taskexec_tests::{assert_problem, TestApp, WorkerProcess};
use tokio::time::Instant;

/// A raw request refused with `status`, its detail mentioning `needle`: the problem, typed.
async fn refused(response: reqwest::Response, status: u16, needle: &str) -> Problem {
    serde_json::from_value(assert_problem(response, status, needle).await).expect("a problem")
}

/// What one stream holds so far, from its start, without waiting.
async fn read_now(app: &TestApp, id: TaskId, stream: Stream) -> Vec<u8> {
    app.output(id, stream, 0, 0).await.unwrap().data
}

/// The whole log, followed until the task ends (at most 30 s).
async fn followed_log(app: &TestApp, id: TaskId) -> String {
    let log = tokio::time::timeout(Duration::from_secs(30), app.log(id, true))
        .await
        .expect("the followed log ends with the task")
        .unwrap();
    String::from_utf8(log).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn output_is_readable_while_the_task_runs() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "streamer", &[]);
    let task = app.submit("for i in 1 2 3 4; do echo line $i; sleep 1; done").await;

    let read = app.output(task.id, Stream::Stdout, 0, 10).await.unwrap();
    let status_then = app.get(task.id).await.unwrap().status;

    assert!(!read.ended, "the stream has not ended");
    assert!(read.data.starts_with(b"line 1\n"), "{:?}", String::from_utf8_lossy(&read.data));
    assert_eq!(read.next_offset, read.data.len() as u64);
    assert_eq!(
        status_then,
        TaskStatus::InProgress,
        "the first line was readable before the task ended"
    );
    let done = app.until_done(task.id).await;
    assert_eq!(done.stdout.as_deref(), Some("line 1\nline 2\nline 3\nline 4\n"));
    assert_eq!(done.stdout_bytes, 28);
}

#[tokio::test(flavor = "multi_thread")]
async fn following_the_log_returns_both_streams_in_order_and_ends_with_the_task() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "follower", &[]);
    // Well within one upload tick (250 ms): the order must come from the agent's reads, not
    // from when it uploads.
    let task = app
        .submit("echo a; sleep 0.05; echo b >&2; sleep 0.05; echo c; sleep 0.05; echo d >&2; sleep 0.05; echo e")
        .await;

    // Raw, for the response's content type; the body is read as the typed client would.
    let response = app
        .request(Method::GET, &format!("/tasks/{}/log?follow=true", task.id))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/plain");
    let log =
        tokio::time::timeout(Duration::from_secs(30), response.text()).await.expect("the log ends");
    assert_eq!(log.unwrap(), "a\nb\nc\nd\ne\n\n[taskexec: task finished, exit code 0]\n");
    assert_eq!(
        app.get(task.id).await.unwrap().status,
        TaskStatus::Finished,
        "it ended with the task"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_followed_log_ends_with_how_the_task_ended() {
    let app = TestApp::spawn().await;
    // Cancelled while queued, before any agent could pick it.
    let cancelled = app.submit("echo never").await;
    app.abort(cancelled.id).await.unwrap();
    let _worker = WorkerProcess::start(&app, "ending", &[]);
    let exited = app.submit("echo out; exit 3").await;
    let killed = app.submit("echo before; kill -KILL $$").await;

    let exited_log = followed_log(&app, exited.id).await;
    let killed_log = followed_log(&app, killed.id).await;
    let cancelled_log = followed_log(&app, cancelled.id).await;

    assert_eq!(exited_log, "out\n\n[taskexec: task finished, exit code 3]\n");
    assert_eq!(killed_log, "before\n\n[taskexec: task failed: killed by signal 9 (SIGKILL)]\n");
    assert_eq!(cancelled_log, "\n[taskexec: task cancelled]\n");
    // Without follow, the log is the output and nothing else, even once the task has ended.
    for (id, output) in [(exited.id, "out\n"), (killed.id, "before\n"), (cancelled.id, "")] {
        let plain = app.log(id, false).await.unwrap();
        assert_eq!(String::from_utf8(plain).unwrap(), output, "no ending line without follow");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_without_follow_is_what_there_is_so_far() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "plain", &[]);
    let task = app.submit("echo out; echo err >&2").await;
    app.until_done(task.id).await;

    let log = app.log(task.id, false).await.unwrap();
    let unknown = app.log(TaskId::random(), false).await.unwrap_err();

    let log = String::from_utf8(log).unwrap();
    // Written a microsecond apart to two pipes, read by two threads: either order is honest
    // (the follow test checks the order of writes that are apart).
    assert!(log == "out\nerr\n" || log == "err\nout\n", "{log:?}");
    unknown.expect(404, "no task");
    assert_eq!(unknown.kind(), Some(ProblemType::NotFound));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_chunk_is_stored_once_and_a_gap_says_where_to_resend_from() {
    let app = TestApp::spawn().await;
    app.submit("true").await;
    let picked = app.pick("manual", 0).await.unwrap().expect("the queued task");
    let (id, lease) = (picked.task.id, picked.lease);
    let stdout = Stream::Stdout;

    let first = app.upload(id, lease, stdout, 0, false, b"hello ").await.unwrap();
    let retried = app.upload(id, lease, stdout, 0, false, b"hello ").await.unwrap();
    let gap = app.upload(id, lease, stdout, 20, false, b"later").await.unwrap_err();
    let next = app.upload(id, lease, stdout, 6, false, b"world").await.unwrap();
    let overlapping = app.upload(id, lease, stdout, 6, false, b"world!").await.unwrap();

    assert_eq!(first.next_offset, 6);
    assert_eq!(retried.next_offset, 6);
    gap.expect(409, "resend from offset 6");
    assert_eq!(gap.kind(), Some(ProblemType::OffsetGap));
    assert_eq!(gap.problem.expected_offset, Some(6));
    assert_eq!(next.next_offset, 11);
    assert_eq!(overlapping.next_offset, 12);
    assert_eq!(read_now(&app, id, Stream::Stdout).await, b"hello world!");
    assert_eq!(read_now(&app, id, Stream::Stderr).await, b"");
    assert_eq!(app.get(id).await.unwrap().stdout_bytes, 12);

    let stale = app.upload(id, LeaseToken::random(), stdout, 12, false, b"x").await.unwrap_err();
    stale.expect(409, "not running under this lease");
    assert_eq!(stale.kind(), Some(ProblemType::LeaseNotCurrent));
    let too_big = app.upload(id, lease, stdout, 12, false, &vec![b'x'; 64 * 1024 + 1]).await;
    let too_big = too_big.unwrap_err();
    too_big.expect(413, "larger than");
    assert_eq!(too_big.kind(), Some(ProblemType::PayloadTooLarge));
    // Malformed requests, which the typed client cannot send.
    let no_lease = app
        .agent(Method::POST, &format!("/tasks/{id}/output?stream=stdout&offset=12"), "m")
        .body("x")
        .send()
        .await
        .unwrap();
    let problem = refused(no_lease, 400, "X-Lease").await;
    assert_eq!(problem.problem_type(), Some(ProblemType::BadRequest));
    let bad_stream = app
        .agent(Method::POST, &format!("/tasks/{id}/output?stream=stdlog&offset=0"), "manual")
        .header(headers::LEASE, lease.to_string())
        .body("x")
        .send()
        .await
        .unwrap();
    let problem = refused(bad_stream, 400, "stdout or stderr").await;
    assert_eq!(problem.problem_type(), Some(ProblemType::BadParameter));
    assert_eq!(problem.parameter.as_deref(), Some("stream"));
    for offset in ["-1", "9223372036854775807", "lots"] {
        let path = format!("/tasks/{id}/output?stream=stdout&offset={offset}&skip=true");
        let response = app
            .agent(Method::POST, &path, "manual")
            .header(headers::LEASE, lease.to_string())
            .body("x")
            .send()
            .await
            .unwrap();
        let problem = refused(response, 400, "`offset` must be").await;
        assert_eq!(problem.parameter.as_deref(), Some("offset"));
        let read = app
            .request(Method::GET, &format!("/tasks/{id}/output?offset={offset}"))
            .send()
            .await
            .unwrap();
        let problem = refused(read, 400, "`offset` must be").await;
        assert_eq!(problem.parameter.as_deref(), Some("offset"));
    }

    // The finish states the lengths; it is refused until the uploads reach them.
    let short = FinishReport {
        stdout_bytes: Some(20),
        stderr_bytes: Some(0),
        ..FinishReport::exited(lease, 0)
    };
    let short = app.finish(id, &short).await.unwrap_err();
    short.expect(409, "upload the rest");
    assert_eq!(short.kind(), Some(ProblemType::OutputIncomplete));
    assert_eq!((short.problem.stdout_bytes, short.problem.stderr_bytes), (Some(12), Some(0)));
    let whole = FinishReport {
        stdout: Some("hello world!".into()),
        stdout_bytes: Some(12),
        stderr_bytes: Some(0),
        ..FinishReport::exited(lease, 0)
    };
    let whole = app.finish(id, &whole).await.unwrap();
    assert_eq!(whole.status, TaskStatus::Finished);
    assert_eq!(whole.stdout.as_deref(), Some("hello world!"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finish_whose_text_disagrees_with_the_uploaded_output_is_refused() {
    let app = TestApp::spawn().await;
    let task = app.submit("echo hello").await;
    let picked = app.pick("manual", 0).await.unwrap().expect("the queued task");
    assert_eq!(picked.task.id, task.id);
    let lease = picked.lease;
    app.upload(task.id, lease, Stream::Stdout, 0, false, b"hello\n").await.unwrap();
    let report = |stdout: &str| FinishReport {
        stdout: Some(stdout.into()),
        stdout_bytes: Some(6),
        stderr_bytes: Some(0),
        ..FinishReport::exited(lease, 0)
    };

    let wrong = app.finish(task.id, &report("goodbye\n")).await.unwrap_err();
    let meanwhile = app.get(task.id).await.unwrap();
    let right = app.finish(task.id, &report("hello\n")).await.unwrap();

    wrong.expect(409, "stdout");
    assert_eq!(wrong.kind(), Some(ProblemType::OutputMismatch));
    assert_eq!(wrong.problem.kind, "/problems/output-mismatch");
    assert_eq!(meanwhile.status, TaskStatus::InProgress, "the refused finish changed nothing");
    assert_eq!(meanwhile.finished_at, None);
    assert_eq!(right.status, TaskStatus::Finished);
    assert_eq!(right.exit_code, Some(0));
    assert_eq!(right.stdout.as_deref(), Some("hello\n"));
    let streamed = app.output_all(task.id, Stream::Stdout).await;
    let stored = app.get(task.id).await.unwrap();
    assert_eq!(streamed, b"hello\n");
    assert_eq!(stored.stdout.as_deref().map(str::as_bytes), Some(streamed.as_slice()));
}

/// A task picked by hand, with `bytes` uploaded to its stdout at offset 0.
async fn picked_with_stdout(app: &TestApp, bytes: &[u8]) -> (TaskId, LeaseToken) {
    let task = app.submit("echo by hand").await;
    let picked = app.pick("manual", 0).await.unwrap().expect("the queued task");
    assert_eq!(picked.task.id, task.id);
    let mut offset = 0;
    for chunk in bytes.chunks(1000) {
        let ack = app.upload(task.id, picked.lease, Stream::Stdout, offset, false, chunk).await;
        offset = ack.unwrap().next_offset;
    }
    (task.id, picked.lease)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finish_must_state_exactly_the_lengths_of_the_uploads() {
    let app = TestApp::spawn().await;
    let (id, lease) = picked_with_stdout(&app, b"hello\nworld\n").await;
    let stating = |stdout_bytes: Option<u64>, stderr_bytes: Option<u64>| FinishReport {
        stdout: Some("hello\n".into()),
        stdout_bytes,
        stderr_bytes,
        ..FinishReport::exited(lease, 0)
    };

    let fewer = app.finish(id, &stating(Some(6), Some(0))).await.unwrap_err();
    let more = app.finish(id, &stating(Some(20), Some(0))).await.unwrap_err();
    // Stating no lengths takes the uploads' lengths: then the text is not theirs.
    let none = app.finish(id, &stating(None, None)).await.unwrap_err();
    let meanwhile = app.get(id).await.unwrap();
    let taken = app.finish(id, &FinishReport::exited(lease, 0)).await.unwrap();

    for refused in [&fewer, &more] {
        assert_eq!(refused.kind(), Some(ProblemType::OutputIncomplete), "{refused}");
        assert_eq!(
            (refused.problem.stdout_bytes, refused.problem.stderr_bytes),
            (Some(12), Some(0))
        );
    }
    assert_eq!(none.kind(), Some(ProblemType::OutputMismatch), "{none}");
    assert_eq!(meanwhile.status, TaskStatus::InProgress, "nothing was recorded");
    assert_eq!(taken.stdout.as_deref(), Some("hello\nworld\n"), "the text of the uploads");
    assert_eq!(taken.stdout_bytes, 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finish_without_texts_gets_the_texts_of_its_uploads() {
    let app = TestApp::spawn_with(|f| f.merge(("max_output_bytes", 2048))).await;
    // A head of 1,024 bytes and 3,000 more: the server keeps the head and the last 1,024.
    let bytes: Vec<u8> = (0..4024u32).map(|n| b'a' + (n % 26) as u8).collect();
    let (id, lease) = picked_with_stdout(&app, &bytes).await;
    let report = |stdout: Option<String>| FinishReport {
        stdout,
        stdout_bytes: Some(4024),
        stderr_bytes: Some(0),
        ..FinishReport::exited(lease, 0)
    };

    let made_up = app.finish(id, &report(Some("anything I like".into()))).await.unwrap_err();
    let task = app.finish(id, &report(None)).await.unwrap();

    assert_eq!(made_up.kind(), Some(ProblemType::OutputMismatch), "{made_up}");
    let text = task.stdout.unwrap();
    let head = std::str::from_utf8(&bytes[..1024]).unwrap();
    let tail = std::str::from_utf8(&bytes[3000..]).unwrap();
    assert_eq!(text, format!("{head}\n[taskexec: 1976 bytes of output dropped here]\n{tail}"));
    assert!(task.stdout_truncated && !task.stdout_lossy);
    assert_eq!(task.stdout_bytes, 4024);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_keeps_the_output_cap_its_pick_gave_whatever_process_takes_its_finish() {
    let app = TestApp::spawn_with(|f| f.merge(("max_output_bytes", 4096))).await;
    let other = TestApp::spawn_on(app.db.clone(), |f| f.merge(("max_output_bytes", 2048))).await;
    let bytes = vec![b'x'; 3000];
    let (id, lease) = picked_with_stdout(&app, &bytes).await;

    // The agent capped by its pick's terms (4,096): all 3,000 bytes, whole.
    let report = FinishReport {
        stdout: Some("x".repeat(3000)),
        stdout_bytes: Some(3000),
        stderr_bytes: Some(0),
        ..FinishReport::exited(lease, 0)
    };
    let task = other.finish(id, &report).await.unwrap();

    assert_eq!(task.stdout.as_deref(), Some("x".repeat(3000).as_str()));
    assert!(!task.stdout_truncated);
    assert_eq!(app.output_all(id, Stream::Stdout).await, bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_is_capped_with_head_marker_and_tail_intact() {
    let app = TestApp::spawn_with(|f| f.merge(("max_output_bytes", 65536))).await;
    let _worker = WorkerProcess::start(&app, "flooded", &[]);
    let task =
        app.submit("yes | head -c 3000000; echo the end; yes no | head -c 1000000 >&2").await;

    let task = app.until_done(task.id).await;

    assert_eq!(task.status, TaskStatus::Finished);
    assert!(task.stdout_truncated);
    assert_eq!(task.stdout_bytes, 3000008);
    let stdout = task.stdout.as_deref().unwrap();
    assert!(stdout.starts_with("y\ny\ny\n"), "head kept");
    assert!(stdout.ends_with("y\ny\nthe end\n"), "tail kept");
    assert!(stdout.contains("\n[taskexec: 2934472 bytes of output dropped here]\n"), "marker");
    assert!(stdout.len() < 65536 + 100);
    // The streamed copy follows the same rule: the first half, then a jump to the last half.
    let head = app.output(task.id, Stream::Stdout, 0, 0).await.unwrap();
    assert_eq!(head.next_offset, 32768);
    assert_eq!(head.data.len(), 32768);
    let tail = app.output(task.id, Stream::Stdout, 32768, 0).await.unwrap();
    assert_eq!(tail.dropped, 2934472);
    assert!(tail.ended);
    assert_eq!(tail.data.len(), 32768);
    assert!(tail.data.ends_with(b"y\nthe end\n"));
    let log = String::from_utf8(app.log(task.id, false).await.unwrap()).unwrap();
    assert!(
        log.contains("\n[taskexec: 2934472 bytes of stdout dropped here]\n"),
        "the log marks the drop"
    );
    assert!(task.stderr_truncated);
    assert_eq!(task.stderr_bytes, 1000000);
    let stderr = task.stderr.as_deref().unwrap();
    assert!(stderr.starts_with("no\nno\n"));
    assert!(stderr.contains("\n[taskexec: 934464 bytes of output dropped here]\n"), "stderr too");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binary_flood_fits_the_cap_as_text_and_counts_the_drop_in_bytes() {
    let app = TestApp::spawn_with(|f| f.merge(("max_output_bytes", 65536))).await;
    let _worker = WorkerProcess::start(&app, "random", &[]);
    let task = app.submit("head -c 3000000 /dev/urandom").await;

    let task = app.until_done(task.id).await;

    let stdout = task.stdout.as_deref().unwrap();
    assert!(stdout.len() <= 65536 + 100, "{} bytes of text", stdout.len());
    assert!(task.stdout_lossy);
    assert!(task.stdout_truncated);
    let marker = stdout.split("[taskexec: ").nth(1).expect("a marker");
    let dropped: u64 = marker.split(' ').next().unwrap().parse().unwrap();
    assert!(dropped > 2_900_000 && dropped < 3_000_000, "the drop counts raw bytes: {dropped}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_that_are_not_utf8_survive_the_stream_and_are_flagged_in_the_task() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "binary", &[]);
    let task = app.submit(r"printf '\377\376abc\000z'").await;

    let task = app.until_done(task.id).await;

    let streamed = app.output_all(task.id, Stream::Stdout).await;
    assert_eq!(streamed, b"\xff\xfeabc\x00z", "raw bytes, as printed");
    assert_eq!(task.stdout.as_deref(), Some("\u{FFFD}\u{FFFD}abc\u{FFFD}z"), "the task holds text");
    assert!(task.stdout_lossy);
}

/// A user's wait longer than the deployment's maximum is cut to it, not refused: a client need
/// not know the maximum, and an earlier answer is always a valid one.
#[tokio::test(flavor = "multi_thread")]
async fn a_wait_past_the_maximum_is_cut_to_it() {
    let app = TestApp::spawn_with(|f| {
        f.merge(("pick_wait_max_secs", 1)).merge(("pick_wait_default_secs", 1))
    })
    .await;
    let task = app.submit("true").await;
    let started = Instant::now();

    let waited = app.request(Method::GET, &format!("/tasks/{}?wait=3600", task.id)).send().await;
    let read = app
        .request(Method::GET, &format!("/tasks/{}/output?wait=99999999999999999999999", task.id))
        .send()
        .await;

    assert_eq!(waited.unwrap().status(), 200);
    assert_eq!(read.unwrap().status(), 200);
    assert!(started.elapsed() < Duration::from_secs(30), "cut to a second each");
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_on_a_task_returns_when_it_ends() {
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "waited", &[]);
    let task = app.submit("sleep 1; echo done").await;
    let started = Instant::now();

    let waited = app.wait(task.id, 30).await.unwrap();

    assert_eq!(waited.status, TaskStatus::Finished);
    assert_eq!(waited.stdout.as_deref(), Some("done\n"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered at the end, not at the deadline"
    );
    let bad =
        app.request(Method::GET, &format!("/tasks/{}?wait=forever", task.id)).send().await.unwrap();
    let problem = refused(bad, 400, "`wait`").await;
    assert_eq!(problem.parameter.as_deref(), Some("wait"));
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_leave_the_output_out() {
    let app = TestApp::spawn().await;
    let task = app.submit("echo x").await;
    let picked = app.pick("manual", 0).await.unwrap().expect("the queued task");
    app.upload(task.id, picked.lease, Stream::Stdout, 0, false, b"x\n").await.unwrap();
    app.finish(task.id, &FinishReport::exited(picked.lease, 0)).await.unwrap();

    let page = app.list("").await.unwrap();
    let raw: Value = app.get_json("/tasks").await.unwrap();

    let listed = &page.tasks[0];
    assert_eq!(listed.id, task.id);
    assert_eq!((listed.stdout.as_deref(), listed.stderr.as_deref()), (None, None));
    assert_eq!(listed.status, TaskStatus::Finished);
    assert_eq!(app.get(task.id).await.unwrap().stdout.as_deref(), Some("x\n"), "it has output");
    // Left out, not null: the members are absent from the JSON.
    let raw = raw["tasks"][0].as_object().unwrap();
    assert!(!raw.contains_key("stdout") && !raw.contains_key("stderr"), "{raw:?}");
    assert!(raw.contains_key("stdout_bytes") && raw.contains_key("status"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_printing_forever_keeps_the_agent_small_and_the_server_unharmed() {
    let app = TestApp::spawn().await;
    let worker = WorkerProcess::start(&app, "yes", &[]);
    let task = app.submit("timeout 30 yes; echo stopped").await;

    let mut largest_rss_kib = 0;
    let task = loop {
        let status = std::fs::read_to_string(format!("/proc/{}/status", worker.pid())).unwrap();
        let rss: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
            .unwrap();
        largest_rss_kib = largest_rss_kib.max(rss);
        app.health().await.expect("the API stays healthy");
        // Answers when the task ends, or after a second for the next sample.
        let task = app.wait(task.id, 1).await.unwrap();
        if task.status.is_terminal() {
            break task;
        }
    };

    assert_eq!(task.status, TaskStatus::Finished);
    assert!(task.stdout.as_deref().unwrap().ends_with("y\nstopped\n"));
    assert!(largest_rss_kib < 64 * 1024, "agent RSS reached {largest_rss_kib} KiB");
    let pool = app.db.pool().await;
    let stored: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(length(data)), 0)::bigint FROM task_output WHERE task_id = $1::text::uuid",
    )
    .bind(task.id.to_string())
    .fetch_one(&pool)
    .await
    .unwrap();
    eprintln!(
        "FIGURE yes for 30 s: agent RSS peak {} KiB, {stored} bytes of output stored, {} produced",
        largest_rss_kib, task.stdout_bytes
    );
    assert!(stored <= (1 << 20) + 64 * 1024, "the database keeps the cap: {stored} bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn interleaved_streams_keep_uploading_past_the_first_half() {
    // A command that alternates stdout and stderr line by line makes a run of every line. Past
    // the first half (8 KiB here) the uploads went at one run per half second per stream, so
    // the live output fell further and further behind; now they go at a byte rate.
    let app = TestApp::spawn_with(|f| f.merge(("max_output_bytes", 16384))).await;
    let _worker = WorkerProcess::start(&app, "interleaver", &[]);
    let task = app
        .submit(
            "for i in $(seq 400); do printf '%099d\\n' $i; printf '%099d\\n' $i >&2; \
             sleep 0.01; done; sleep 8",
        )
        .await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = app.get(task.id).await.unwrap();
        if seen.stdout_bytes == 40_000 && seen.stderr_bytes == 40_000 {
            assert_eq!(seen.status, TaskStatus::InProgress, "caught up while it runs: {seen:?}");
            break;
        }
        assert!(
            !seen.status.is_terminal() && Instant::now() < deadline,
            "the live output never caught up before the end: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = app.until_done(task.id).await;
    assert_eq!(done.exit_code, Some(0));
    assert!(done.stdout.unwrap().ends_with(&format!("{:099}\n", 400)));
}
