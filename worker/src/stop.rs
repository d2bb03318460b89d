//! SIGTERM and SIGINT. Idle, the agent tells the API it is leaving (2 s at most) and exits:
//! its parked pick's connection closes with it, and the server hands the pick's task to
//! another agent (a task the pick delivers meanwhile is handed back unstarted). Busy, the first
//! signal starts a drain (the task may run on for `DRAIN_TIMEOUT`, then it is stopped and
//! handed back); a second signal kills the command at once, hands the task back with one short
//! call and exits. While the result is being reported, the first signal bounds the retries to
//! `DRAIN_TIMEOUT` and a second exits at once.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;

use crate::task::Event;

#[derive(Clone, Default)]
pub struct Stop {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    signals: u32,
    phase: Phase,
    /// The running command's process group: signals from it are the command's doing.
    group: Option<u32>,
    /// Exit the process when the agent is idle, or when a second signal comes while reporting
    /// (false for tests, which drive a `Stop` by hand).
    exits: bool,
    /// Called before such an exit: the agent tells the API it is leaving.
    farewell: Option<Arc<dyn Fn() + Send + Sync>>,
    /// The process is about to exit (it is saying farewell): no task may start any more.
    leaving: bool,
}

/// What the agent is doing, as far as a stop request is concerned.
#[derive(Default)]
enum Phase {
    /// Waiting on a pick or a retry pause: nothing to lose.
    #[default]
    Idle,
    /// A command runs; stop requests go to its supervisor.
    Running(Sender<Event>),
    /// The command has ended; its result is being reported.
    Reporting,
}

impl Stop {
    /// A stop that only `request` triggers, and that never exits the process (for tests).
    pub fn new() -> Stop {
        Stop::default()
    }

    /// A stop triggered by SIGTERM or SIGINT.
    ///
    /// # Errors
    /// When the signal handlers cannot be installed.
    pub fn on_signals() -> std::io::Result<Stop> {
        let stop = Stop::new();
        stop.lock().exits = true;
        let mut signals = SignalsInfo::<WithOrigin>::new([SIGTERM, SIGINT])?;
        let handle = stop.clone();
        thread::Builder::new().name("signals".into()).spawn(move || {
            for origin in signals.forever() {
                handle.request(origin.signal, origin.process.map(|p| p.pid));
            }
        })?;
        Ok(stop)
    }

    /// Records a stop request and acts on it for the current phase.
    /// A signal sent by a command is ignored: otherwise a command could make its agent hand it
    /// back again and again, or stop it. (With `RUN_AS` a command cannot signal the agent at
    /// all; without it, a sender that has already exited cannot be told apart.)
    pub fn request(&self, signal: i32, sender: Option<libc::pid_t>) {
        let mut state = self.lock();
        if let Some(sender) = sender {
            // SAFETY: getpgid and getpid have no memory effects; a gone sender yields -1.
            let in_group =
                state.group.is_some_and(|g| unsafe { libc::getpgid(sender) } == g as i32);
            // The agent is a subreaper, so a command's processes stay its descendants even when
            // they leave the group (setsid) or their parent dies.
            let descendant = crate::procs::descends_from(sender, unsafe { libc::getpid() });
            if in_group || descendant {
                log::warn!("signal {signal} from a command (pid {sender}) ignored");
                return;
            }
        }
        state.signals += 1;
        let first = state.signals == 1;
        // Whether to exit now, and whether to say farewell first (not when a second signal
        // asked to exit at once).
        let (exit, farewell) = match &state.phase {
            Phase::Idle => {
                log::info!("signal {signal}: stopping");
                // A second signal (after a drain, say) exits without waiting on the API.
                (true, first)
            }
            Phase::Running(task) if first => {
                log::info!("signal {signal}: draining; the running task may finish");
                let _ = task.send(Event::Drain);
                (false, false)
            }
            Phase::Running(task) => {
                log::info!("signal {signal} again: killing the command and handing the task back");
                let _ = task.send(Event::Quit);
                (false, false)
            }
            Phase::Reporting if first => {
                log::info!("signal {signal}: reporting the result, for DRAIN_TIMEOUT at most");
                (false, false)
            }
            Phase::Reporting => {
                log::warn!(
                    "signal {signal} again: exiting without the report; the server requeues \
                     the task when its lease runs out"
                );
                (true, false)
            }
        };
        if exit && state.exits {
            // A pick may still deliver a task while the farewell is sent: it must not start.
            state.leaving = true;
            let farewell = state.farewell.clone().filter(|_| farewell);
            drop(state);
            if let Some(farewell) = farewell {
                farewell();
            }
            std::process::exit(0);
        }
    }

    /// What to do before the process exits on a signal.
    pub fn on_exit(&self, farewell: impl Fn() + Send + Sync + 'static) {
        self.lock().farewell = Some(Arc::new(farewell));
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.lock().signals > 0
    }

    /// Whether a second stop request came: nothing may wait any more.
    pub fn quitting(&self) -> bool {
        self.lock().signals > 1
    }

    /// Marks a task as under way, with the inbox that signals go to, until the guard drops;
    /// `None` when the process is exiting, and the task must not start.
    pub fn busy(&self, inbox: Sender<Event>) -> Option<Busy<'_>> {
        let mut state = self.lock();
        if state.leaving {
            return None;
        }
        match state.signals {
            0 => {}
            // A signal came while the pick was being answered: drain this task at once.
            1 => drop(inbox.send(Event::Drain)),
            _ => drop(inbox.send(Event::Quit)),
        }
        state.phase = Phase::Running(inbox);
        Some(Busy(self))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A task under way; idle again when dropped.
pub struct Busy<'a>(&'a Stop);

impl Busy<'_> {
    /// Records the running command's process group.
    pub fn command_group(&self, group: Option<u32>) {
        self.0.lock().group = group;
    }

    /// The command has ended: from now on the result is being reported.
    pub fn reporting(&self) {
        let mut state = self.0.lock();
        state.phase = Phase::Reporting;
        state.group = None;
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.phase = Phase::Idle;
        state.group = None;
    }
}
