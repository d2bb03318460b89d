//! One client against everyone else: what a caller, or a bare connection, can make the server
//! spend. Each test is a load that hurt before (idle connections starving `/health`, HTTP/2
//! streams without a limit, list pages of 64 KiB commands, echoed input, waits that polled the
//! database every second each, followers that each read every chunk) at a bounded size, on
//! loopback.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use rocket::figment::Figment;
use taskexec_protocol::Task;
use taskexec_tests::{binary, ApiProcess, PgProxy, TestApp, TestDb, WorkerProcess, ADMIN_TOKEN};

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

/// Reads `stream` to its end; `None` if it is still open after `limit`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await.ok().map(|_| answer)
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_slow_and_idle_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with(|f| f.merge(("header_read_timeout", 1))).await;
    let address = app.url.trim_start_matches("http://").to_owned();
    let connect = || tokio::net::TcpStream::connect(address.clone());

    // One that never says a word; one that sends half a request's head (slowloris); one that
    // makes a request, reads the answer and keeps the connection without using it.
    let mut silent = connect().await.unwrap();
    let mut slow = connect().await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut idle = connect().await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let began = tokio::time::Instant::now();

    let limit = Duration::from_secs(10);
    let (silent, slow, idle) = tokio::join!(
        read_until_closed(&mut silent, limit),
        read_until_closed(&mut slow, limit),
        read_until_closed(&mut idle, limit),
    );
    let took = began.elapsed();
    eprintln!("FIGURE silent, slow and idle connections closed within {took:?} (timeout 1 s)");
    assert!(silent.is_some(), "a silent connection stayed open");
    assert!(slow.is_some(), "half a request's head kept its connection open");
    let idle = String::from_utf8_lossy(&idle.expect("an idle kept-alive connection stayed open"))
        .into_owned();
    assert!(idle.starts_with("HTTP/1.1 200"), "the request was answered first: {idle}");
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_cap_get_a_busy_problem_and_the_database_keeps_its_share() {
    raise_open_files();
    let db = TestDb::create().await;
    // A hard limit of 400 open files, which the server cannot raise: it caps connections
    // below it (400 - the pool's 8 - 128 kept back = 264) rather than at its setting (16,384).
    let api = ApiProcess::start_with_file_limit(&db.url, 400).await;
    let address = api.url.trim_start_matches("http://").to_owned();
    // A client with a kept-alive connection, made before the flood.
    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("{}/health", api.url)).send().await.unwrap().status(), 200);

    // 300 connections, each asking for /health and keeping its connection: those served stay
    // open (kept alive), those past the cap are answered and closed.
    let mut flood = Vec::new();
    for _ in 0..300 {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        flood.push(stream);
    }
    let answers = futures_join_all(flood.into_iter().map(|mut stream| async move {
        let answer = read_until_closed(&mut stream, Duration::from_secs(2)).await;
        (stream, answer)
    }))
    .await;
    let refused: Vec<String> = answers
        .iter()
        .filter_map(|(_, answer)| answer.as_ref().map(|a| String::from_utf8_lossy(a).into_owned()))
        .collect();
    eprintln!("FIGURE 300 connections against a limit of 400 files: {} refused", refused.len());
    // One connection is the client's; the start-up check's may not have been let go yet.
    assert!((37..=38).contains(&refused.len()), "{} refused: {refused:?}", refused.len());
    for answer in &refused {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("content-type: application/problem+json"), "{answer}");
        assert!(answer.contains("retry-after: 1"), "{answer}");
        assert!(answer.contains("\"type\":\"/problems/busy\""), "{answer}");
    }
    // The database still has its descriptors: a submission on the kept-alive connection works.
    let created = client
        .post(format!("{}/tasks", api.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({ "command": "true" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert!(
        api.log().contains("max_client_connections lowered from 16384 to 264"),
        "{}",
        api.log()
    );
    // A client that sends its request at once reads the refusal too (no reset for it).
    let refused = reqwest::Client::new().get(format!("{}/health", api.url)).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/busy", "{problem}");

    // Once the flood leaves, new connections are served again.
    drop(answers);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = reqwest::Client::new().get(format!("{}/health", api.url)).send().await;
        if fresh.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "new connections are still refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pick_and_a_follower_whose_clients_left_let_go_at_once() {
    // No rescan: only the pick's own leaving can take it out of the parked ones in time.
    let app = TestApp::spawn_with(|f| f.merge(("dispatch_rescan_secs", 3600))).await;
    let pick = tokio::spawn(
        reqwest::Client::new()
            .get(format!("{}/tasks/pick?wait=60", app.url))
            .bearer_auth(taskexec_tests::TOKEN)
            .header("X-Agent-Name", "leaving")
            .send(),
    );
    until_health(&app, "parked_picks", 1).await;
    pick.abort();
    let left = tokio::time::Instant::now();
    until_health(&app, "parked_picks", 0).await;
    let pick_gone = left.elapsed();

    // A follower of a task that nothing runs: its response has begun, then waits for output.
    let task = app.submit("echo never").await;
    let follower = reqwest::Client::new()
        .get(format!("{}/tasks/{}/log?follow=true", app.url, task.id))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(follower.status(), 200);
    until_waits(&app, 1).await;
    drop(follower);
    let left = tokio::time::Instant::now();
    until_waits(&app, 0).await;
    let follower_gone = left.elapsed();
    eprintln!(
        "FIGURE let go after the client left: pick {pick_gone:?}, follower {follower_gone:?}"
    );
    assert!(pick_gone < Duration::from_secs(2), "the pick stayed parked {pick_gone:?}");
    assert!(follower_gone < Duration::from_secs(5), "the follow went on {follower_gone:?}");
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

    let listed: serde_json::Value = get_as_admin(format!("{}/tasks?limit=1", api.url)).await;
    let first = &listed["tasks"][0];
    assert_eq!(first["command"].as_str().unwrap().chars().count(), 1024, "{first}");
    assert_eq!(first["command_truncated"], true);
    let full: Task =
        get_as_admin(format!("{}/tasks/{}", api.url, first["id"].as_str().unwrap())).await;
    assert_eq!(full.command.len(), 65536);
    assert!(!full.command_truncated);
}

/// A GET with the admin token, its JSON body.
async fn get_as_admin<T: serde::de::DeserializeOwned>(url: String) -> T {
    let response = reqwest::Client::new().get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    response.json().await.unwrap()
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

/// A server whose every statement goes through a counting proxy, with `configure` applied.
async fn counted(
    configure: impl FnOnce(Figment) -> Figment + Send + 'static,
) -> (TestApp, PgProxy) {
    let db = Arc::new(TestDb::create().await);
    let proxy = PgProxy::start(&db).await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_on(db, move |figment| {
        configure(figment.merge((taskexec_api::config::DATABASE_URL_KEY, url)))
    })
    .await;
    (app, proxy)
}

/// Statements per second through `proxy` over `window`.
async fn statement_rate(proxy: &PgProxy, window: Duration) -> f64 {
    let before = proxy.statements();
    tokio::time::sleep(window).await;
    (proxy.statements() - before) as f64 / window.as_secs_f64()
}

/// Waits until no statement has gone through `proxy` for half a second (the first looks of a
/// burst of requests are done), and returns the count then.
async fn until_quiet(proxy: &PgProxy) -> u64 {
    let mut before = proxy.statements();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = proxy.statements();
        if now == before {
            return now;
        }
        before = now;
    }
}

/// Waits until the server reports `count` waits and follows held.
async fn until_waits(app: &TestApp, count: u64) {
    until_health(app, "parked_waits", count).await
}

/// Waits until the server's `/health` reports `count` as `key`.
async fn until_health(app: &TestApp, key: &str, count: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let health = app.health().await.expect("/health answers while requests park");
        if health[key] == count {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {count} {key}: {health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_waits_cost_the_database_nothing_even_when_their_clients_leave() {
    raise_open_files();
    let (app, proxy) = counted(|f| {
        f.merge(("max_waits", 3000)).merge(("max_waits_per_token", 3000)).merge(("logging", "warn"))
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(app.submit(&format!("echo {i}")).await.id);
    }
    let idle = statement_rate(&proxy, Duration::from_secs(3)).await;

    // 3,000 long polls on 20 queued tasks that nothing changes, half on the task and half on
    // its output, each on a connection of its own.
    let mut waits = Vec::new();
    for n in 0..3000 {
        let http = reqwest::Client::new();
        let id = ids[n % ids.len()];
        let url = match n % 2 {
            0 => format!("{}/tasks/{id}?wait=60", app.url),
            _ => format!("{}/tasks/{id}/output?stream=stdout&wait=60", app.url),
        };
        waits.push(tokio::spawn(async move {
            http.get(url).bearer_auth(ADMIN_TOKEN).send().await.map(|r| r.status())
        }));
    }
    until_waits(&app, 3000).await;
    // One more is refused: the process holds as many as it may.
    let refused = reqwest::Client::new()
        .get(format!("{}/tasks/{}?wait=60", app.url, ids[0]))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    // Each wait's first look is its own.
    until_quiet(&proxy).await;

    let parked = statement_rate(&proxy, Duration::from_secs(5)).await;
    // The clients go away: their waits end within a few seconds, not at their deadline, and
    // cost nothing meanwhile.
    for wait in &waits {
        wait.abort();
    }
    let left = tokio::time::Instant::now();
    until_waits(&app, 0).await;
    let released = left.elapsed();
    assert!(released < Duration::from_secs(5), "the waits were let go after {released:?}");
    let dropped = statement_rate(&proxy, Duration::from_secs(5)).await;
    eprintln!(
        "FIGURE statements/s: idle {idle:.1}, 3,000 parked waits {parked:.1}, after their clients left {dropped:.1}; waits let go {released:?} after their clients left"
    );
    assert!(
        parked < idle + 1.0,
        "3,000 parked waits cost {parked:.1} statements/s (idle {idle:.1})"
    );
    assert!(dropped < idle + 1.0, "{dropped:.1} statements/s after the clients left");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wait_wakes_on_an_event_from_another_api_process() {
    // The task ends through the second process; the wait on the first answers at once, not at
    // its deadline, though the first process looks at the database only on events.
    let app = TestApp::spawn().await;
    let peer = app.spawn_peer().await;
    let task = app.submit("echo across").await;
    let waiting = {
        let app_url = app.url.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let task: Task = get_as_admin(format!("{app_url}/tasks/{}?wait=30", task.id)).await;
            (task, started.elapsed())
        })
    };
    until_waits(&app, 1).await;
    let picked = peer.pick("elsewhere", 0).await.unwrap().expect("the task");
    peer.finish(task.id, &taskexec_protocol::FinishReport::exited(picked.lease, 0)).await.unwrap();

    let (seen, took) = waiting.await.unwrap();
    assert!(seen.status.is_terminal(), "{seen:?}");
    assert!(took < Duration::from_secs(10), "woken by the other process's event: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listen_connection_gone_silent_is_replaced() {
    // The first process's LISTEN connection stays open but carries nothing, as when the
    // database's host vanishes without a FIN: the event of the second process never arrives
    // on it. Silent for 1 s, it is asked a question; unanswered within 1 s, it is replaced,
    // and the wait looks again, well before its 30 s deadline.
    let (app, proxy) = counted(|f| f.merge(("listen_probe_secs", 1))).await;
    let peer = app.spawn_peer().await;
    let task = app.submit("echo across").await;
    proxy.freeze_listeners();
    let waiting = {
        let app_url = app.url.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let task: Task = get_as_admin(format!("{app_url}/tasks/{}?wait=30", task.id)).await;
            (task, started.elapsed())
        })
    };
    until_waits(&app, 1).await;
    let picked = peer.pick("elsewhere", 0).await.unwrap().expect("the task");
    peer.finish(task.id, &taskexec_protocol::FinishReport::exited(picked.lease, 0)).await.unwrap();

    let (seen, took) = waiting.await.unwrap();
    eprintln!("FIGURE a wait across a frozen LISTEN connection answered after {took:?}");
    assert!(seen.status.is_terminal(), "{seen:?}");
    assert!(took < Duration::from_secs(10), "the silent connection was kept: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_token_cannot_hold_every_wait() {
    let app = TestApp::spawn_with(|f| f.merge(("max_waits_per_token", 2))).await;
    let task = app.submit("echo held").await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = format!("{}/tasks/{}/log?follow=true", app.url, task.id);
            tokio::spawn(async move {
                reqwest::Client::new().get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap()
            })
        })
        .collect();
    until_waits(&app, 2).await;

    let third = reqwest::Client::new()
        .get(format!("{}/tasks/{}?wait=5", app.url, task.id))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let problem: serde_json::Value = third.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/too-many-waits");
    // Another token is not held back, and a wait without `wait` is no wait.
    let submitter = app.token("other", taskexec_protocol::Role::Submitter).await;
    let other = app.as_user(&submitter).submit("echo other").await;
    assert!(app.as_user(&submitter).wait(other.id, 0).await.is_ok());
    assert!(app.get(task.id).await.is_ok());
    for follow in held {
        follow.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_followers_share_each_read() {
    raise_open_files();
    let (app, proxy) = counted(|f| f).await;
    let task = app.submit("for i in $(seq 30); do echo line $i; sleep 0.1; done").await;
    let mut followers = Vec::new();
    let (started, mut ready) = tokio::sync::mpsc::channel(1000);
    for _ in 0..1000 {
        let url = format!("{}/tasks/{}/log?follow=true", app.url, task.id);
        let started = started.clone();
        followers.push(tokio::spawn(async move {
            let response =
                reqwest::Client::new().get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
            assert_eq!(response.status(), 200, "a follower was refused");
            started.send(()).await.unwrap();
            response.text().await.unwrap()
        }));
    }
    drop(started);
    for _ in 0..1000 {
        ready.recv().await.expect("every follower gets its response");
    }
    // Each follower's first read (of a log it may see) is its own; then all wait on events.
    let before = until_quiet(&proxy).await;
    let _worker = WorkerProcess::start(&app, "chatty", &[]);

    let mut logs = Vec::new();
    for follower in followers {
        logs.push(follower.await.unwrap());
    }
    let spent = proxy.statements() - before;
    let uploads: i64 = sqlx::query_scalar("SELECT count(*) FROM task_output WHERE task_id = $1")
        .bind(task.id.as_uuid())
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap();
    eprintln!("FIGURE 1,000 followers, {uploads} chunks: {spent} statements in all");
    for log in &logs {
        assert!(log.contains("line 1\n") && log.contains("line 30\n"), "{log}");
        assert!(log.ends_with("[taskexec: task finished, exit code 0]\n"), "{log}");
    }
    // All of it: the agent's pick, heartbeats, uploads (a transaction each) and finish, the
    // NOTIFY of each event, and the followers' reads (two statements each: the task's
    // standing, its new chunks), shared. Unshared, the reads alone would be at least 2,000
    // per chunk.
    assert!(spent < 1000, "{spent} statements for {uploads} chunks and 1,000 followers");
}
