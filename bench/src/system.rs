//! What the benchmark runs against: the PostgreSQL cluster that `with-postgres` started, the
//! release binaries, pgbench, and readings of a process's CPU and memory.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use taskexec_protocol::Role;
use taskexec_tests::Api;

/// The agent token of every benchmark server.
pub const TOKEN: &str = "bench-token-0123456789abcdef";

/// The admin token of every benchmark server, with which the bench makes its submitter token.
pub const ADMIN_TOKEN: &str = "bench-admin-0123456789abcdef";

pub struct Env {
    pub admin_url: String,
    host: String,
    port: u16,
    pg_bindir: PathBuf,
    /// target/release, where the API and worker binaries are.
    bin: PathBuf,
    pub http: reqwest::Client,
}

impl Env {
    pub async fn from_environment() -> Env {
        let admin_url = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL is not set: run the benchmark with `make bench`");
        let url = reqwest::Url::parse(&admin_url).expect("DATABASE_URL is a URL");
        let pg_bindir = std::env::var("TASKEXEC_PG_BINDIR")
            .map(PathBuf::from)
            .expect("TASKEXEC_PG_BINDIR is not set: run the benchmark with `make bench`");
        let bin = std::env::current_exe().unwrap().parent().unwrap().to_owned();
        Env {
            host: url.host_str().unwrap_or("127.0.0.1").to_owned(),
            port: url.port().unwrap_or(5432),
            admin_url,
            pg_bindir,
            bin,
            http: reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap(),
        }
    }

    /// A fresh, migrated database, so that no scenario inherits another's rows.
    pub async fn database(&self, name: &str) -> Database {
        let mut admin = PgConnection::connect(&self.admin_url).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.unwrap();
        let url = format!("postgres://postgres@{}:{}/{name}", self.host, self.port);
        let options = url.parse::<PgConnectOptions>().unwrap().application_name("bench");
        let pool = PgPoolOptions::new().max_connections(4).connect_with(options).await.unwrap();
        sqlx::migrate!("../migrations").run(&pool).await.expect("migrations apply");
        Database { name: name.to_owned(), url, pool }
    }

    /// The release API on a free port, healthy.
    pub async fn api(&self, db: &Database, extra_env: &[(&str, &str)]) -> Process {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut command = tokio::process::Command::new(self.bin.join("taskexec-api"));
        command
            .env_clear()
            .env("DATABASE_URL", &db.url)
            .env("AGENT_TOKEN", TOKEN)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            // The submit scenario queues far more than the default quota, without agents.
            .env("ROCKET_MAX_QUEUED_PER_OWNER", "1000000000")
            .env("SERVER_PORT", port.to_string())
            .env("ROCKET_ADDRESS", "127.0.0.1")
            .env("LOG_LEVEL", "error")
            .envs(extra_env.iter().copied())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn().expect("start the API");
        let url = format!("http://127.0.0.1:{port}");
        let admin = Api::new(&url, ADMIN_TOKEN, TOKEN);
        for _ in 0..600 {
            if let Ok(r) = self.http.get(format!("{url}/health")).send().await {
                if r.status() == 200 {
                    // Tasks are submitted as users submit them: with a submitter's token,
                    // verified (and cached) on every request, its quota checked.
                    let submitter = admin.token("bench", Role::Submitter).await;
                    let api = admin.as_user(&submitter);
                    return Process { api, url, children: vec![child] };
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the API never became healthy");
    }

    /// `count` release workers for `api`.
    pub fn workers(&self, api: &Process, count: usize, extra_env: &[(&str, &str)]) -> Process {
        self.workers_named(api, count, "bench", extra_env)
    }

    /// `count` release workers for `api`, named `{name}-0`, `{name}-1`, ...
    pub fn workers_named(
        &self,
        api: &Process,
        count: usize,
        name: &str,
        extra_env: &[(&str, &str)],
    ) -> Process {
        let children = (0..count)
            .map(|n| {
                tokio::process::Command::new(self.bin.join("taskexec-worker"))
                    .env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .env("BACKEND_API_URL", &api.url)
                    .env("AGENT_TOKEN", TOKEN)
                    .env("AGENT_NAME", format!("{name}-{n}"))
                    .env("POLL_INTERVAL", "1s")
                    .env("LOG_LEVEL", "error")
                    .envs(extra_env.iter().copied())
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("start a worker")
            })
            .collect();
        Process { url: api.url.clone(), api: api.api.clone(), children }
    }

    /// How many times per second the machine can run `sh -c true`, back to back with one
    /// spawner per core; when `guarded`, the agent's own path for a task `true`: a slot's guard
    /// (started once, as an agent keeps it) forks `sh -c true`, its output captured.
    pub async fn spawn_rate(&self, span: Duration, guarded: bool) -> f64 {
        let worker = self.bin.join("taskexec-worker");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let until = std::time::Instant::now() + span;
        let spawners: Vec<_> = (0..cores)
            .map(|_| {
                let worker = worker.clone();
                tokio::task::spawn_blocking(move || {
                    use taskexec_worker::{exec, isolation};
                    // No confinement: as a native agent without RUN_AS runs it.
                    let env = isolation::command_env(std::env::vars(), &[], None);
                    let slot = std::sync::Arc::new(exec::GuardSlot::new(worker, env.clone()));
                    let confinement = isolation::Confinement::default();
                    let spec = exec::Spec {
                        command: "true",
                        env: &env,
                        cap: taskexec_protocol::OutputCap::new(1024),
                        guard: Some(&slot),
                        confinement: &confinement,
                        workdir: None,
                    };
                    let mut spawned = 0u64;
                    while std::time::Instant::now() < until {
                        let ran = if guarded {
                            exec::run(&spec).exit == exec::Exit::Code(0)
                        } else {
                            std::process::Command::new("/bin/sh")
                                .args(["-c", "true"])
                                .status()
                                .expect("run sh")
                                .success()
                        };
                        assert!(ran);
                        spawned += 1;
                    }
                    spawned
                })
            })
            .collect();
        let mut total = 0;
        for spawner in spawners {
            total += spawner.await.unwrap();
        }
        total as f64 / span.as_secs_f64()
    }

    /// Runs pgbench with `script` on `db`: `clients` connections for `secs` seconds. Returns
    /// transactions per second.
    pub async fn pgbench(&self, db: &Database, script: &str, clients: usize, secs: u64) -> f64 {
        let path =
            std::env::temp_dir().join(format!("taskexec-bench-{}.sql", uuid::Uuid::new_v4()));
        std::fs::write(&path, script).unwrap();
        let output = tokio::process::Command::new(self.pg_bindir.join("pgbench"))
            .args(["-n", "-c", &clients.to_string(), "-j", &clients.min(2).to_string()])
            .args(["-T", &secs.to_string(), "-f", path.to_str().unwrap()])
            .args(["-h", &self.host, "-p", &self.port.to_string(), "-U", "postgres", &db.name])
            .output()
            .await
            .expect("run pgbench");
        let _ = std::fs::remove_file(&path);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "pgbench failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
            .lines()
            .find_map(|line| line.strip_prefix("tps = ")?.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no tps in pgbench output: {stdout}"))
    }
}

pub struct Database {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

/// CPU seconds (user + system) of the benchmark's PostgreSQL cluster: the postmaster and its
/// children, those that have exited included.
pub async fn postgres_cpu_seconds(db: &Database) -> f64 {
    let dir: String = sqlx::query_scalar("SHOW data_directory").fetch_one(&db.pool).await.unwrap();
    let pid_file = std::fs::read_to_string(format!("{dir}/postmaster.pid")).unwrap_or_default();
    let Some(postmaster) = pid_file.lines().next().and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return 0.0;
    };
    let mut total = cpu_of(postmaster, true);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(postmaster) {
            total += cpu_of(pid, false);
        }
    }
    total
}

/// CPU seconds the whole machine has spent busy (every core, every process) so far.
pub fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: f64 =
        ticks.iter().enumerate().filter(|(i, _)| ![3, 4].contains(i)).map(|(_, t)| t).sum();
    busy / clock_ticks()
}

/// The fields of /proc/<pid>/stat after the command name: state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit(')').next()?.split_whitespace().map(String::from).collect())
}

/// CPU seconds of `pid`, with those of its children it has waited for when `reaped`.
fn cpu_of(pid: u32, reaped: bool) -> f64 {
    let Some(fields) = stat_fields(pid) else { return 0.0 };
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    let own = field(11) + field(12);
    let children = if reaped { field(13) + field(14) } else { 0.0 };
    (own + children) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

impl Database {
    /// Starts counting statements afresh (pg_stat_statements, which the benchmark's cluster
    /// loads).
    pub async fn reset_statements(&self) {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&self.pool)
            .await
            .expect("pg_stat_statements is loaded (make bench starts PostgreSQL with it)");
        sqlx::query("SELECT pg_stat_statements_reset()").execute(&self.pool).await.unwrap();
    }

    /// Statements run in this database since the last reset by anyone but the benchmark.
    pub async fn api_statements(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements s
               JOIN pg_database d ON d.oid = s.dbid
              WHERE d.datname = $1 AND s.query NOT LIKE '%pg_stat%'",
        )
        .bind(&self.name)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// The `n` statements run most often since the last reset, by anyone but the benchmark:
    /// calls and the statement's first 100 characters.
    pub async fn top_statements(&self, n: i64) -> Vec<(i64, String)> {
        sqlx::query_as(
            "SELECT calls, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 100)
               FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
              WHERE d.datname = $1 AND s.query NOT LIKE '%pg_stat%'
              ORDER BY calls DESC LIMIT $2",
        )
        .bind(&self.name)
        .bind(n)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Server connections to this database, the benchmark's own pool excluded.
    pub async fn connections(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name <> 'bench'",
        )
        .bind(&self.name)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

/// Child processes (the API, or a set of workers), killed when dropped.
pub struct Process {
    pub url: String,
    /// The typed client of the API this process is (or serves).
    pub api: Api,
    children: Vec<tokio::process::Child>,
}

impl Process {
    fn pid(&self) -> u32 {
        self.children[0].id().expect("running")
    }

    /// CPU time used so far (user + system) by the first process, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_of(self.pid(), false)
    }

    /// CPU time used so far by every process and all its descendants (an agent's guards,
    /// which live from task to task, and their `sh`), in seconds: the live ones by their own
    /// figures, those already waited for through their parent's.
    pub fn cpu_seconds_with_children(&self) -> f64 {
        let roots = self.children.iter().filter_map(|c| c.id());
        let tree = roots.flat_map(|root| {
            let below = taskexec_worker::procs::descendants_of(root as libc::pid_t);
            std::iter::once(root).chain(below.into_iter().map(|(pid, _)| pid as u32))
        });
        tree.map(|pid| cpu_of(pid, true)).sum()
    }

    /// Resident memory, in MiB.
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
            .unwrap();
        kib / 1024.0
    }

    /// Asks every process to stop (SIGTERM) and waits up to 10 s each.
    pub async fn stop(mut self) {
        for child in &self.children {
            if let Some(pid) = child.id() {
                // SAFETY: signals our own child.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for child in &mut self.children {
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }
}

/// 1,000 parked polls need more than the usual 1,024 open files.
pub fn raise_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The machine, for the report: CPU model and count, memory, PostgreSQL version.
pub async fn describe_machine(env: &Env) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(str::trim))
        .unwrap_or("unknown CPU")
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let mut admin = PgConnection::connect(&env.admin_url).await.unwrap();
    let version: String =
        sqlx::query_scalar("SHOW server_version").fetch_one(&mut admin).await.unwrap();
    format!("{cores} × {model}, {mem_gib:.0} GiB, PostgreSQL {version} (fsync off)")
}
