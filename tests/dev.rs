//! `make dev` (scripts/dev) and the binaries' command lines: a Ctrl-C stops the agents first and
//! the API last, hands a running task back to the queue, and leaves no process behind.

use std::process::Stdio;
use std::time::Duration;

use taskexec_protocol::{TaskId, TaskStatus};
use taskexec_tests::{binary, is_alive, Api, TestDb, ADMIN_TOKEN, TOKEN};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

/// `scripts/dev` on a database of the test's own, in a process group of its own as a
/// terminal's foreground job would be, with its pids as it printed them.
struct Dev {
    child: tokio::process::Child,
    api: Api,
    pids: Vec<i32>,
    /// The submitter's token it printed.
    submitter: String,
    db: TestDb,
}

impl Dev {
    async fn start() -> Dev {
        let (mut dev, mut lines) = Dev::spawn().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while dev.pids.is_empty() || dev.submitter.is_empty() {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .expect("scripts/dev says it is running")
                .unwrap()
                .expect("scripts/dev ended early");
            if let Some(token) = line.strip_prefix("  submitter: ") {
                dev.submitter = token.to_owned();
            }
            if line.starts_with("taskexec is running") {
                let port = dev.api.base.rsplit(':').next().unwrap().parse::<i32>().unwrap();
                dev.pids = line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<i32>().ok())
                    .filter(|n| *n != port)
                    .collect();
            }
        }
        assert_eq!(dev.pids.len(), 3, "the API and two agents");
        dev.api.until_parked(2).await;
        dev
    }

    /// `scripts/dev` started, and its output's lines.
    async fn spawn() -> (Dev, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) {
        binary("taskexec-api");
        let db = TestDb::create().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/dev");
        let mut command = tokio::process::Command::new("bash");
        // A Ctrl-C must reach it even when the tests themselves were started in the background
        // by a shell, which leaves SIGINT ignored, and a non-interactive bash cannot trap a
        // signal ignored on entry.
        // SAFETY: signal() is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = command
            .arg(script)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", std::env::var("DATABASE_URL").unwrap())
            .env("DEV_DATABASE", &db.name)
            .env("SERVER_PORT", port.to_string())
            .env("AGENT_TOKEN", TOKEN)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("LOG_LEVEL", std::env::var("DEV_LOG").unwrap_or("warn".into()))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start scripts/dev");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let api = Api::new(&format!("http://127.0.0.1:{port}"), ADMIN_TOKEN, TOKEN);
        (Dev { child, api, pids: Vec::new(), submitter: String::new(), db }, lines)
    }

    /// SIGINT to the script's process group, as Ctrl-C in its terminal.
    fn interrupt(&self) {
        let group = self.child.id().unwrap() as i32;
        // SAFETY: signals the group of our own child.
        unsafe { libc::killpg(group, libc::SIGINT) };
    }

    /// A task that runs until it is stopped, running on one of the agents, submitted with the
    /// submitter's token that scripts/dev printed.
    async fn running_task(&self) -> TaskId {
        let task = self.api.as_user(&self.submitter).submit("sleep 120").await;
        assert_eq!(task.owner.as_deref(), Some("dev-submitter"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.api.get(task.id).await.unwrap().running_at.is_none() {
            assert!(Instant::now() < deadline, "the task never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.id
    }

    /// The task's status and attempts, from the database (the API has gone).
    async fn task_in_database(&self, id: TaskId) -> (TaskStatus, i32) {
        let pool = self.db.pool().await;
        let row: (String, i32) =
            sqlx::query_as("SELECT status::text, attempts FROM tasks WHERE id = $1")
                .bind(id.as_uuid())
                .fetch_one(&pool)
                .await
                .unwrap();
        (row.0.parse().unwrap(), row.1)
    }
}

async fn exits_within(dev: &mut Dev, limit: Duration) -> Duration {
    let started = Instant::now();
    let status = tokio::time::timeout(limit, dev.child.wait())
        .await
        .unwrap_or_else(|_| panic!("scripts/dev did not stop within {limit:?}"))
        .unwrap();
    assert!(status.success(), "scripts/dev exited with {status}");
    for pid in &dev.pids {
        assert!(!is_alive(*pid), "process {pid} outlived scripts/dev");
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_ctrl_c_during_a_task_stops_the_agents_then_the_api_and_requeues_the_task() {
    let mut dev = Dev::start().await;
    let id = dev.running_task().await;

    dev.interrupt();

    // DRAIN_TIMEOUT (5 s in dev), then the command's SIGTERM, the hand-back, the API's stop.
    let took = exits_within(&mut dev, Duration::from_secs(30)).await;
    println!("FIGURE make dev, one Ctrl-C with a running task: stopped after {took:?}");
    assert_eq!(dev.task_in_database(id).await, (TaskStatus::Queued, 0), "handed back");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_ctrl_c_hands_the_task_back_and_exits_at_once() {
    let mut dev = Dev::start().await;
    let id = dev.running_task().await;

    dev.interrupt();
    tokio::time::sleep(Duration::from_millis(200)).await;
    dev.interrupt();

    let took = exits_within(&mut dev, Duration::from_secs(5)).await;
    println!("FIGURE make dev, two Ctrl-C: stopped after {took:?}");
    assert_eq!(dev.task_in_database(id).await, (TaskStatus::Queued, 0), "handed back");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ctrl_c_while_starting_stops_what_was_started() {
    let (mut dev, mut lines) = Dev::spawn().await;
    while !lines.next_line().await.unwrap().expect("a line").starts_with("dev: database") {}

    dev.interrupt();

    exits_within(&mut dev, Duration::from_secs(20)).await;
    let port = dev.api.base.rsplit(':').next().unwrap().to_owned();
    let listening = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok();
    assert!(!listening, "the API outlived scripts/dev");
}

#[tokio::test(flavor = "multi_thread")]
async fn both_binaries_answer_help_and_version_without_starting() {
    for name in ["taskexec-api", "taskexec-worker"] {
        let help =
            std::process::Command::new(binary(name)).arg("--help").env_clear().output().unwrap();
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(help.status.success(), "{name} --help: {text}");
        for setting in ["AGENT_TOKEN", "LOG_LEVEL"] {
            assert!(text.contains(setting), "{name} --help does not mention {setting}: {text}");
        }
        let version =
            std::process::Command::new(binary(name)).arg("--version").env_clear().output().unwrap();
        let text = String::from_utf8_lossy(&version.stdout);
        assert!(version.status.success());
        assert_eq!(text.trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
        let wrong = std::process::Command::new(binary(name)).arg("--bogus").output().unwrap();
        assert_eq!(wrong.status.code(), Some(2), "{name} refuses an unknown argument");
    }
}
