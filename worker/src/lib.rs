//! The taskexec executor agent: long-polls the API for tasks, runs each with `sh -c` under a
//! guard, keeps its lease alive, reports the result, and polls again at once. `CONCURRENCY`
//! slots run a task each at once; one pick asks for as many tasks as there are free slots.

use std::path::{Path, PathBuf};
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
pub mod procs;
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

pub struct Worker {
    config: Config,
    client: Arc<Client>,
    /// By slot: the environment and confinement its commands run with, and its guard.
    slots: Vec<Slot>,
}

/// A picked task on its way to its slot, the slot already marked busy (`None`: the process
/// is exiting), with the inbox its supervisor hears stop requests on.
struct Handed {
    assignment: Assignment,
    busy: Option<stop::Busy>,
    events: mpsc::Sender<task::Event>,
    inbox: mpsc::Receiver<task::Event>,
}

/// What a slot's commands run with.
struct Slot {
    /// The agent's variables that `TASK_ENV_ALLOW` and the few every command needs let
    /// through (HOME and USER of the slot's run-as user).
    env: Vec<(String, String)>,
    /// The user and limits the guard gives each command.
    confinement: Confinement,
    /// Where a command without a `cwd` starts: the run-as user's home.
    workdir: Option<PathBuf>,
    /// The guard that runs the slot's commands (this binary), unless its path is unknown.
    guard: Option<Arc<exec::GuardSlot>>,
}

impl Worker {
    pub fn new(config: Config) -> Worker {
        let client = Arc::new(Client::new(&config));
        let binary = std::env::current_exe().ok();
        let slots = (0..config.concurrency)
            .map(|slot| {
                let run_as = config.run_as.get(slot);
                let env = isolation::command_env(std::env::vars(), &config.env_allow, run_as);
                Slot {
                    guard: binary
                        .clone()
                        .map(|binary| Arc::new(exec::GuardSlot::new(binary, env.clone()))),
                    env,
                    confinement: Confinement::new(run_as, config.limits),
                    workdir: run_as.map(isolation::RunAs::workdir),
                }
            })
            .collect();
        Worker { config, client, slots }
    }

    /// Picks tasks for the free slots and hands each to its slot's thread, until a signal asks
    /// the agent to stop; then waits for the slots to finish (or hand back) their tasks.
    fn run_slots(&self, stop: &Stop) {
        let (freed, free_slots) = mpsc::channel::<usize>();
        thread::scope(|scope| {
            let mut inboxes = Vec::new();
            for slot in 0..self.slots.len() {
                let (inbox, assignments) = mpsc::channel::<Handed>();
                let freed = freed.clone();
                thread::Builder::new()
                    .name(format!("slot-{slot}"))
                    .spawn_scoped(scope, move || {
                        for handed in assignments {
                            self.run_task(slot, handed, stop);
                            if freed.send(slot).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("a thread for each slot");
                inboxes.push(inbox);
            }
            let mut free: Vec<usize> = (0..self.slots.len()).rev().collect();
            while !stop.requested() {
                free.extend(free_slots.try_iter());
                if free.is_empty() {
                    match free_slots.recv() {
                        Ok(slot) => free.push(slot),
                        Err(_) => break,
                    }
                    continue;
                }
                match self.client.pick(free.len()) {
                    Ok(picked) if picked.is_empty() => {
                        // Without a long poll (the original design), a pick every poll interval.
                        if self.config.pick_wait.is_zero() {
                            thread::sleep(self.config.poll_interval);
                        }
                    }
                    Ok(picked) => {
                        for assignment in picked {
                            let slot = free.pop().expect("no more tasks than free slots");
                            // Busy before it leaves this thread: an agent whose last task ends
                            // meanwhile must not exit with this one on its way to its slot.
                            let (events, inbox) = mpsc::channel();
                            let busy = stop.busy(slot, events.clone());
                            let _ = inboxes[slot].send(Handed { assignment, busy, events, inbox });
                        }
                    }
                    Err(e) => {
                        let pause = jitter(self.config.poll_interval);
                        log::warn!("pick failed, next try in {:.1}s: {e}", pause.as_secs_f64());
                        thread::sleep(pause);
                    }
                }
            }
            // The slots end once their tasks are done.
            drop(inboxes);
        });
    }

    /// One task in `slot`, from its assignment to its report. Returns whether the API took
    /// note of the result (or took the task back).
    fn run_task(&self, slot: usize, handed: Handed, stop: &Stop) -> bool {
        let Handed { assignment, busy, events, inbox } = handed;
        let attempt = Attempt::new(self.client.clone(), &assignment);
        let id = attempt.task;
        let Some(busy) = busy else {
            // The process is exiting: if the hand-back does not make it, the server refunds
            // the pick after its confirmation window. Either way it runs once, elsewhere.
            return attempt.release(self.config.drain_timeout, true).is_ok();
        };
        if !busy.may_start() {
            // A signal came while the pick was answered: hand the task back unstarted, which
            // does not count against it.
            log::info!("task {id}: picked while stopping; handing it back unstarted");
            let timeout = self.config.drain_timeout;
            return self.retry(id, "release", stop, || attempt.release(timeout, true));
        }
        log::info!("task {id}: picked (attempt {}, slot {slot})", assignment.task.attempts);
        let started = Instant::now();
        // Heartbeats go on until the report is in (`beating` is dropped): a finish retried
        // through an API outage must not lose its lease meanwhile.
        let (beating, done) = mpsc::channel();
        let (ending, streamer) =
            self.execute(slot, &assignment, &attempt, (events, &inbox), done, &busy);
        busy.reporting();
        let recorded = self.conclude(&attempt, &assignment, ending, streamer, started, stop);
        drop(beating);
        recorded
    }

    fn execute(
        &self,
        slot: usize,
        assignment: &Assignment,
        attempt: &Attempt,
        (events, inbox): (mpsc::Sender<task::Event>, &mpsc::Receiver<task::Event>),
        done: mpsc::Receiver<()>,
        busy: &stop::Busy,
    ) -> (Ending, Option<Streamer>) {
        let setup = &self.slots[slot];
        let options = &assignment.task.options;
        let cap = OutputCap::new(assignment.terms.max_output_bytes as usize);
        // The task's directory, else the run-as user's home: the agent's own folder may be
        // closed to it.
        let workdir = match &options.cwd {
            Some(cwd) => Some(PathBuf::from(cwd)),
            None => setup.workdir.clone(),
        };
        let missing = options.cwd.as_ref().filter(|cwd| !Path::new(cwd).is_dir());
        let env = match missing {
            Some(cwd) => Err(format!(
                "could not start the command: the working directory {cwd:?} does not exist on \
                 agent {:?}",
                self.config.name
            )),
            None => isolation::with_task_env(&setup.env, &options.env, &self.config.env_override),
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
            guard: setup.guard.as_ref(),
            confinement: &setup.confinement,
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
        // Heartbeats start once the command runs (the first a moment later: see
        // `task::FIRST_BEAT`); an abort reaches the agent through them.
        task::heartbeat(attempt.clone(), assignment, events.clone(), done);
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
            Ending::Ran(execution) if execution.guard_lost => {
                let error = format!(
                    "the command's guard ended before its processes ({}); {} processes it \
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
                return self.retry(id, "release", stop, || attempt.release(timeout, false));
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
        let slots = self.slots.len();
        log::info!("agent {:?} taking tasks from {urls} ({slots} at once)", self.config.name);
        let client = self.client.clone();
        stop.on_exit(move || leave(&client));
        self.run_slots(stop);
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
