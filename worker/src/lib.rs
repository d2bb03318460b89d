//! The taskexec executor agent: long-polls the API for a task, runs it with `sh -c` under a
//! guard, keeps its lease alive, reports the result, and polls again at once. One task at a
//! time.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use uuid::Uuid;

pub mod client;
pub mod config;
pub mod exec;
mod guard;
mod stop;
mod stream;
mod task;

pub use client::{Assignment, Client, ClientError, Report};
pub use config::Config;
pub use stop::Stop;
use stream::Streamer;
use task::{Ending, Supervision};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
}

/// What one step of the loop did.
#[derive(Debug)]
pub enum Step {
    /// The pick ended without a task.
    Idle,
    /// A task ran; `recorded` says whether the API accepted its result (or took it back).
    Ran { id: Uuid, recorded: bool },
    /// The pick failed; the loop pauses for `POLL_INTERVAL` before the next.
    Unavailable(ClientError),
}

pub struct Worker {
    config: Config,
    client: Arc<Client>,
    /// The environment commands run with: the agent's, minus its secrets.
    env: Vec<(String, String)>,
    /// This binary, which runs each command under its guard.
    guard: Option<PathBuf>,
}

impl Worker {
    pub fn new(config: Config) -> Worker {
        let client = Arc::new(Client::new(&config));
        let guard = std::env::current_exe().ok();
        Worker { config, client, env: exec::command_env(), guard }
    }

    /// One pick and, if a task came, its run and its report.
    pub fn run_once(&self, stop: &Stop) -> Step {
        let assignment = match self.client.pick() {
            Ok(Some(assignment)) => assignment,
            Ok(None) => return Step::Idle,
            Err(e) => return Step::Unavailable(e),
        };
        let (events, inbox) = mpsc::channel();
        let _busy = stop.busy(events.clone());
        log::info!("task {}: picked (attempt {})", assignment.id, assignment.attempts);
        let started = std::time::Instant::now();
        // Heartbeats go on until the report is in: a finish retried through an API outage
        // must not lose its lease meanwhile.
        let beating = Arc::new(AtomicBool::new(true));
        let (ending, streamer) = self.execute(&assignment, events, &inbox, &beating, stop);
        let recorded = self.conclude(&assignment, ending, streamer, started.elapsed());
        beating.store(false, Ordering::Release);
        Step::Ran { id: assignment.id, recorded }
    }

    fn execute(
        &self,
        assignment: &Assignment,
        events: mpsc::Sender<task::Event>,
        inbox: &mpsc::Receiver<task::Event>,
        beating: &Arc<AtomicBool>,
        stop: &Stop,
    ) -> (Ending, Option<Streamer>) {
        let spec = exec::Spec {
            command: &assignment.command,
            env: &self.env,
            // Capped as the server keeps it, so that both agree on what is dropped.
            max_output_bytes: assignment.max_output_bytes.unwrap_or(self.config.max_output_bytes),
            guard: self.guard.as_deref(),
        };
        let running = match exec::start(&spec) {
            Ok(running) => running,
            Err(e) => {
                let why = format!("could not start the command: {e}");
                let execution = exec::Execution::not_started(why, spec.max_output_bytes);
                return (Ending::Ran(execution), None);
            }
        };
        let (stop_uploads, uploader) =
            Streamer::new(self.client.clone(), assignment, running.buffers()).spawn();
        stop.command_group(running.group());
        // The first heartbeat goes out as soon as the command runs: the server records when
        // it started, and an abort reaches the agent from then on.
        task::heartbeat(self.client.clone(), assignment, events.clone(), beating.clone());
        running.on_exit(move |exit| {
            let _ = events.send(task::Event::Exited(exit));
        });
        let settings = Supervision { drain_timeout: self.config.drain_timeout };
        let ending = task::supervise(running, assignment, inbox, &settings);
        drop(stop_uploads);
        (ending, uploader.join().ok())
    }

    /// Tells the API how the attempt ended. Returns whether it took note.
    fn conclude(
        &self,
        assignment: &Assignment,
        ending: Ending,
        streamer: Option<Streamer>,
        took: Duration,
    ) -> bool {
        let id = assignment.id;
        let (execution, error, aborted) = match ending {
            Ending::Ran(execution) => {
                let error = exec::describe(&execution.exit);
                (execution, error, false)
            }
            Ending::TimedOut(execution) => {
                let error = format!("timed out after {} s", assignment.timeout_secs);
                (execution, Some(error), false)
            }
            Ending::Aborted(execution) => {
                (execution, Some("aborted at a user's request".to_owned()), true)
            }
            Ending::Fenced(why) => {
                log::warn!("task {id}: stopped and dropped: {why}");
                return false;
            }
            Ending::Released => {
                log::info!("task {id}: handing it back to the queue");
                return self.retry(id, "release", || self.client.release(id, assignment.lease));
            }
        };
        let exit_code = match (&execution.exit, &error) {
            (exec::Exit::Code(code), None) => Some(*code),
            _ => None,
        };
        let (stdout, stdout_lossy) = execution.stdout.to_text();
        let (stderr, stderr_lossy) = execution.stderr.to_text();
        let (stdout_bytes, stderr_bytes) = (execution.stdout.total(), execution.stderr.total());
        let stdout_truncated = execution.stdout.dropped() > 0;
        let stderr_truncated = execution.stderr.dropped() > 0;
        log::info!(
            "task {id}: {} after {:.3}s",
            error.clone().unwrap_or_else(|| format!("exit code {}", exit_code.unwrap_or_default())),
            took.as_secs_f64()
        );
        let mut report = Report {
            lease: assignment.lease,
            exit_code,
            error,
            stdout,
            stderr,
            stdout_lossy,
            stderr_lossy,
            aborted,
            stdout_bytes: Some(stdout_bytes),
            stderr_bytes: Some(stderr_bytes),
            stdout_truncated,
            stderr_truncated,
        };
        let mut streamer = streamer;
        let lengths = [stdout_bytes, stderr_bytes];
        self.retry(id, "finish", || {
            // The rest of the output first, up to what the report states.
            if let Some(streamer) = &mut streamer {
                streamer.send_due(Some(lengths))?;
                if !streamer.uploaded() {
                    // The API would not take the output: the finish then states no lengths.
                    report.stdout_bytes = None;
                    report.stderr_bytes = None;
                }
            }
            let sent = self.client.finish(id, &report);
            match &sent {
                Err(ClientError::Refused { status: 413, .. }) => {
                    // The API takes less output than this agent keeps: send less.
                    report.shrink_output();
                }
                Err(ClientError::OutputIncomplete { stdout, stderr }) => {
                    if let Some(streamer) = &mut streamer {
                        streamer.rewind(*stdout, *stderr);
                    }
                }
                _ => {}
            }
            sent
        })
    }

    /// Sends a report until it is accepted, or the API says the attempt is no longer ours
    /// (409) or the task is gone (404): an API outage, a rejected token during a rollout, or
    /// any other refusal must not lose a result. Returns whether the API accepted it.
    fn retry(
        &self,
        id: Uuid,
        what: &str,
        mut call: impl FnMut() -> Result<(), ClientError>,
    ) -> bool {
        let mut delay = Duration::from_millis(200);
        loop {
            match call() {
                Ok(()) => return true,
                Err(e) if e.is_final() => {
                    log::warn!("task {id}: {what} refused, result dropped: {e}");
                    return false;
                }
                Err(e) => {
                    log::warn!("task {id}: {what} failed, retrying in about {delay:?}: {e}");
                    thread::sleep(jitter(delay));
                    delay = (delay * 2).min(self.config.poll_interval.max(delay));
                }
            }
        }
    }

    /// Picks and runs tasks until a signal asks it to stop.
    pub fn run(&self, stop: &Stop) {
        let urls = self.config.api_urls.join(", ");
        log::info!("agent {:?} taking tasks from {urls}", self.config.name);
        while !stop.requested() {
            match self.run_once(stop) {
                Step::Unavailable(e) => {
                    let pause = jitter(self.config.poll_interval);
                    log::warn!("pick failed, next try in {:.1}s: {e}", pause.as_secs_f64());
                    thread::sleep(pause);
                }
                // Without a long poll (the original design), a pick every poll interval.
                _ if self.config.pick_wait.is_zero() => thread::sleep(self.config.poll_interval),
                _ => {}
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

/// The binary: the guard when asked for, else configuration from the environment, logging,
/// signals, the loop.
pub fn main() -> ExitCode {
    if let Some(code) = guard::run_if_requested() {
        return code;
    }
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
