//! The taskexec executor agent: long-polls the API for a task, runs it with `sh -c` under a
//! guard, keeps its lease alive, reports the result, and polls again at once. One task at a
//! time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use isolation::Confinement;
use taskexec_protocol::{Assignment, FinishReport, OutputCap, TaskId};

mod capture;
pub mod cli;
pub mod client;
pub mod config;
pub mod exec;
mod guard;
pub mod isolation;
mod procs;
mod stop;
mod stream;
mod task;

pub use client::{Attempt, Client, ClientError};
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
    Ran { id: TaskId, recorded: bool },
    /// The pick failed; the loop pauses for `POLL_INTERVAL` before the next.
    Unavailable(ClientError),
}

pub struct Worker {
    config: Config,
    client: Arc<Client>,
    /// The environment commands run with: the agent's variables that `TASK_ENV_ALLOW` and the
    /// few every command needs let through.
    env: Vec<(String, String)>,
    /// This binary, which runs each command under its guard.
    guard: Option<PathBuf>,
    /// The user and limits the guard gives each command.
    confinement: Confinement,
}

impl Worker {
    pub fn new(config: Config) -> Worker {
        let client = Arc::new(Client::new(&config));
        let guard = std::env::current_exe().ok();
        let env =
            isolation::command_env(std::env::vars(), &config.env_allow, config.run_as.as_ref());
        let confinement = Confinement::new(config.run_as.as_ref(), config.limits);
        Worker { config, client, env, guard, confinement }
    }

    /// One pick and, if a task came, its run and its report.
    pub fn run_once(&self, stop: &Stop) -> Step {
        let assignment = match self.client.pick() {
            Ok(Some(assignment)) => assignment,
            Ok(None) => return Step::Idle,
            Err(e) => return Step::Unavailable(e),
        };
        let attempt = Attempt::new(self.client.clone(), &assignment);
        let (events, inbox) = mpsc::channel();
        let id = attempt.task;
        let Some(busy) = stop.busy(events.clone()) else {
            // Exiting on a signal that came while the pick was answered: hand the task back
            // unstarted (if the exit comes first, the server refunds the pick after its
            // confirmation window; either way it runs once, elsewhere).
            let _ = attempt.release(self.config.drain_timeout);
            return Step::Idle;
        };
        log::info!("task {id}: picked (attempt {})", assignment.task.attempts);
        let started = Instant::now();
        // Heartbeats go on until the report is in: a finish retried through an API outage
        // must not lose its lease meanwhile.
        let beating = Arc::new(AtomicBool::new(true));
        let (ending, streamer) =
            self.execute(&assignment, &attempt, (events, &inbox), &beating, &busy);
        busy.reporting();
        let recorded = self.conclude(&attempt, &assignment, ending, streamer, started, stop);
        beating.store(false, Ordering::Release);
        Step::Ran { id, recorded }
    }

    fn execute(
        &self,
        assignment: &Assignment,
        attempt: &Attempt,
        (events, inbox): (mpsc::Sender<task::Event>, &mpsc::Receiver<task::Event>),
        beating: &Arc<AtomicBool>,
        busy: &stop::Busy<'_>,
    ) -> (Ending, Option<Streamer>) {
        let options = &assignment.task.options;
        let cap = OutputCap::new(assignment.terms.max_output_bytes as usize);
        // The task's directory, else the run-as user's home: the agent's own folder may be
        // closed to it.
        let workdir = match &options.cwd {
            Some(cwd) => Some(PathBuf::from(cwd)),
            None => self.config.run_as.as_ref().map(isolation::RunAs::workdir),
        };
        let missing = options.cwd.as_ref().filter(|cwd| !Path::new(cwd).is_dir());
        let env = match missing {
            Some(cwd) => Err(format!(
                "could not start the command: the working directory {cwd:?} does not exist on \
                 agent {:?}",
                self.config.name
            )),
            None => isolation::with_task_env(&self.env, &options.env, &self.config.env_override),
        };
        let env = match env {
            Ok(env) => env,
            Err(why) => return (Ending::Ran(exec::Execution::not_started(why, cap)), None),
        };
        let spec = exec::Spec {
            command: &assignment.task.command,
            env: &env,
            // Capped as the server keeps it, so that both agree on what is dropped.
            cap,
            guard: self.guard.as_deref(),
            confinement: &self.confinement,
            workdir: workdir.as_deref(),
        };
        let running = match exec::start(&spec) {
            Ok(running) => running,
            Err(e) => {
                let why = format!("could not start the command: {e}");
                return (Ending::Ran(exec::Execution::not_started(why, spec.cap)), None);
            }
        };
        let (stop_uploads, uploader) = Streamer::new(attempt.clone(), running.buffers()).spawn();
        busy.command_group(running.group());
        // The first heartbeat goes out as soon as the command runs: the server records when
        // it started, and an abort reaches the agent from then on.
        task::heartbeat(attempt.clone(), assignment, events.clone(), beating.clone());
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
        attempt: &Attempt,
        assignment: &Assignment,
        ending: Ending,
        streamer: Option<Streamer>,
        started: Instant,
        stop: &Stop,
    ) -> bool {
        let id = attempt.task;
        let (execution, error, aborted, timed_out) = match ending {
            Ending::Ran(execution) if execution.survivors > 0 => {
                let error = format!(
                    "the command's guard ended before its processes ({}); the {} processes it \
                     left were killed",
                    exec::describe(&execution.exit).unwrap_or_else(|| "exited".into()),
                    execution.survivors
                );
                (execution, Some(error), false, false)
            }
            Ending::Ran(execution) => {
                let error = exec::describe(&execution.exit);
                (execution, error, false, false)
            }
            Ending::TimedOut(execution) => {
                let error = format!("timed out after {} s", assignment.task.timeout_secs);
                (execution, Some(error), false, true)
            }
            Ending::Aborted(execution) => {
                (execution, Some("aborted at a user's request".to_owned()), true, false)
            }
            Ending::Fenced(why) => {
                log::warn!("task {id}: stopped and dropped: {why}");
                return false;
            }
            Ending::Released => {
                log::info!("task {id}: handing it back to the queue");
                let timeout = self.config.drain_timeout;
                return self.retry(id, "release", stop, || attempt.release(timeout));
            }
        };
        let exit_code = match (&execution.exit, &error) {
            (exec::Exit::Code(code), None) => Some(*code),
            _ => None,
        };
        let (stdout, stderr) = (execution.stdout.to_text(), execution.stderr.to_text());
        let lengths = [execution.stdout.total(), execution.stderr.total()];
        log::info!(
            "task {id}: {} after {:.3}s",
            error.clone().unwrap_or_else(|| format!("exit code {}", exit_code.unwrap_or_default())),
            started.elapsed().as_secs_f64()
        );
        let mut report = FinishReport {
            lease: attempt.lease(),
            exit_code,
            error,
            stdout: Some(stdout.text),
            stderr: Some(stderr.text),
            stdout_lossy: stdout.lossy,
            stderr_lossy: stderr.lossy,
            aborted,
            timed_out,
            stdout_bytes: Some(lengths[0]),
            stderr_bytes: Some(lengths[1]),
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            started_ms_ago: None,
        };
        let mut streamer = streamer;
        self.retry(id, "finish", stop, || {
            // The rest of the output first, up to what the report states.
            if let Some(streamer) = &mut streamer {
                streamer.send_due(Some(lengths))?;
                if !streamer.uploaded() {
                    // The API would not take all of the output: the finish states what it has,
                    // and it makes the texts from that.
                    let [stdout, stderr] = streamer.sent();
                    (report.stdout_bytes, report.stderr_bytes) = (Some(stdout), Some(stderr));
                    (report.stdout, report.stderr) = (None, None);
                }
            }
            // Measured at each send: a retried finish must not make the command look later.
            report.started_ms_ago =
                execution.started.map(|at| at.elapsed().as_millis().min(u64::MAX.into()) as u64);
            let mut sent = client::finish_within_limits(attempt, &mut report);
            if sent.as_ref().is_err_and(ClientError::is_output_mismatch) && report.stdout.is_some()
            {
                // The server's text of the uploads differs from this agent's (its uploads
                // skipped bytes it still had, say): the server's is the one /output agrees with.
                log::warn!("task {id}: the API's text of the uploaded output differs; using it");
                (report.stdout, report.stderr) = (None, None);
                sent = client::finish_within_limits(attempt, &mut report);
            }
            if let (Err(ClientError::OutputIncomplete { stdout, stderr }), Some(streamer)) =
                (&sent, &mut streamer)
            {
                streamer.rewind(*stdout, *stderr);
            }
            sent
        })
    }

    /// Sends a report until it is accepted, or the API says the attempt is no longer ours
    /// (409), the task is gone (404) or the report can never be taken: an API outage, a
    /// rejected token during a rollout, or any other refusal must not lose a result. Once the
    /// agent has been asked to stop, it tries for `DRAIN_TIMEOUT` at most (a second signal
    /// exits at once). Returns whether the API accepted the report.
    fn retry(
        &self,
        id: TaskId,
        what: &str,
        stop: &Stop,
        mut call: impl FnMut() -> Result<(), ClientError>,
    ) -> bool {
        let mut delay = Duration::from_millis(200);
        let mut stopping_since: Option<Instant> = None;
        loop {
            match call() {
                Ok(()) => return true,
                Err(e) if e.is_final() => {
                    log::warn!("task {id}: {what} refused, result dropped: {e}");
                    return false;
                }
                Err(e) if stop.quitting() => {
                    log::warn!("task {id}: {what} failed while quitting, not retried: {e}");
                    return false;
                }
                Err(e) => {
                    if stop.requested() {
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.config.drain_timeout {
                            log::warn!(
                                "task {id}: {what} given up after DRAIN_TIMEOUT while stopping \
                                 (the server requeues the task when its lease runs out): {e}"
                            );
                            return false;
                        }
                    }
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
        let client = self.client.clone();
        stop.on_exit(move || leave(&client));
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
        // A second signal asked to exit at once: no farewell to wait on.
        if !stop.quitting() {
            leave(&self.client);
        }
        log::info!("stopped");
    }
}

/// Tells the API this agent is leaving: shown as gone at once rather than a lease later (an
/// API that cannot be told finds out by then anyway).
fn leave(client: &Client) {
    if let Err(e) = client.leave() {
        log::warn!("could not tell the API this agent is leaving: {e}");
    }
}

/// `duration` scaled by a random factor in [0.5, 1.5), so that agents restarted together do
/// not retry in step.
pub fn jitter(duration: Duration) -> Duration {
    duration.mul_f64(0.5 + fastrand::f64())
}
