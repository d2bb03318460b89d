//! The binary: the guard when asked for (see `guard`), `--help` and `--version`, else the
//! agent with its settings from the environment, its log, and its signals.

use std::process::ExitCode;

use clap::Parser;

use crate::{guard, Config, Stop, Worker};

const SETTINGS: &str = "\
Settings (environment variables):
  BACKEND_API_URL           the API; several comma-separated addresses are used in turn
                            [default: http://BACKEND_API_HOST:BACKEND_API_PORT]
  BACKEND_API_HOST, _PORT   the API in parts [default: localhost, 3500]
  BACKEND_API_CA_FILE       PEM certificates trusted besides the system's roots, for an
                            https:// API behind a private CA
  AGENT_TOKEN               the API's agent token (required), or
  AGENT_TOKEN_FILE          a file holding it (for Docker and Kubernetes secrets)
  AGENT_NAME                recorded on the tasks it runs [default: the host name]
  AGENT_TAGS                comma-separated tags, e.g. linux,gpu: the agent takes a task only
                            if these include all of the task's tags [default: none, so only
                            untagged tasks]
  PICK_WAIT                 how long the server may hold a pick [default: 25s]
  POLL_INTERVAL             pause after the API was unreachable [default: 5s]
  DRAIN_TIMEOUT             after SIGTERM, how long a running task may go on [default: 30s]
  CONCURRENCY               how many commands the agent runs at once, each in a slot with
                            its own lease [default: 1; at most 64; above 1 the API must
                            know GET /tasks/pick?max]
  LOG_FORMAT                text, or json for one JSON object per line [default: text]
  LOG_LEVEL                 error, warn, info, debug or trace [default: info]
  RUN_AS                    the user commands run as (a user of this agent's own: all its
                            processes are killed when a task ends); needs root, or
                            CAP_SETUID, CAP_SETGID and CAP_KILL [default: the agent's user];
                            with CONCURRENCY above 1, one user per slot: {slot} stands for
                            the slot's number from 0, as in taskexec-run-{slot}
  TASK_ENV_ALLOW            variables passed to commands besides PATH, HOME, LANG, LC_* and
                            TZ: comma-separated names or PREFIX_* patterns
  TASK_ENV_OVERRIDE         protected variables a task's env may set all the same (PATH,
                            HOME, USER, LOGNAME, SHELL, IFS, ENV, BASH_ENV, LD_*); a task
                            that sets another protected one fails without running
  TASK_MAX_PROCESSES        RLIMIT_NPROC of each command (per user: exact with RUN_AS)
  TASK_MAX_MEMORY           RLIMIT_AS of each process of a command, e.g. 2G
  TASK_MAX_OPEN_FILES       RLIMIT_NOFILE of each process of a command
  TASK_MAX_FILE_SIZE        RLIMIT_FSIZE: the largest file a command may write, e.g. 1G

Signals: SIGTERM or SIGINT while idle exits at once; while a task runs, the first lets it
finish for DRAIN_TIMEOUT, then stops it and hands it back; a second kills it, hands it
back and exits.";

/// The taskexec executor agent: long-polls the API for tasks and runs each with `sh -c`
/// under a guard process, keeps its lease alive with heartbeats, streams its output and
/// reports how it ended. CONCURRENCY tasks at a time (default 1).
#[derive(Parser)]
#[command(name = "taskexec-worker", version, after_help = SETTINGS)]
struct Args {}

pub fn main() -> ExitCode {
    if let Some(code) = guard::run_if_requested() {
        return code;
    }
    Args::parse();
    // Not dumpable: /proc/<pid>/environ and /proc/<pid>/mem of the agent become unreadable to
    // the commands it runs as the same user, so they cannot lift its token from there.
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) only changes this process's attributes.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("taskexec-worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config);
    if let Err(why) = isolate(&config) {
        log::error!("{why}");
        return ExitCode::FAILURE;
    }
    let stop = match Stop::on_signals() {
        Ok(stop) => stop,
        Err(e) => {
            log::error!("could not install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    Worker::new(config).run(&stop);
    ExitCode::SUCCESS
}

/// Makes the agent a subreaper (a dead guard's orphans come back to it, to be killed) and
/// checks that `RUN_AS` can work, killing what an earlier agent may have left of that user.
fn isolate(config: &Config) -> Result<(), String> {
    // SAFETY: prctl with these options only changes attributes of this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let confined =
        !config.run_as.is_empty() || config.limits != crate::isolation::Limits::default();
    if confined && std::env::current_exe().is_err() {
        return Err("RUN_AS and TASK_MAX_* need the guard (this binary), whose path cannot be \
                    found: refusing to run commands unconfined"
            .into());
    }
    let Some(first) = config.run_as.first() else {
        log::warn!("{}", crate::isolation::SHARED_USER_WARNING);
        if config.concurrency > 1 {
            log::warn!(
                "CONCURRENCY={} without RUN_AS: the commands of the slots run as one user, and \
                 each can read the others' environments and signal them (set \
                 RUN_AS=taskexec-run-{{slot}} to keep them apart)",
                config.concurrency
            );
        }
        return Ok(());
    };
    let missing = crate::isolation::missing_capabilities();
    if !missing.is_empty() {
        return Err(format!(
            "RUN_AS={} needs root or the capabilities {}: the agent has not got {}",
            first.name,
            "CAP_SETUID, CAP_SETGID and CAP_KILL",
            missing.join(", ")
        ));
    }
    for (slot, user) in config.run_as.iter().enumerate() {
        let left = crate::procs::sweep(crate::procs::Scope::User(user.uid));
        if left > 0 {
            log::warn!(
                "killed {left} processes of {} left from before this agent started",
                user.name
            );
        }
        log::info!("slot {slot}: commands run as {} (uid {})", user.name, user.uid);
    }
    Ok(())
}

/// Every line names the agent that wrote it (several agents often log to one place).
fn init_logging(config: &Config) {
    let (format, name) = (config.log_format, config.name.clone());
    let _ = fern::Dispatch::new()
        .format(move |out, message, record| {
            out.finish(format_args!("{}", format.line(record, message, &[("agent", &name)])))
        })
        .level(config.log_level)
        .level_for("ureq", log::LevelFilter::Warn)
        .level_for("ureq_proto", log::LevelFilter::Warn)
        .chain(std::io::stderr())
        .apply();
}
