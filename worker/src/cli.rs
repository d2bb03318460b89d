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
  PICK_WAIT                 how long the server may hold a pick [default: 25s]
  POLL_INTERVAL             pause after the API was unreachable [default: 5s]
  DRAIN_TIMEOUT             after SIGTERM, how long a running task may go on [default: 30s]
  LOG_LEVEL                 error, warn, info, debug or trace [default: info]

Signals: SIGTERM or SIGINT while idle exits at once; while a task runs, the first lets it
finish for DRAIN_TIMEOUT, then stops it and hands it back; a second kills it, hands it
back and exits.";

/// The taskexec executor agent: long-polls the API for tasks and runs each with `sh -c`
/// under a guard process, keeps its lease alive with heartbeats, streams its output and
/// reports how it ended. One task at a time; run more agents to run more at once.
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
    init_logging(config.log_level);
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

fn init_logging(level: log::LevelFilter) {
    let _ = fern::Dispatch::new()
        .format(|out, message, record| {
            out.finish(format_args!(
                "{} {:<5} {}: {}",
                humantime::format_rfc3339_millis(std::time::SystemTime::now()),
                record.level(),
                record.target(),
                message
            ))
        })
        .level(level)
        .level_for("ureq", log::LevelFilter::Warn)
        .level_for("ureq_proto", log::LevelFilter::Warn)
        .chain(std::io::stderr())
        .apply();
}
