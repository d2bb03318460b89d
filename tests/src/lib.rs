//! The test harness: a fresh database per test, the real Rocket app on a free port, the real
//! worker binary, and an HTTP client that speaks the API.
//!
//! `DATABASE_URL` must point at a PostgreSQL server where the user may create databases;
//! `make test` provides one (see `scripts/with-postgres`).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Response;
use rocket::figment::Figment;
use rocket::Shutdown;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

mod client;
mod tls;

pub use client::{Aborted, Answer, Api, Failure, OutputRead};
pub use tls::TestCa;

/// The agent token every test server is started with.
pub const TOKEN: &str = "test-agent-token-0123456789";

/// The admin token every test server is started with; the typed client's user token.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

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
        TestDb::create_on(&admin_url).await
    }

    /// A database on the server of `admin_url`.
    pub async fn create_on(admin_url: &str) -> TestDb {
        let admin_url = admin_url.to_owned();
        let name = format!("taskexec_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await.expect("connect to DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let url = with_database(&admin_url, &name);
        TestDb { name, url, admin_url }
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url).await.expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot block on itself: use a thread.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
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
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
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
    pub api: Api,
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
        TestApp::launch(db, configure, None).await
    }

    /// A server that speaks HTTPS only, with a certificate `ca` signed for localhost; its
    /// typed client trusts that CA.
    pub async fn spawn_tls(ca: &TestCa) -> TestApp {
        let db = Arc::new(TestDb::create().await);
        let (cert, key) = (ca.server_cert(), ca.server_key());
        let tls = move |f: Figment| f.merge(("tls.certs", cert)).merge(("tls.key", key));
        TestApp::launch(db, tls, Some(ca)).await
    }

    async fn launch(
        db: Arc<TestDb>,
        configure: impl FnOnce(Figment) -> Figment,
        tls: Option<&TestCa>,
    ) -> TestApp {
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
        let (url, api) = match tls {
            None => {
                let url = format!("http://127.0.0.1:{port}");
                (url.clone(), Api::new(&url, ADMIN_TOKEN, TOKEN))
            }
            Some(ca) => {
                let url = format!("https://localhost:{port}");
                (url.clone(), Api::with_http(&url, ADMIN_TOKEN, TOKEN, ca.client()))
            }
        };
        TestApp { api, url, db, shutdown, server }
    }

    /// A second server on the same database, as a second API process would be.
    pub async fn spawn_peer(&self) -> TestApp {
        TestApp::spawn_on(self.db.clone(), |figment| figment).await
    }

    /// Starts Rocket's graceful shutdown and waits for the server to stop.
    pub async fn stop(mut self) -> Arc<TestDb> {
        self.shutdown.clone().notify();
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.server).await;
        self.db.clone()
    }

    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }
}

/// The app is spoken to through its typed client: `app.submit("echo hi")`, `app.pick(…)`.
impl std::ops::Deref for TestApp {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for TestApp {
    /// Starts the server's shutdown before its database is dropped, so that its background
    /// tasks stop rather than retry against a database that is gone.
    fn drop(&mut self) {
        self.shutdown.clone().notify();
    }
}

/// The settings every test server starts from: defaults, a free port, its database, the
/// test token, a quiet log.
pub fn test_figment(database_url: &str) -> Figment {
    taskexec_api::config::figment()
        .merge(("address", "127.0.0.1"))
        .merge(("port", 0))
        .merge(("agent_token", TOKEN))
        .merge(("admin_token", ADMIN_TOKEN))
        .merge(("logging", "error"))
        .merge((taskexec_api::config::DATABASE_URL_KEY, database_url))
        .merge(("databases.taskexec.max_connections", 8))
}

/// Asserts an RFC 9457 problem response with `status` whose detail mentions `needle`.
pub async fn assert_problem(response: Response, status: u16, needle: &str) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/problem+json");
    let problem: Value = response.json().await.expect("a JSON problem");
    assert_eq!(problem["status"], status);
    assert!(problem["type"].is_string() && problem["title"].is_string(), "{problem}");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(needle), "detail {detail:?} does not mention {needle:?}");
    problem
}

/// A binary of this workspace, freshly built: the first call in a test process runs
/// `cargo build` for the API and the worker, so the tests never run a stale binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's path");
        let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>").to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        // The whole workspace, as `make build` does: building a subset would resolve features
        // differently and rebuild the dependencies every time the two alternate.
        build.args(["build", "--quiet", "--workspace", "--bins"]);
        // Cargo describes the test package to the test in CARGO_PKG_*, CARGO_MANIFEST_* and so
        // on; build scripts that watch such variables would take them for a change and rebuild.
        for (name, _) in std::env::vars() {
            let set_by_cargo_for_tests =
                ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_"]
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
                    || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR"]
                        .contains(&name.as_str());
            if set_by_cargo_for_tests {
                build.env_remove(name);
            }
        }
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
        dir
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing after the build", path.display());
    path
}

/// A worker process talking to `app`, killed when dropped. Its log (stderr) is kept.
pub struct WorkerProcess {
    pub child: tokio::process::Child,
    log: Arc<std::sync::Mutex<String>>,
    /// A folder of the worker's own, removed with it.
    scratch: Option<PathBuf>,
}

impl WorkerProcess {
    pub fn start(app: &TestApp, name: &str, extra_env: &[(&str, &str)]) -> WorkerProcess {
        WorkerProcess::start_with_url(&app.url, name, extra_env)
    }

    /// A worker for `url`, which may list several API addresses separated by commas.
    pub fn start_with_url(url: &str, name: &str, extra_env: &[(&str, &str)]) -> WorkerProcess {
        WorkerProcess::spawn(
            tokio::process::Command::new(binary("taskexec-worker")),
            url,
            name,
            extra_env,
        )
    }

    /// A worker running as an unprivileged user (`nobody`) when the tests run as root, as the
    /// container image runs it. `nobody` may not be able to reach the build's binary (a
    /// checkout in a 0700 folder, as `mktemp -d` makes), so it runs a copy in a folder of its
    /// own that everyone can enter, removed when the worker is dropped.
    pub fn start_unprivileged(
        app: &TestApp,
        name: &str,
        extra_env: &[(&str, &str)],
    ) -> WorkerProcess {
        if !is_root() {
            return WorkerProcess::start(app, name, extra_env);
        }
        let dir = std::env::temp_dir().join(format!("taskexec-nobody-{}", Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).expect("a folder for the unprivileged worker's binary");
        let copy = dir.join("taskexec-worker");
        std::fs::copy(binary("taskexec-worker"), &copy).expect("copy the worker binary");
        use std::os::unix::fs::PermissionsExt;
        for path in [&dir, &copy] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut command = tokio::process::Command::new("runuser");
        command.args(["-u", "nobody", "--"]).arg(&copy);
        let mut worker = WorkerProcess::spawn(command, &app.url, name, extra_env);
        worker.scratch = Some(dir);
        worker
    }

    fn spawn(
        mut command: tokio::process::Command,
        url: &str,
        name: &str,
        extra_env: &[(&str, &str)],
    ) -> WorkerProcess {
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
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start the worker");
        let log = kept_lines(child.stderr.take().expect("piped stderr"));
        WorkerProcess { child, log, scratch: None }
    }

    /// A worker whose command is adjusted by `customize` before it starts (an inherited
    /// descriptor, say).
    pub fn start_customized(
        app: &TestApp,
        name: &str,
        extra_env: &[(&str, &str)],
        customize: impl FnOnce(&mut tokio::process::Command),
    ) -> WorkerProcess {
        let mut command = tokio::process::Command::new(binary("taskexec-worker"));
        customize(&mut command);
        WorkerProcess::spawn(command, &app.url, name, extra_env)
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("the worker is running") as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sends a signal to our own child.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait()).await.ok().map(|r| r.expect("wait"))
    }

    /// What the worker has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(dir) = self.scratch.take() {
            let _ = self.child.start_kill();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The lines a process writes to `stderr`, kept as they come.
fn kept_lines(stderr: tokio::process::ChildStderr) -> Arc<std::sync::Mutex<String>> {
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    log
}

/// A system user of its own for one test's commands (`RUN_AS`), deleted when dropped. Needs
/// root, as CI runs the tests.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
}

impl TestUser {
    pub fn create() -> TestUser {
        TestUser::named(&format!("tex{}", &Uuid::new_v4().simple().to_string()[..12]))
    }

    /// A user called `name` (which no other test may use).
    pub fn named(name: &str) -> TestUser {
        let name = name.to_owned();
        // useradd takes a lock on /etc/passwd, which a concurrent useradd or userdel may hold.
        for attempt in 0.. {
            let out = std::process::Command::new("useradd")
                .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
                .args(["--shell", "/usr/sbin/nologin", &name])
                .output()
                .expect("run useradd");
            if out.status.success() {
                break;
            }
            assert!(attempt < 50, "useradd {name}: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = std::process::Command::new("id").args(["-u", &name]).output().expect("id -u");
        let uid = String::from_utf8_lossy(&out.stdout).trim().parse().expect("a numeric uid");
        TestUser { name, uid }
    }

    /// Live processes whose real uid is this user's.
    pub fn processes(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or("");
                uid.split_whitespace().next() == Some(self.uid.to_string().as_str())
                    && is_alive(*pid)
            })
            .collect()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        for _ in 0..50 {
            let out = std::process::Command::new("userdel").arg(&self.name).output();
            // 8: the user is logged in (has processes); 10: the lock is taken. Both pass.
            if out.map_or(true, |o| o.status.success() || !matches!(o.status.code(), Some(8 | 10)))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether process `pid` is alive (a zombie is not).
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().map(str::trim_start), Some(rest) if rest.starts_with('Z'))
        }
        Err(_) => false,
    }
}

/// Live processes of process group `group`.
pub fn group_members(group: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // After the command name: state, ppid, pgrp, ...
            let fields: Vec<&str> =
                stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(group)
                && fields.first() != Some(&"Z")
        })
        .collect()
}

/// Waits until `done` holds, or panics with `what` after `timeout`.
pub async fn until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A set of workers kept running: one that exits is started again, as a supervisor would.
pub struct AgentPool {
    /// Owns the workers: aborting it drops them, which kills them.
    keeper: tokio::task::JoinHandle<()>,
}

impl AgentPool {
    pub fn start(url: &str, count: usize, extra_env: &[(&str, &str)]) -> AgentPool {
        let env: Vec<(String, String)> =
            extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let start = {
            let url = url.to_owned();
            move |n: usize| {
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                WorkerProcess::start_with_url(&url, &format!("pool-{n}"), &env)
            }
        };
        let mut workers: Vec<WorkerProcess> = (0..count).map(&start).collect();
        let keeper = tokio::spawn(async move {
            loop {
                for (n, worker) in workers.iter_mut().enumerate() {
                    if let Ok(Some(_)) = worker.child.try_wait() {
                        *worker = start(n);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        AgentPool { keeper }
    }
}

impl Drop for AgentPool {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// The API binary as a process of its own, for tests that kill or restart it.
pub struct ApiProcess {
    pub url: String,
    pub child: tokio::process::Child,
    port: u16,
    database_url: String,
    env: Vec<(String, String)>,
    /// Its log (stderr), when it is kept.
    log: Option<Arc<std::sync::Mutex<String>>>,
    open_files: Option<(u64, bool)>,
}

impl ApiProcess {
    pub async fn start(database_url: &str, extra_env: &[(&str, &str)]) -> ApiProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let env = extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        ApiProcess::launch(port, database_url, &env, false, None).await
    }

    /// The API started with a soft limit of `open_files` descriptors (its hard limit as ours),
    /// as a common default of 1,024 would leave it.
    pub async fn start_with_open_files(database_url: &str, open_files: u64) -> ApiProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        ApiProcess::launch(port, database_url, &[], false, Some((open_files, false))).await
    }

    /// The API with a hard limit of `open_files` open files (which it cannot raise), its log
    /// kept for `log`.
    pub async fn start_with_file_limit(database_url: &str, open_files: u64) -> ApiProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        ApiProcess::launch(port, database_url, &[], true, Some((open_files, true))).await
    }

    /// The API, its log (stderr) kept for `log`.
    pub async fn start_logged(database_url: &str, extra_env: &[(&str, &str)]) -> ApiProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let env = extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        ApiProcess::launch(port, database_url, &env, true, None).await
    }

    /// What the server has logged so far (empty unless started with `start_logged`).
    pub fn log(&self) -> String {
        self.log.as_ref().map(|log| log.lock().unwrap().clone()).unwrap_or_default()
    }

    async fn launch(
        port: u16,
        database_url: &str,
        env: &[(String, String)],
        logged: bool,
        open_files: Option<(u64, bool)>,
    ) -> ApiProcess {
        let mut command = tokio::process::Command::new(binary("taskexec-api"));
        if let Some((soft, hard)) = open_files {
            // SAFETY: getrlimit and setrlimit are async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                    limit.rlim_cur = soft.min(limit.rlim_max);
                    if hard {
                        limit.rlim_max = limit.rlim_cur;
                    }
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    Ok(())
                });
            }
        }
        command
            .env_clear()
            .env("DATABASE_URL", database_url)
            .env("AGENT_TOKEN", TOKEN)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SERVER_PORT", port.to_string())
            .env("ROCKET_ADDRESS", "127.0.0.1")
            .env("LOG_LEVEL", "warn")
            .envs(env.iter().cloned())
            .kill_on_drop(true);
        if logged {
            command.stderr(Stdio::piped());
        }
        let mut child = command.spawn().expect("start the API");
        let log = child.stderr.take().map(kept_lines);
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while http
            .get(format!("{url}/health"))
            .send()
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the API at {url} never became healthy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let database_url = database_url.to_owned();
        ApiProcess { url, child, port, database_url, env: env.to_vec(), log, open_files }
    }

    /// Stops the server with SIGTERM, waits for it to exit, and starts it again on the same
    /// port and database.
    pub async fn restart(mut self) -> ApiProcess {
        self.signal(libc::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the API stops on SIGTERM")
            .expect("wait for the API");
        assert!(status.success(), "the API exited with {status}; its log:\n{}", self.log());
        let (port, logged) = (self.port, self.log.is_some());
        ApiProcess::launch(port, &self.database_url, &self.env, logged, self.open_files).await
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("the API is running") as i32;
        // SAFETY: signals our own child.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// A PostgreSQL cluster of the test's own, for tests that restart the server. Started from the
/// installed binaries (as an unprivileged user when run as root); removed when dropped.
pub struct PgCluster {
    pub admin_url: String,
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    /// The server's TLS settings, when it speaks TLS.
    tls_options: String,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        PgCluster::create(None)
    }

    /// A cluster that accepts TLS with the server certificate of `ca` (for 127.0.0.1).
    pub fn start_tls(ca: &TestCa) -> PgCluster {
        PgCluster::create(Some(ca))
    }

    fn create(tls: Option<&TestCa>) -> PgCluster {
        let bindir = pg_bindir();
        let dir = std::env::temp_dir().join(format!("taskexec-pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let tls_options = match tls {
            None => String::new(),
            Some(ca) => {
                // The server's own copies: PostgreSQL wants its key private to its user.
                let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
                std::fs::copy(ca.server_cert(), &cert).unwrap();
                std::fs::copy(ca.server_key(), &key).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
                format!(
                    " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                    cert.display(),
                    key.display()
                )
            }
        };
        let cluster = PgCluster {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bindir,
            port,
            tls_options,
        };
        cluster.chown();
        let data = cluster.data();
        cluster.pg(
            "initdb",
            &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"],
        );
        cluster.start_server();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Starts (or starts again) the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200{}",
            self.port,
            self.dir.display(),
            self.tls_options
        );
        let log = self.dir.join("postgres.log").display().to_string();
        self.pg(
            "pg_ctl",
            &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "-o", &options, "start"],
        );
    }

    /// Stops the server the hard way, as a crash would.
    pub fn stop_immediately(&self) {
        self.pg("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }

    fn pg(&self, program: &str, args: &[&str]) {
        let path = self.bindir.join(program);
        let mut command = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            std::process::Command::new(&path)
        };
        let output =
            command.args(args).stdin(Stdio::null()).output().expect("run a PostgreSQL tool");
        assert!(
            output.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn chown(&self) {
        if is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres", &self.dir.display().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let path = self.bindir.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if is_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&path).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Where the PostgreSQL server binaries are: $TASKEXEC_PG_BINDIR or $PG_BINDIR, `pg_config
/// --bindir`, or the newest /usr/lib/postgresql/*/bin.
fn pg_bindir() -> PathBuf {
    for var in ["TASKEXEC_PG_BINDIR", "PG_BINDIR"] {
        if let Ok(dir) = std::env::var(var) {
            return PathBuf::from(dir);
        }
    }
    if let Ok(output) = std::process::Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path().join("bin"))).collect())
        .unwrap_or_default();
    versions.sort_by_key(|dir| {
        dir.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0)
    });
    versions.pop().expect("no PostgreSQL binaries found: install PostgreSQL or set PG_BINDIR")
}

/// A TCP proxy in front of PostgreSQL that a test can cut, to play a database outage without
/// touching the server other tests use.
pub struct PgProxy {
    /// `DATABASE_URL` of `db`, through the proxy (without TLS, so that it can count).
    pub url: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
    freezes: tokio::sync::watch::Sender<u64>,
    statements: Arc<std::sync::atomic::AtomicU64>,
}

impl PgProxy {
    pub async fn start(db: &TestDb) -> PgProxy {
        let mut url = reqwest::Url::parse(&db.url).expect("DATABASE_URL is a URL");
        let upstream =
            format!("{}:{}", url.host_str().unwrap_or("127.0.0.1"), url.port().unwrap_or(5432));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(listener.local_addr().unwrap().port())).unwrap();
        url.query_pairs_mut().append_pair("sslmode", "disable");
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let (freezes, _) = tokio::sync::watch::channel(0u64);
        let statements = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (flag, cut_tx, counter) = (up.clone(), cuts.clone(), statements.clone());
        let freeze_tx = freezes.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let upstream = upstream.clone();
                let mut cut = cut_tx.subscribe();
                let mut freeze = freeze_tx.subscribe();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let listens = std::sync::atomic::AtomicBool::new(false);
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = outbound.set_nodelay(true);
                    let _ = inbound.set_nodelay(true);
                    let (mut from_client, mut to_client) = inbound.split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    let frozen = async {
                        loop {
                            if freeze.changed().await.is_err() {
                                return std::future::pending().await;
                            }
                            if listens.load(std::sync::atomic::Ordering::SeqCst) {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = count_statements(&mut from_client, &mut to_server, &counter, &listens) => {}
                        _ = tokio::io::copy(&mut from_server, &mut to_client) => {}
                        _ = cut.changed() => {}
                        _ = frozen => {
                            // Open, but nothing passes either way: its host has vanished.
                            let _ = cut.changed().await;
                        }
                    }
                });
            }
        });
        PgProxy { url: url.to_string(), up, cuts, freezes, statements }
    }

    /// Statements sent through the proxy so far: simple queries and executions of prepared
    /// ones, as the server counts them.
    pub fn statements(&self) -> u64 {
        self.statements.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes every connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// The LISTEN connections through the proxy stay open, but nothing passes on them any
    /// more either way, as when their peer's host vanishes without a FIN; other connections,
    /// and new ones, are untouched.
    pub fn freeze_listeners(&self) {
        self.freezes.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies a PostgreSQL client's messages to the server, counting statements: each simple
/// query ('Q') and each execution ('E') of the extended protocol. The first message (and a
/// refused SSL or GSS request before it) has no type byte.
async fn count_statements(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    counter: &std::sync::atomic::AtomicU64,
    listens: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut started = false;
    loop {
        let mut head = [0u8; 5];
        let kind = if started {
            from.read_exact(&mut head).await?;
            Some(head[0])
        } else {
            from.read_exact(&mut head[1..]).await?;
            None
        };
        let length = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; length.saturating_sub(4)];
        from.read_exact(&mut body).await?;
        match kind {
            Some(b'Q' | b'E') => {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if kind == Some(b'Q') && body.windows(7).any(|w| w == b"LISTEN ") {
                    listens.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Some(_) => {}
            // 80877103 asks for SSL, 80877104 for GSS encryption; anything else starts up.
            None => started = !matches!(body.get(..4), Some([4, 210, 22, 47] | [4, 210, 22, 48])),
        }
        // One write per message: a header and a body written apart wait on each other's ACK.
        let mut message = if kind.is_some() { head.to_vec() } else { head[1..].to_vec() };
        message.extend_from_slice(&body);
        to.write_all(&message).await?;
    }
}
