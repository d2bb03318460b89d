//! One assignment, from its start to its report: the command under its guard, the heartbeats
//! that keep the lease and bring aborts, the timeout, and the drain on SIGTERM. Every way the
//! command can be stopped goes through `stop_command`: SIGTERM to the process group, the kill
//! grace, then SIGKILL.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use taskexec_protocol::Assignment;

use crate::client::Attempt;
use crate::exec::{Execution, Exit, Running};

/// What the supervisor of a running task hears about.
#[derive(Debug)]
pub enum Event {
    /// The command has exited.
    Exited(Exit),
    /// A user asked to abort the task.
    Abort,
    /// The lease is no longer ours (409), or it ran out while the API was unreachable:
    /// another attempt may be running; stop and drop the result.
    Fenced(String),
    /// First SIGTERM: the task may run on for `DRAIN_TIMEOUT`.
    Drain,
    /// The drain timeout: stop the command (TERM, grace, KILL) and hand the task back.
    StopNow,
    /// Second SIGTERM: kill the command at once and hand the task back.
    Quit,
}

/// How an attempt ended, and so what the API is told.
#[derive(Debug)]
pub enum Ending {
    /// The command ended by itself.
    Ran(Execution),
    /// The command overran its timeout and was stopped.
    TimedOut(Execution),
    /// The command was stopped at a user's request.
    Aborted(Execution),
    /// The attempt is no longer ours: nothing is reported.
    Fenced(String),
    /// The agent is stopping: the task goes back to the queue.
    Released,
}

/// Settings of the supervision that do not come with the assignment.
pub struct Supervision {
    pub drain_timeout: Duration,
}

/// Supervises `running` until it ends one way or another. `inbox` receives the command's exit
/// (already wired with `Running::on_exit`), heartbeat news and stop requests.
pub fn supervise(
    running: Running,
    assignment: &Assignment,
    inbox: &Receiver<Event>,
    settings: &Supervision,
) -> Ending {
    let grace = Duration::from_secs(assignment.terms.kill_grace_secs.into());
    let timeout_secs = assignment.task.timeout_secs.max(1) as u64;
    let timeout = Instant::now() + Duration::from_secs(timeout_secs);
    let mut drain: Option<Instant> = None;
    loop {
        let wake = drain.map_or(timeout, |d| d.min(timeout));
        let event = match inbox.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) if Instant::now() >= timeout => {
                log::info!("task {}: timed out after {timeout_secs} s", assignment.task.id);
                let exit = stop_command(&running, inbox, grace);
                return Ending::TimedOut(running.finish(exit));
            }
            Err(RecvTimeoutError::Timeout) => Event::StopNow,
            Err(RecvTimeoutError::Disconnected) => Event::StopNow,
        };
        match event {
            Event::Exited(exit) => return Ending::Ran(running.finish(exit)),
            Event::Abort => {
                log::info!("task {}: abort requested", assignment.task.id);
                let exit = stop_command(&running, inbox, grace);
                return Ending::Aborted(running.finish(exit));
            }
            Event::Fenced(why) => {
                let exit = stop_command(&running, inbox, grace);
                drop(running.finish(exit));
                return Ending::Fenced(why);
            }
            Event::Drain => {
                drain.get_or_insert_with(|| Instant::now() + settings.drain_timeout);
            }
            Event::StopNow => {
                let exit = stop_command(&running, inbox, grace);
                drop(running.finish(exit));
                return Ending::Released;
            }
            Event::Quit => {
                let exit = stop_command(&running, inbox, Duration::ZERO);
                drop(running.finish(exit));
                return Ending::Released;
            }
        }
    }
}

/// How long the guard gets to kill every descendant before the group and the guard are killed.
const GUARD_CLEANUP: Duration = Duration::from_secs(2);

/// SIGTERM to the process group (and to descendants that left it), up to `grace` for it to
/// exit, then the kill: the guard kills every descendant, even those that left the group; then
/// SIGKILL to the group and the guard if that did not end it. Signals go to the group, not to
/// single pids (the guard reaps `sh`, so a group that has just emptied could in principle be
/// reused before the agent hears of the exit; pids would have to wrap around meanwhile). A
/// second stop request (`Quit`) skips the rest of the grace.
fn stop_command(running: &Running, inbox: &Receiver<Event>, grace: Duration) -> Exit {
    running.terminate();
    if let Some(exit) = wait_exit(inbox, grace, true) {
        return exit;
    }
    if running.kill_all() {
        if let Some(exit) = wait_exit(inbox, GUARD_CLEANUP, false) {
            return exit;
        }
    }
    running.kill();
    loop {
        match inbox.recv() {
            Ok(Event::Exited(exit)) => return exit,
            Ok(_) => {}
            Err(_) => return Exit::Signal(libc::SIGKILL),
        }
    }
}

/// The command's exit if it comes within `wait`; `None` at the end of it, or at a stop request
/// when `hurry` allows.
fn wait_exit(inbox: &Receiver<Event>, wait: Duration, hurry: bool) -> Option<Exit> {
    let until = Instant::now() + wait;
    loop {
        match inbox.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(Event::Exited(exit)) => return Some(exit),
            Ok(Event::StopNow | Event::Quit) if hurry => return None,
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Time kept in hand at the end of a lease: the command must be dead this long before the
/// lease runs out.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// The shortest heartbeat call, even when the lease is nearly out: less than `LEASE_MARGIN`.
const LAST_CALL: Duration = Duration::from_millis(500);

/// How long after the start the first heartbeat goes out (sooner if a third of the pick's
/// usable lease is sooner): a command that ends before then never heartbeats, and its finish
/// records when it started. An abort of a command this young waits that long to reach it, and
/// an agent lost this early leaves a pick never confirmed (refunded, a bounded number of times).
const FIRST_BEAT: Duration = Duration::from_millis(250);

/// Keeps the lease alive until `done` is dropped (or sent to): at least three heartbeats per
/// lease, each held by the server until the next is due unless an abort comes first. Reports an
/// abort (and goes on beating until the report is in), a fence (409), or an API out of reach
/// for so long that the command must be stopped now to be dead, after its kill grace, before
/// the lease runs out and the task is handed to another agent.
pub fn heartbeat(
    attempt: Attempt,
    assignment: &Assignment,
    events: Sender<Event>,
    done: Receiver<()>,
) {
    let id = attempt.task;
    let grace = Duration::from_secs(assignment.terms.kill_grace_secs.into());
    // The pick's lease: its confirmation window, until the first heartbeat grants the full one.
    let mut granted = Duration::from_secs(assignment.terms.lease_secs.into());
    thread::spawn(move || {
        let mut lease_start = Instant::now();
        let first = (granted.saturating_sub(grace + LEASE_MARGIN) / 3).min(FIRST_BEAT);
        if ended(&done, first) {
            return;
        }
        let mut aborted = false;
        loop {
            let started = Instant::now();
            let usable = granted.saturating_sub(grace + LEASE_MARGIN);
            let give_up = lease_start + usable;
            let period = (usable / 3).max(Duration::from_millis(100));
            // Whole seconds, as the server takes them; no hold once the abort is known.
            let hold = if aborted { Duration::ZERO } else { Duration::from_secs(period.as_secs()) };
            // Past the point of giving up (after a freeze, say), still ask once: the answer
            // (409, most likely) is worth more than a guess, and half a second is within the
            // margin.
            let timeout = give_up.saturating_duration_since(started).max(LAST_CALL);
            let news = match attempt.heartbeat(hold, timeout) {
                Ok(reply) => {
                    lease_start = started;
                    granted = Duration::from_secs(reply.lease_secs.into());
                    (reply.abort && !std::mem::replace(&mut aborted, true)).then_some(Event::Abort)
                }
                Err(e) if !e.is_retryable() => Some(Event::Fenced(e.to_string())),
                Err(e) if Instant::now() >= give_up => Some(Event::Fenced(format!(
                    "the API has been out of reach for most of the lease; stopping the command \
                     before the lease runs out: {e}"
                ))),
                Err(e) => {
                    log::warn!("task {id}: heartbeat failed: {e}");
                    None
                }
            };
            let fenced = matches!(news, Some(Event::Fenced(_)));
            if let Some(news) = news {
                if !ended(&done, Duration::ZERO) {
                    let _ = events.send(news);
                }
            }
            if fenced || ended(&done, (started + period).saturating_duration_since(Instant::now()))
            {
                return;
            }
        }
    });
}

/// Waits up to `wait` for the attempt's report to be in: true when it is.
fn ended(done: &Receiver<()>, wait: Duration) -> bool {
    !matches!(done.recv_timeout(wait), Err(RecvTimeoutError::Timeout))
}
