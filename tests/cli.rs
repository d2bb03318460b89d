//! The `taskexec` command line, as a user runs it: the real binary against a real API and a
//! real agent. Each test has its own API, database and home folder (so no config file of the
//! machine's user leaks in), and drives the binary by its arguments, stdin and signals.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use taskexec_protocol::{AgentInfo, Role, Task, TaskId, TaskPage, TaskStatus};
use taskexec_tests::{binary, is_alive, TestApp, TestCa, WorkerProcess, ADMIN_TOKEN};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// A home folder of the test's own (its config file lives there), removed when dropped.
struct Home {
    dir: PathBuf,
}

impl Home {
    fn new() -> Home {
        let dir = std::env::temp_dir().join(format!("taskexec-cli-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Home { dir }
    }

    /// `taskexec` with only this home: no URL, no token.
    fn bare(&self) -> Command {
        let mut command = Command::new(binary("taskexec"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            .env("XDG_CONFIG_HOME", self.config_home())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// `taskexec` pointed at `app` with the admin token, through the environment.
    fn taskexec(&self, app: &TestApp) -> Command {
        let mut command = self.bare();
        command.env("TASKEXEC_URL", &app.url).env("TASKEXEC_TOKEN", ADMIN_TOKEN);
        command
    }

    fn config_home(&self) -> PathBuf {
        self.dir.join("config")
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `command` to its end (at most a minute) with its output captured.
async fn output(command: &mut Command, args: &[&str]) -> Output {
    let running = command.args(args).output();
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .unwrap_or_else(|_| panic!("taskexec {args:?} did not end within a minute"))
        .expect("run taskexec")
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("UTF-8")
}

#[tokio::test(flavor = "multi_thread")]
async fn run_prints_the_commands_stdout_and_stderr_apart_and_exits_with_its_code() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();

    let ran = output(
        &mut home.taskexec(&app),
        &["run", "--", "sh", "-c", "echo out; echo err >&2; exit 7"],
    )
    .await;

    assert_eq!(text(&ran.stdout), "out\n");
    assert_eq!(text(&ran.stderr), "err\n");
    assert_eq!(ran.status.code(), Some(7));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_words_after_the_dashes_reach_the_shell_as_they_were_given() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();
    let words = ["a  b", "it's", "$HOME", "*", "; exit 3"];

    let mut args = vec!["run", "--", "printf", "%s|\\n"];
    args.extend(words);
    let ran = output(&mut home.taskexec(&app), &args).await;

    assert_eq!(text(&ran.stdout), "a  b|\nit's|\n$HOME|\n*|\n; exit 3|\n");
    assert_eq!(ran.status.code(), Some(0), "{}", text(&ran.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn words_the_shell_would_take_for_syntax_reach_the_command_as_they_were_given() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();

    let ran = output(
        &mut home.taskexec(&app),
        &["run", "--", "printf", "%s|\\n", "", "!", "{a,b}", "it's", "if", "}", "x=1"],
    )
    .await;

    assert_eq!(text(&ran.stdout), "|\n!|\n{a,b}|\nit's|\nif|\n}|\nx=1|\n");
    assert_eq!(ran.status.code(), Some(0), "{}", text(&ran.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_first_word_that_the_shell_would_take_for_syntax_is_run_as_the_command() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();

    // Bare, `! true` would be a negated `true` (exit 1) and `x=1 echo ran` an assignment
    // before `echo`; as words, each is a command that does not exist, as it would be here.
    let negation = output(&mut home.taskexec(&app), &["run", "--", "!", "true"]).await;
    let assignment = output(&mut home.taskexec(&app), &["run", "--", "x=1", "echo", "ran"]).await;

    assert_eq!(negation.status.code(), Some(127), "{}", text(&negation.stderr));
    assert_eq!(assignment.status.code(), Some(127), "{}", text(&assignment.stderr));
    assert!(assignment.stdout.is_empty(), "{}", text(&assignment.stdout));
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_output_comes_through_byte_exact_from_run_and_then_from_logs() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();
    // Every byte value, as octal escapes of printf: 1,500 times on stdout (384,000 bytes, more
    // than one read of the API's 256 KiB), once backwards on stderr.
    let every_byte: Vec<u8> = (0..=255).collect();
    let escaped = |bytes: &[u8]| bytes.iter().map(|b| format!("\\{b:03o}")).collect::<String>();
    let backwards: Vec<u8> = every_byte.iter().rev().copied().collect();
    let script = format!(
        "i=0; while [ $i -lt 1500 ]; do printf '{}'; i=$((i+1)); done; printf '{}' >&2",
        escaped(&every_byte),
        escaped(&backwards)
    );

    let ran = output(&mut home.taskexec(&app), &["run", "--", "sh", "-c", &script]).await;
    let id = app.list("").await.unwrap().tasks[0].id.to_string();
    let logs = output(&mut home.taskexec(&app), &["logs", &id]).await;
    let stdout_alone = output(&mut home.taskexec(&app), &["logs", &id, "--stream", "stdout"]).await;

    assert_eq!(ran.status.code(), Some(0));
    let expected = every_byte.repeat(1500);
    assert!(ran.stdout == expected, "stdout differs: {} bytes of {}", ran.stdout.len(), 384_000);
    assert_eq!(ran.stderr, backwards);
    assert!(logs.stdout == expected && logs.stderr == backwards, "logs gives the same bytes");
    assert!(stdout_alone.stdout == expected && stdout_alone.stderr.is_empty());
}

/// `taskexec run -- sh -c SCRIPT`, once the CLI has printed the script's first line (`started`):
/// the command runs, and the CLI streams it. The child's stderr is piped.
async fn run_started(home: &Home, app: &TestApp, script: &str) -> Child {
    let mut run = home
        .taskexec(app)
        .args(["run", "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("started"));
    run
}

fn interrupt(child: &Child) {
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id().expect("running") as i32, libc::SIGINT) };
}

async fn exited(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    tokio::time::timeout(within, child.wait()).await.expect("the CLI exits in time").unwrap()
}

async fn rest_of(stderr: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut text = String::new();
    BufReader::new(stderr).read_to_string(&mut text).await.unwrap();
    text
}

/// A named pipe in `home`: a task that reads it waits until the test writes to it.
fn fifo(home: &Home) -> PathBuf {
    let path = home.dir.join("gate");
    let made = std::process::Command::new("mkfifo").arg(&path).status().expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", path.display());
    path
}

/// Writes `line` to the named pipe, once the task has opened it to read.
async fn release(fifo: &Path, line: &str) {
    let written = tokio::fs::write(fifo, format!("{line}\n"));
    tokio::time::timeout(Duration::from_secs(30), written)
        .await
        .expect("the task opens the pipe within 30 s")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_run_cancels_the_remote_task_and_leaves_no_process_on_the_agent() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();
    let pid_file = home.dir.join("sleep.pid");
    let script = format!("sleep 300 & echo $! > {}; echo started; wait", pid_file.display());
    let mut run = run_started(&home, &app, &script).await;
    let sleeper: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    let task = app.list("").await.unwrap().tasks.remove(0);
    assert_eq!(task.status, TaskStatus::InProgress);

    interrupt(&run);
    let status = exited(&mut run, Duration::from_secs(30)).await;

    assert_eq!(status.code(), Some(130));
    let task = app.get(task.id).await.unwrap();
    assert_eq!(task.status, TaskStatus::Cancelled, "the CLI exits once the task has ended");
    assert!(!is_alive(sleeper), "the command's processes are gone with the task");
    let stderr = rest_of(run.stderr.take().unwrap()).await;
    assert!(stderr.contains(&format!("aborting task {}", task.id)), "{stderr}");
    assert!(stderr.ends_with("was cancelled by admin\n"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_ctrl_c_stops_waiting_for_a_task_whose_agent_does_not_answer() {
    let app = TestApp::spawn().await;
    let agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();
    let mut run = run_started(&home, &app, "echo started; sleep 300").await;
    let task = app.list("").await.unwrap().tasks.remove(0);
    agent.signal(libc::SIGSTOP);
    let mut stderr = BufReader::new(run.stderr.take().unwrap());

    interrupt(&run);
    let mut first = String::new();
    stderr.read_line(&mut first).await.unwrap();
    interrupt(&run);
    let status = exited(&mut run, Duration::from_secs(10)).await;

    assert_eq!(
        first,
        format!("taskexec: aborting task {} (Ctrl-C again to stop waiting)\n", task.id)
    );
    assert_eq!(status.code(), Some(130));
    let rest = rest_of(stderr).await;
    assert!(rest.contains("stopped waiting"), "{rest}");
    assert!(!rest.contains("not confirmed"), "{rest}");
    let task = app.get(task.id).await.unwrap();
    assert_eq!(task.status, TaskStatus::InProgress, "not ended");
    assert!(task.abort_requested_at.is_some(), "the first Ctrl-C's abort reached the API");
    // The agent wakes and stops the command, so that nothing outlives the test.
    agent.signal(libc::SIGCONT);
    let _ = app.abort(task.id).await;
    assert_eq!(app.until_done(task.id).await.status, TaskStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_whose_output_reader_goes_aborts_the_task_and_exits_141_at_once() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();
    let mut run = home
        .taskexec(&app)
        .args(["run", "--", "yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = tokio::spawn(rest_of(run.stderr.take().unwrap()));

    // `taskexec run -- yes | head -c 10`: the reader takes 10 bytes and goes.
    let mut stdout = run.stdout.take().unwrap();
    let mut first = [0; 10];
    stdout.read_exact(&mut first).await.unwrap();
    drop(stdout);
    let status = exited(&mut run, Duration::from_secs(30)).await;

    assert_eq!(&first, b"y\ny\ny\ny\ny\n");
    assert_eq!(status.code(), Some(141), "{}", stderr.await.unwrap());
    let id = app.list("").await.unwrap().tasks[0].id;
    let ended = tokio::time::timeout(Duration::from_secs(30), app.until_done(id))
        .await
        .expect("the task ends within 30 s");
    assert_eq!(ended.status, TaskStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_streams_a_running_tasks_output_until_its_end() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();
    let gate = fifo(&home);
    let task =
        app.submit(&format!("echo first; read line < {}; echo \"$line\"", gate.display())).await;
    let mut logs = home
        .taskexec(&app)
        .args(["logs", "-f", &task.id.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(logs.stdout.take().unwrap()).lines();

    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    let running = app.get(task.id).await.unwrap().status;
    release(&gate, "second").await;
    let rest = tokio::time::timeout(Duration::from_secs(30), async {
        let mut rest = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push(line);
        }
        rest
    })
    .await
    .expect("the output ends with the task");
    let status = exited(&mut logs, Duration::from_secs(30)).await;

    assert_eq!(first.expect("the first line within 30 s").unwrap().as_deref(), Some("first"));
    assert_eq!(running, TaskStatus::InProgress, "the first line came while the task ran");
    assert_eq!(rest, ["second"]);
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn get_wait_returns_the_task_once_it_has_ended() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();
    let gate = fifo(&home);
    let task = app.submit(&format!("read line < {}; echo \"$line\"", gate.display())).await;
    let waiting = home
        .taskexec(&app)
        .args(["get", &task.id.to_string(), "--wait", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The CLI's long poll is held by the API before the task is let go.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.health().await.unwrap()["parked_waits"] != 1 {
        assert!(Instant::now() < deadline, "the CLI's wait was not held within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release(&gate, "released").await;
    let got = tokio::time::timeout(Duration::from_secs(30), waiting.wait_with_output())
        .await
        .expect("get --wait returns within 30 s of the end")
        .unwrap();

    assert_eq!(got.status.code(), Some(0), "{}", text(&got.stderr));
    let got: Task = serde_json::from_slice(&got.stdout).expect("a task");
    assert_eq!((got.status, got.stdout.as_deref()), (TaskStatus::Finished, Some("released\n")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_task_exits_125_with_its_reason_on_stderr() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();

    let ran =
        output(&mut home.taskexec(&app), &["run", "--timeout", "1s", "--", "sleep", "30"]).await;

    assert_eq!(ran.status.code(), Some(125));
    let stderr = text(&ran.stderr);
    assert!(
        stderr.starts_with("taskexec: task ") && stderr.ends_with(" failed: timed out after 1 s\n"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn detach_prints_the_task_id_and_returns_and_abort_cancels_it() {
    let app = TestApp::spawn().await;
    let home = Home::new();

    let detached =
        output(&mut home.taskexec(&app), &["run", "--detach", "--tag", "gpu", "--", "echo", "hi"])
            .await;
    let id: TaskId = text(&detached.stdout).trim_end().parse().expect("the id, alone");
    let queued = app.get(id).await.unwrap();
    let aborted = output(&mut home.taskexec(&app), &["abort", &id.to_string()]).await;

    assert_eq!(detached.status.code(), Some(0));
    assert_eq!((queued.status, queued.command.as_str()), (TaskStatus::Queued, "echo hi"));
    assert_eq!(queued.options.tags, ["gpu"]);
    assert_eq!(aborted.status.code(), Some(0));
    assert_eq!(text(&aborted.stdout), format!("task {id} cancelled\n"));
    assert_eq!(app.get(id).await.unwrap().status, TaskStatus::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_output_is_the_apis_own_shapes_for_run_get_logs_ls_and_agents() {
    let app = TestApp::spawn().await;
    let _agent = WorkerProcess::start(&app, "cli-agent", &[]);
    let home = Home::new();

    let ran = output(&mut home.taskexec(&app), &["run", "-o", "json", "--", "echo", "hi"]).await;
    let ran: Task = serde_json::from_slice(&ran.stdout).expect("run: a task");
    let id = ran.id.to_string();
    let newer = app.submit("true").await;
    let got = output(&mut home.taskexec(&app), &["get", &id, "--output", "json"]).await;
    let logged = output(&mut home.taskexec(&app), &["logs", &id, "-o", "json"]).await;
    let listed =
        output(&mut home.taskexec(&app), &["ls", "--all", "--limit", "1", "-o", "json"]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let agents = loop {
        // The registry writes its sightings every 2 s or so: wait for this agent's.
        let agents = output(&mut home.taskexec(&app), &["agents", "-o", "json"]).await;
        let agents: Vec<AgentInfo> = serde_json::from_slice(&agents.stdout).expect("agents");
        if !agents.is_empty() {
            break agents;
        }
        assert!(Instant::now() < deadline, "the agent was not listed within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    assert_eq!(
        (ran.status, ran.exit_code, ran.stdout.as_deref()),
        (TaskStatus::Finished, Some(0), Some("hi\n"))
    );
    let got: Task = serde_json::from_slice(&got.stdout).expect("get: a task");
    assert_eq!(got, app.get(ran.id).await.unwrap());
    let logged: Task = serde_json::from_slice(&logged.stdout).expect("logs: the task");
    assert_eq!(logged, got);
    let listed: TaskPage = serde_json::from_slice(&listed.stdout).expect("ls: a page");
    assert_eq!(listed.tasks.iter().map(|t| t.id).collect::<Vec<_>>(), [newer.id, ran.id]);
    assert_eq!(listed.next, None, "--all follows every page");
    assert_eq!(agents[0].name, "cli-agent");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_or_revoked_token_fails_with_exit_1_and_one_line_that_says_what_to_do() {
    let app = TestApp::spawn().await;
    let home = Home::new();
    let created = output(
        &mut home.taskexec(&app),
        &["token", "create", "--name", "leaver", "--role", "reader"],
    )
    .await;
    let secret = text(&created.stdout).trim_end().to_owned();
    let info = app.tokens().await.unwrap().into_iter().find(|t| t.name == "leaver").unwrap();
    let revoked =
        output(&mut home.taskexec(&app), &["token", "revoke", &info.id.to_string()]).await;
    assert_eq!((created.status.code(), revoked.status.code()), (Some(0), Some(0)));

    let unknown =
        output(home.taskexec(&app).env("TASKEXEC_TOKEN", "tex_not-a-token"), &["ls"]).await;
    let refused = output(home.taskexec(&app).env("TASKEXEC_TOKEN", &secret), &["ls"]).await;

    for failed in [unknown, refused] {
        assert_eq!(failed.status.code(), Some(1));
        assert!(failed.stdout.is_empty());
        assert_eq!(
            text(&failed.stderr),
            "taskexec: 401 Unauthorized: the token is unknown, revoked or expired; run taskexec login\n"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_api_behind_a_private_ca_is_trusted_with_ca_file_and_refused_without() {
    let ca = TestCa::new();
    let app = TestApp::spawn_tls(&ca).await;
    let home = Home::new();
    let ca_file = ca.ca().display().to_string();

    let trusted = output(&mut home.taskexec(&app), &["ls", "--ca-file", &ca_file]).await;
    let refused = output(&mut home.taskexec(&app), &["ls"]).await;
    let started = Instant::now();
    let waited =
        output(&mut home.taskexec(&app), &["get", &uuid::Uuid::new_v4().to_string(), "--wait"])
            .await;

    assert_eq!(trusted.status.code(), Some(0), "{}", text(&trusted.stderr));
    assert_eq!(refused.status.code(), Some(1));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.starts_with(&format!("taskexec: cannot reach the API at {}", app.url)),
        "{stderr}"
    );
    assert!(stderr.ends_with("(a private CA goes in --ca-file)\n"), "{stderr}");
    assert_eq!(waited.status.code(), Some(1), "a refused certificate is not retried");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_file_that_cannot_be_read_is_only_warned_about_when_the_environment_has_all() {
    let app = TestApp::spawn().await;
    let home = Home::new();
    let folder = home.config_home().join("taskexec");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("config.toml"), "not = [toml").unwrap();

    let given = output(&mut home.taskexec(&app), &["ls"]).await;
    let needed = output(home.bare().env("TASKEXEC_URL", &app.url), &["ls"]).await;

    assert_eq!(given.status.code(), Some(0), "{}", text(&given.stderr));
    assert!(text(&given.stderr).starts_with("taskexec: warning: "), "{}", text(&given.stderr));
    assert_eq!(needed.status.code(), Some(1));
    assert!(text(&needed.stderr).contains("config.toml"), "{}", text(&needed.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn login_keeps_a_checked_token_in_a_private_file_that_later_commands_use() {
    let app = TestApp::spawn().await;
    let home = Home::new();
    let token = app.token("cli-user", Role::Submitter).await;
    let login = |token: String| {
        let mut command = home.bare();
        command
            .env("TASKEXEC_URL", &app.url)
            .arg("login")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        async move {
            let mut child = command.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(format!("{token}\n").as_bytes()).await.unwrap();
            drop(stdin);
            child.wait_with_output().await.unwrap()
        }
    };
    let file = home.config_home().join("taskexec").join("config.toml");

    let refused = login("tex_not-a-token".into()).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stderr));
    assert!(!file.exists(), "a refused token is not kept");
    let accepted = login(token.clone()).await;
    let listed = output(&mut home.bare(), &["ls"]).await;

    assert_eq!(accepted.status.code(), Some(0), "{}", text(&accepted.stderr));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only its owner may read the token");
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(saved.contains(&token) && saved.contains(&app.url), "{saved}");
    assert_eq!(listed.status.code(), Some(0), "{}", text(&listed.stderr));
}
