//! A command against its agent: what a task can still reach, read, signal or leave behind.
//! Each test is an attack that worked before `RUN_AS`, the environment allowlist, the closed
//! descriptors, the limits and the sweep after each task. They need root, as CI runs them:
//! the agent drops each command to a user the test creates.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;

use std::time::Duration;
use taskexec_protocol::{Task, TaskStatus};

use taskexec_tests::{is_alive, is_root, until, TestApp, TestUser, WorkerProcess, TOKEN};

/// The six kinds of secret the name-based filter let through, each with a value to look for.
const SECRETS: [(&str, &str); 6] = [
    ("DB_PASS", "db-pass-value-7d1e"),
    ("APIKEY", "apikey-value-93ab"),
    ("AWS_ACCESS_KEY_ID", "AKIAVALUE5521"),
    ("SENTRY_DSN", "https://sentry-value-08@example.invalid/1"),
    ("REDIS_URL", "redis://:redis-password-value@cache:6379"),
    ("GITHUB_PAT", "ghp_patvalue4410"),
];

fn needs_root() -> bool {
    if !is_root() {
        eprintln!("skipped: the isolation tests run as root (CI does), to create users");
    }
    is_root()
}

/// The state letter of process `pid` (`R`, `S`, `T` for stopped, ...).
fn state_of(pid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')').next().unwrap_or("").split_whitespace().next().unwrap_or("").to_owned()
}

async fn run(app: &TestApp, command: &str) -> Task {
    let task = app.submit(command).await;
    app.until_done(task.id).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_cannot_read_its_agents_secrets_or_descriptors() {
    if !needs_root() {
        return;
    }
    let app = TestApp::spawn().await;
    let user = TestUser::create();
    let scratch = std::env::temp_dir().join(format!("taskexec-iso-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&scratch).unwrap();
    let token_file = scratch.join("agent-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A root-only file the agent's own parent left open, as a container's init may.
    let private = scratch.join("root-only");
    std::fs::write(&private, "root-only-content").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let leaked = std::fs::File::open(&private).unwrap();
    let leaked_fd = leaked.as_raw_fd();

    let mut env: Vec<(&str, &str)> = SECRETS.to_vec();
    env.extend([
        ("AGENT_TOKEN", ""),
        ("AGENT_TOKEN_FILE", token_file.to_str().unwrap()),
        ("RUN_AS", &user.name),
        ("TASK_ENV_ALLOW", "CI_*"),
        ("CI_JOB", "allowed-value"),
    ]);
    let worker = WorkerProcess::start_customized(&app, "isolated", &env, |command| {
        // SAFETY: dup2 is async-signal-safe; fd 7 is left without close-on-exec on purpose.
        unsafe {
            command.pre_exec(move || {
                libc::dup2(leaked_fd, 7);
                Ok(())
            });
        }
    });
    let agent = worker.pid();

    let reads = run(
        &app,
        &format!(
            "id -u; cat /proc/{agent}/environ; cat {token}; cat /proc/$PPID/environ; \
             cat /proc/{test}/environ; cat <&7; ls /proc/self/fd; env",
            token = token_file.display(),
            test = std::process::id()
        ),
    )
    .await;
    let stdout = reads.stdout.clone().unwrap_or_default();
    let stderr = reads.stderr.clone().unwrap_or_default();
    assert_eq!(stdout.lines().next(), Some(user.uid.to_string().as_str()), "{reads:?}");
    assert!(!stdout.contains(TOKEN), "the agent's token reached the command: {stdout}");
    assert!(!stdout.contains("root-only-content"), "fd 7 was inherited: {stdout}");
    for (name, value) in SECRETS {
        assert!(!stdout.contains(value), "{name} reached the command: {stdout}");
    }
    assert!(stdout.contains("CI_JOB=allowed-value"), "TASK_ENV_ALLOW lets CI_* through: {stdout}");
    assert!(stdout.contains("HOME=/nonexistent"), "the run-as user's home: {stdout}");
    let fds: Vec<&str> = stdout.lines().skip_while(|l| *l != "0").take(4).collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "only stdin, stdout, stderr and ls's own: {stdout}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(stderr.contains("Bad file descriptor"), "fd 7 is closed: {stderr}");
    drop(leaked);
    std::fs::remove_dir_all(&scratch).ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_cannot_kill_stop_or_signal_its_guard_or_agent() {
    if !needs_root() {
        return;
    }
    let app = TestApp::spawn().await;
    let user = TestUser::create();
    let worker = WorkerProcess::start(&app, "unkillable", &[("RUN_AS", &user.name)]);
    let agent = worker.pid();

    let attack = run(
        &app,
        &format!(
            "kill -9 $PPID || echo guard-kill-refused; kill -STOP {agent} || echo stop-refused; \
             setsid kill -TERM {agent} || echo term-refused; \
             (setsid sh -c 'kill -TERM {agent}' || echo setsid-refused) ; echo end"
        ),
    )
    .await;

    let stdout = attack.stdout.clone().unwrap_or_default();
    assert_eq!(attack.status, TaskStatus::Finished, "the guard survived: {attack:?}");
    for refused in ["guard-kill-refused", "stop-refused", "term-refused"] {
        assert!(stdout.contains(refused), "{refused}: {attack:?}");
    }
    assert!(stdout.contains("end"), "{attack:?}");
    assert!(is_alive(agent), "the agent is alive");
    assert_ne!(state_of(agent), "T", "the agent is not stopped");
    // And it still takes tasks.
    let next = run(&app, "echo next").await;
    assert_eq!(next.stdout.as_deref(), Some("next\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_of_a_task_outlives_it() {
    if !needs_root() {
        return;
    }
    let app = TestApp::spawn().await;
    let user = TestUser::create();
    let _worker = WorkerProcess::start(&app, "sweeper", &[("RUN_AS", &user.name)]);

    // A setsid escapee, a double fork and a daemon-like grandchild, each printing its pid.
    let escape = run(
        &app,
        "setsid sleep 300 & echo $!; (sleep 301 & echo $!); \
         (setsid sh -c 'sleep 302 & echo $!' &); sleep 0.2; echo done",
    )
    .await;
    assert_eq!(escape.exit_code, Some(0), "{escape:?}");
    let stdout = escape.stdout.clone().unwrap_or_default();
    let pids: Vec<i32> = stdout.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(pids.len(), 3, "{stdout}");
    for pid in &pids {
        assert!(!is_alive(*pid), "pid {pid} outlived its task");
    }
    assert_eq!(user.processes(), Vec::<i32>::new(), "no process of the run-as user is left");

    // A process of the run-as user that no task started is gone after the next task too.
    let mut stray = std::process::Command::new("runuser")
        .args(["-u", &user.name, "--", "sleep", "303"])
        .spawn()
        .unwrap();
    until(Duration::from_secs(10), "the stray runs as the user", || !user.processes().is_empty())
        .await;
    let after = run(&app, "true").await;
    assert_eq!(after.exit_code, Some(0));
    let status = stray.wait().unwrap();
    assert!(!status.success(), "the stray was killed");
    assert_eq!(user.processes(), Vec::<i32>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guard_killed_by_its_command_is_cleaned_up_and_reported() {
    // Without RUN_AS a command can still kill its guard: its processes then come back to the
    // agent (a subreaper), which kills them all before it reports the task failed.
    let app = TestApp::spawn().await;
    let _worker = WorkerProcess::start(&app, "guardless", &[]);
    let task = app
        .submit(
            "sleep 300 & echo $!; setsid sleep 301 & echo $!; sleep 0.1; kill -9 $PPID; sleep 302",
        )
        .await;
    let task = app.until_done(task.id).await;

    assert_eq!(task.status, TaskStatus::Failed, "{task:?}");
    let error = task.error.clone().unwrap_or_default();
    assert!(error.contains("guard ended before its processes"), "{error}");
    let stdout = task.stdout.clone().unwrap_or_default();
    let pids: Vec<i32> = stdout.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(pids.len(), 2, "{stdout}");
    for pid in pids {
        assert!(!is_alive(pid), "pid {pid} outlived its task");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_bound_a_fork_bomb_and_a_file_and_say_which_limit() {
    if !needs_root() {
        return;
    }
    let app = TestApp::spawn().await;
    let user = TestUser::create();
    let env = [
        ("RUN_AS", user.name.as_str()),
        ("TASK_MAX_PROCESSES", "10"),
        ("TASK_MAX_FILE_SIZE", "1M"),
    ];
    // Started with SIGXFSZ ignored (as Python and some supervisors leave it): the guard must
    // give the command default signals, or a write past the limit fails quietly instead.
    let _worker = WorkerProcess::start_customized(&app, "limited", &env, |command| {
        // SAFETY: signal() is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    });

    // Each `sleep &` that gets a process writes a line; those refused do not.
    let bomb = run(&app, "for i in $(seq 40); do (sleep 30 &) && echo forked; done; exit 1").await;
    let forked = bomb.stdout.clone().unwrap_or_default().lines().count();
    assert!((1..=10).contains(&forked), "{forked} processes under a limit of 10: {bomb:?}");
    let stderr = bomb.stderr.clone().unwrap_or_default();
    assert!(stderr.contains("TASK_MAX_PROCESSES=10"), "the error names the limit: {stderr}");
    assert_eq!(user.processes(), Vec::<i32>::new(), "and all of them are gone");

    let file = run(&app, "head -c 2M /dev/zero > /tmp/taskexec-fsize-$$; s=$?; rm -f /tmp/taskexec-fsize-$$; exit $s").await;
    assert_eq!(file.exit_code, Some(128 + libc::SIGXFSZ), "{file:?}");
    let stderr = file.stderr.clone().unwrap_or_default();
    assert!(stderr.contains("TASK_MAX_FILE_SIZE=1048576"), "the error names the limit: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_cwd_is_entered_as_the_commands_user_not_the_agents() {
    if !needs_root() {
        return;
    }
    let app = TestApp::spawn().await;
    let user = TestUser::create();
    let _worker = WorkerProcess::start(&app, "cwd-keeper", &[("RUN_AS", &user.name)]);
    // An open folder under one closed to everyone but root: the command's user cannot reach
    // it by its path, so it must not start in it either.
    let closed = std::env::temp_dir().join(format!("taskexec-closed-{}", uuid::Uuid::new_v4()));
    let inner = closed.join("open");
    std::fs::create_dir_all(&inner).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(inner.join("secret"), b"root's").unwrap();

    let task = taskexec_protocol::NewTask {
        cwd: Some(inner.display().to_string()),
        ..taskexec_protocol::NewTask::new("cat secret")
    };
    let id = app.create(&task).await.unwrap().id;
    let done = app.until_done(id).await;

    assert_ne!(done.exit_code, Some(0), "{done:?}");
    assert!(!done.stdout.as_deref().unwrap_or("").contains("root's"), "{done:?}");

    // A folder the user may enter: the command starts there.
    let open = std::env::temp_dir().join(format!("taskexec-open-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let task = taskexec_protocol::NewTask {
        cwd: Some(open.display().to_string()),
        ..taskexec_protocol::NewTask::new("pwd")
    };
    let done = app.until_done(app.create(&task).await.unwrap().id).await;
    assert_eq!(done.stdout.as_deref(), Some(format!("{}\n", open.display()).as_str()), "{done:?}");
    std::fs::remove_dir_all(&closed).unwrap();
    std::fs::remove_dir(&open).unwrap();
}
