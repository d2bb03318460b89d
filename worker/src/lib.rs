//! The taskexec executor agent: long-polls the API for a task, runs it with `sh -c`, reports
//! the result, and polls again at once. One task at a time.

use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use uuid::Uuid;

pub mod client;
pub mod config;
pub mod exec;
mod stop;

pub use client::{Assignment, Client, ClientError, Report};
pub use config::Config;
pub use stop::Stop;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("could not install signal handlers: {0}")]
    Signals(#[from] std::io::Error),
}

/// What one step of the loop did.
#[derive(Debug)]
pub enum Step {
    /// The pick ended without a task.
    Idle,
    /// A task ran; `recorded` says whether the API accepted its result.
    Ran { id: Uuid, recorded: bool },
    /// The pick failed; the loop pauses for `POLL_INTERVAL` before the next.
    Unavailable(ClientError),
}

pub struct Worker {
    config: Config,
    client: Client,
    /// The environment commands run with: the agent's, minus its secrets.
    env: Vec<(String, String)>,
}

impl Worker {
    pub fn new(config: Config) -> Worker {
        let client = Client::new(&config);
        Worker {
            config,
            client,
            env: exec::command_env(),
        }
    }

    /// One pick and, if a task came, its run and its report.
    pub fn run_once(&self, stop: &Stop) -> Step {
        let assignment = match self.client.pick() {
            Ok(Some(assignment)) => assignment,
            Ok(None) => return Step::Idle,
            Err(e) => return Step::Unavailable(e),
        };
        let _busy = stop.busy();
        log::info!(
            "task {}: picked (attempt {})",
            assignment.id,
            assignment.attempts
        );
        let report = self.execute(&assignment);
        let recorded = self.report(&assignment, &report);
        Step::Ran {
            id: assignment.id,
            recorded,
        }
    }

    fn execute(&self, assignment: &Assignment) -> Report {
        let started = std::time::Instant::now();
        let run = exec::run(&assignment.command, &self.env, self.config.max_output_bytes);
        let (stdout, stdout_lossy) = run.stdout.to_text();
        let (stderr, stderr_lossy) = run.stderr.to_text();
        let error = exec::describe(&run.exit);
        let exit_code = match run.exit {
            exec::Exit::Code(code) => Some(code),
            _ => None,
        };
        log::info!(
            "task {}: {} after {:.3}s",
            assignment.id,
            error.as_deref().map_or_else(
                || format!("exit code {}", exit_code.unwrap_or_default()),
                str::to_owned
            ),
            started.elapsed().as_secs_f64()
        );
        Report {
            lease: assignment.lease,
            exit_code,
            error,
            stdout,
            stderr,
            stdout_lossy,
            stderr_lossy,
        }
    }

    /// Sends the report until it is accepted or refused: a short outage of the API must not
    /// lose a result. Returns whether the API recorded it.
    fn report(&self, assignment: &Assignment, report: &Report) -> bool {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.client.finish(assignment.id, report) {
                Ok(()) => return true,
                Err(e) if e.is_retryable() => {
                    log::warn!(
                        "task {}: finish failed, retrying in about {delay:?}: {e}",
                        assignment.id
                    );
                    thread::sleep(jitter(delay));
                    delay = (delay * 2).min(self.config.poll_interval.max(delay));
                }
                Err(e) => {
                    log::warn!("task {}: result dropped: {e}", assignment.id);
                    return false;
                }
            }
        }
    }

    /// Picks and runs tasks until a signal asks it to stop.
    pub fn run(&self, stop: &Stop) {
        log::info!(
            "agent {:?} taking tasks from {}",
            self.config.name,
            self.config.api_url
        );
        while !stop.requested() {
            if let Step::Unavailable(e) = self.run_once(stop) {
                let pause = jitter(self.config.poll_interval);
                log::warn!("pick failed, next try in {:.1}s: {e}", pause.as_secs_f64());
                thread::sleep(pause);
            }
        }
        log::info!("stopped");
    }
}

/// `duration` scaled by a random factor in [0.5, 1.5), so that agents restarted together do
/// not retry in step.
pub fn jitter(duration: Duration) -> Duration {
    duration.mul_f64(0.5 + fastrand::f64())
}

/// The binary: configuration from the environment, logging, signals, the loop.
pub fn main() -> ExitCode {
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
            log::error!("{}", Error::from(e));
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
