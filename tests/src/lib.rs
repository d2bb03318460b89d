//! The test harness: a fresh database per test, the real Rocket app on a free port, the real
//! worker binary, and an HTTP client that speaks the API.
//!
//! `DATABASE_URL` must point at a PostgreSQL server where the user may create databases;
//! `make test` provides one (see `scripts/with-postgres`).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response};
use rocket::figment::Figment;
use rocket::Shutdown;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

/// The agent token every test server is started with.
pub const TOKEN: &str = "test-agent-token-0123456789";

/// A database of its own for one test, dropped when the test ends (pass or fail).
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let admin_url = std::env::var("DATABASE_URL").expect(
            "DATABASE_URL is not set: run the tests with `make test`, which provides a database",
        );
        let name = format!("taskexec_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let url = with_database(&admin_url, &name);
        TestDb {
            name,
            url,
            admin_url,
        }
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot block on itself: use a thread.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.map_err(io)?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .map_err(io)?;
                Ok::<_, std::io::Error>(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

fn io(e: sqlx::Error) -> std::io::Error {
    std::io::Error::other(e)
}

/// `postgres://u@h:p/db?x` with the database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// The API server running in this process, on its own database.
pub struct TestApp {
    pub url: String,
    pub http: reqwest::Client,
    pub db: Arc<TestDb>,
    shutdown: Shutdown,
    server: tokio::task::JoinHandle<()>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(|figment| figment).await
    }

    /// Starts a server with settings adjusted by `configure`.
    pub async fn spawn_with(configure: impl FnOnce(Figment) -> Figment) -> TestApp {
        TestApp::spawn_on(Arc::new(TestDb::create().await), configure).await
    }

    /// Starts a server on an existing database (several servers may share one).
    pub async fn spawn_on(db: Arc<TestDb>, configure: impl FnOnce(Figment) -> Figment) -> TestApp {
        let figment = test_figment(&db.url);
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        let rocket = taskexec_api::build(configure(figment))
            .attach(rocket::fairing::AdHoc::on_liftoff("Test port", |rocket| {
                Box::pin(async move {
                    let _ = port_tx.send(rocket.config().port);
                })
            }))
            .ignite()
            .await
            .expect("the API ignites");
        let shutdown = rocket.shutdown();
        let server = tokio::spawn(async move {
            let _ = rocket.launch().await;
        });
        let port = port_rx.await.expect("the API lifts off");
        TestApp {
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            db,
            shutdown,
            server,
        }
    }

    /// A second server on the same database, as a second API process would be.
    pub async fn spawn_peer(&self) -> TestApp {
        TestApp::spawn_on(self.db.clone(), |figment| figment).await
    }

    /// Starts Rocket's graceful shutdown and waits for the server to stop.
    pub async fn stop(self) -> Arc<TestDb> {
        self.shutdown.clone().notify();
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut { self.server }).await;
        self.db
    }

    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url))
    }

    /// A request with the agent's credentials.
    pub fn agent(&self, method: Method, path: &str, name: &str) -> RequestBuilder {
        self.request(method, path)
            .bearer_auth(TOKEN)
            .header("X-Agent-Name", name)
    }

    /// Submits a command and returns the created task.
    pub async fn create(&self, command: &str) -> Value {
        let response = self
            .request(Method::POST, "/tasks")
            .json(&json!({ "command": command }))
            .send()
            .await
            .expect("POST /tasks");
        assert_eq!(response.status(), 201, "create {command:?}");
        response.json().await.expect("a task")
    }

    pub async fn task(&self, id: &str) -> Value {
        let response = self
            .request(Method::GET, &format!("/tasks/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// A pick with `wait` seconds: the picked task (with its lease), or None on 204.
    pub async fn pick(&self, agent: &str, wait: u64) -> Option<Value> {
        let response = self
            .agent(Method::GET, &format!("/tasks/pick?wait={wait}"), agent)
            .send()
            .await
            .expect("GET /tasks/pick");
        match response.status().as_u16() {
            200 => Some(response.json().await.unwrap()),
            204 => None,
            status => panic!(
                "pick answered {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }

    pub async fn finish(&self, id: &str, body: Value) -> Response {
        self.agent(Method::POST, &format!("/tasks/{id}/finish"), "tester")
            .json(&body)
            .send()
            .await
            .expect("POST finish")
    }

    /// Waits until `parked` picks are parked, as the server reports on /health.
    pub async fn until_parked(&self, parked: u64) {
        self.eventually(|health: Value| health["parked_picks"] == parked, "/health")
            .await;
    }

    /// Polls `path` until `done` holds for its JSON, or panics after 30 s.
    pub async fn eventually(&self, done: impl Fn(Value) -> bool, path: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let response = self.request(Method::GET, path).send().await.unwrap();
            let value: Value = response.json().await.unwrap();
            if done(value.clone()) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never satisfied: {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until task `id` reaches a terminal status and returns it.
    pub async fn until_done(&self, id: &str) -> Value {
        let terminal = |task: Value| {
            matches!(
                task["status"].as_str(),
                Some("finished" | "failed" | "cancelled")
            )
        };
        self.eventually(terminal, &format!("/tasks/{id}")).await
    }
}

/// The settings every test server starts from: defaults, a free port, its database, the
/// test token, a quiet log.
pub fn test_figment(database_url: &str) -> Figment {
    taskexec_api::config::figment()
        .merge(("address", "127.0.0.1"))
        .merge(("port", 0))
        .merge(("agent_token", TOKEN))
        .merge(("logging", "warn"))
        .merge((taskexec_api::config::DATABASE_URL_KEY, database_url))
        .merge(("databases.taskexec.max_connections", 8))
}

/// Asserts an RFC 9457 problem response with `status` whose detail mentions `needle`.
pub async fn assert_problem(response: Response, status: u16, needle: &str) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let problem: Value = response.json().await.expect("a JSON problem");
    assert_eq!(problem["status"], status);
    assert!(
        problem["type"].is_string() && problem["title"].is_string(),
        "{problem}"
    );
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(needle),
        "detail {detail:?} does not mention {needle:?}"
    );
    problem
}

/// A binary of this workspace, built by `cargo build` (which `make test` runs first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (make test does)",
        path.display()
    );
    path
}

/// A worker process talking to `app`, killed when dropped.
pub struct WorkerProcess {
    pub child: tokio::process::Child,
}

impl WorkerProcess {
    pub fn start(app: &TestApp, name: &str, extra_env: &[(&str, &str)]) -> WorkerProcess {
        WorkerProcess::start_with_url(&app.url, name, extra_env)
    }

    pub fn start_with_url(url: &str, name: &str, extra_env: &[(&str, &str)]) -> WorkerProcess {
        let mut command = tokio::process::Command::new(binary("taskexec-worker"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BACKEND_API_URL", url)
            .env("AGENT_TOKEN", TOKEN)
            .env("AGENT_NAME", name)
            .env("POLL_INTERVAL", "200ms")
            .env("PICK_WAIT", "5s")
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (key, value) in extra_env {
            command.env(key, value);
        }
        WorkerProcess {
            child: command.spawn().expect("start the worker"),
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("the worker is running") as i32;
        // SAFETY: sends a signal to our own child.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .map(|r| r.expect("wait"))
    }
}

/// A TCP proxy in front of PostgreSQL that a test can cut, to play a database outage without
/// touching the server other tests use.
pub struct PgProxy {
    /// `DATABASE_URL` of `db`, through the proxy.
    pub url: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl PgProxy {
    pub async fn start(db: &TestDb) -> PgProxy {
        let mut url = reqwest::Url::parse(&db.url).expect("DATABASE_URL is a URL");
        let upstream = format!(
            "{}:{}",
            url.host_str().unwrap_or("127.0.0.1"),
            url.port().unwrap_or(5432)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(listener.local_addr().unwrap().port()))
            .unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let (flag, cut_tx) = (up.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let upstream = upstream.clone();
                let mut cut = cut_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        PgProxy {
            url: url.to_string(),
            up,
            cuts,
        }
    }

    /// Closes every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
