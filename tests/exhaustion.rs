//! One client against everyone else: what a caller, or a bare connection, can make the server
//! spend. Each test is a load that hurt before (idle connections starving `/health`, HTTP/2
//! streams without a limit, list pages of 64 KiB commands, echoed input) at a bounded size, on
//! loopback.

use std::io::{Read, Write};
use std::time::Duration;

use taskexec_protocol::Task;
use taskexec_tests::{binary, ApiProcess, TestApp, TestDb, ADMIN_TOKEN};

/// Raises this test process's own limit of open files, for the client ends of its connections.
fn raise_open_files() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit with a valid pointer, on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// The peak resident memory of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_do_not_starve_health() {
    raise_open_files();
    let db = TestDb::create().await;
    // Started with the common default of 1,024 open files: the server raises it itself.
    let api = ApiProcess::start_with_open_files(&db.url, 1024).await;
    let address = api.url.trim_start_matches("http://").to_owned();
    let idle: Vec<std::net::TcpStream> =
        (0..1100).map(|_| std::net::TcpStream::connect(&address).unwrap()).collect();

    let health =
        tokio::time::timeout(Duration::from_secs(1), reqwest::get(format!("{}/health", api.url)))
            .await
            .expect("/health answers within 1 s beside 1,100 idle connections")
            .unwrap();
    assert_eq!(health.status(), 200);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn cleartext_http2_is_not_spoken() {
    let app = TestApp::spawn().await;
    let address = app.url.trim_start_matches("http://").to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The HTTP/2 connection preface and an empty SETTINGS frame, as `curl --http2-prior-
        // knowledge` opens a connection on which it would then open thousands of streams.
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer
    })
    .await
    .unwrap();
    // An HTTP/2 server answers with its own SETTINGS frame (type 4, in the fourth byte).
    let speaks_http2 = answer.len() >= 9 && answer[3] == 0x04;
    assert!(!speaks_http2, "the server answered in HTTP/2: {answer:?}");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "closed, or an HTTP/1.1 error: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pages_shorten_long_commands_and_stay_small() {
    let db = TestDb::create().await;
    let api = ApiProcess::start(&db.url, &[]).await;
    let pool = db.pool().await;
    // 1,000 tasks with the longest command accepted (64 KiB), written directly.
    sqlx::query(
        "INSERT INTO tasks (id, command, owner, timeout_secs)
         SELECT gen_random_uuid(), repeat(md5(i::text), 2048), 'bulk', 60
           FROM generate_series(1, 1000) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let page = |http: reqwest::Client, url: String| async move {
        let response = http
            .get(format!("{url}/tasks?limit=1000"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap().len()
    };

    let pages = futures_join_all((0..8).map(|_| page(http.clone(), api.url.clone()))).await;

    for bytes in &pages {
        assert!(*bytes < 2 << 20, "a page of 1,000 tasks is {bytes} bytes");
    }
    let peak = peak_rss(api.child.id().unwrap());
    eprintln!("FIGURE 8 concurrent pages of 1,000 tasks with 64 KiB commands: {} bytes each, API peak RSS {} MiB", pages[0], peak >> 20);
    assert!(peak < 150 << 20, "the API peaked at {} MiB (bound: 150 MiB)", peak >> 20);

    let listed: serde_json::Value = http
        .get(format!("{}/tasks?limit=1", api.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = &listed["tasks"][0];
    assert_eq!(first["command"].as_str().unwrap().chars().count(), 1024, "{first}");
    assert_eq!(first["command_truncated"], true);
    let full: Task = http
        .get(format!("{}/tasks/{}", api.url, first["id"].as_str().unwrap()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(full.command.len(), 65536);
    assert!(!full.command_truncated);
}

/// Runs the futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}

#[tokio::test(flavor = "multi_thread")]
async fn error_bodies_quote_a_bounded_part_of_the_input() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    let long = "x".repeat(20_000);
    for query in [format!("status={long}"), format!("{long}=1"), format!("cursor={long}")] {
        let response = http
            .get(format!("{}/tasks?{query}", app.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{}", &query[..20]);
        let body = response.bytes().await.unwrap();
        assert!(body.len() < 1024, "a {} byte problem for a 20,000 byte parameter", body.len());
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(problem["detail"].as_str().unwrap().len() <= 512, "{problem}");
    }
}

#[test]
fn a_bad_token_setting_is_refused_without_being_printed() {
    // Twenty digits: read as a number (which a token must not be), and once printed in full.
    let secret = "12345678901234567890";
    for (name, value, says) in [
        ("ROCKET_AGENT_TOKEN", secret, "agent_token"),
        ("AGENT_TOKEN", " padded-agent-token-value ", "whitespace"),
    ] {
        let out = std::process::Command::new(binary("taskexec-api"))
            .env_clear()
            .env(name, value)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("LOG_LEVEL", "info")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: the server started");
        assert!(!log.contains(value.trim()), "{name}: the token is in the log: {log}");
        assert!(log.contains(says), "{name}: the log says why ({says}): {log}");
    }
}
