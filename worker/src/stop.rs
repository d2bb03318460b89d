//! SIGTERM and SIGINT, for every slot of the agent. Idle, the agent tells the API it is leaving
//! (2 s at most) and exits: its parked pick's connection closes with it, and the server hands
//! the pick's tasks to another agent (a task the pick delivers meanwhile is handed back
//! unstarted). Busy, the first signal starts a drain (each running task may run on for
//! `DRAIN_TIMEOUT`, then it is stopped and handed back), and the agent exits when its last
//! task is done; a second signal kills the commands at once, hands their tasks back with one
//! short call each and exits. While results are being reported, the first signal bounds the
//! retries to `DRAIN_TIMEOUT` and a second exits at once.

use std::collections::HashMap;
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
    /// The tasks under way, by slot; none: the agent is idle.
    slots: HashMap<usize, Slot>,
    /// Exit the process when the agent is idle, or when a second signal comes while reporting
    /// (false for tests, which drive a `Stop` by hand).
    exits: bool,
    /// Called before such an exit: the agent tells the API it is leaving.
    farewell: Option<Arc<dyn Fn() + Send + Sync>>,
    /// The process is about to exit (it is saying farewell): no task may start any more.
    leaving: bool,
}

/// What one slot is doing, as far as a stop request is concerned.
struct Slot {
    phase: Phase,
    /// The running command's process group: signals from it are the command's doing.
    group: Option<u32>,
}

enum Phase {
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

    /// Records a stop request and acts on it for what each slot is doing.
    /// A signal sent by a command is ignored: otherwise a command could make its agent hand it
    /// back again and again, or stop it. (With `RUN_AS` a command cannot signal the agent at
    /// all; without it, a sender that has already exited cannot be told apart.)
    pub fn request(&self, signal: i32, sender: Option<libc::pid_t>) {
        let mut state = self.lock();
        if let Some(sender) = sender {
            // SAFETY: getpgid and getpid have no memory effects; a gone sender yields -1.
            let group = unsafe { libc::getpgid(sender) };
            let in_group = state.slots.values().any(|s| s.group.is_some_and(|g| g as i32 == group));
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
        let running: Vec<&Sender<Event>> = state
            .slots
            .values()
            .filter_map(|s| match &s.phase {
                Phase::Running(task) => Some(task),
                Phase::Reporting => None,
            })
            .collect();
        // Whether to exit now, and whether to say farewell first (not when a second signal
        // asked to exit at once).
        let (exit, farewell) = if state.slots.is_empty() {
            log::info!("signal {signal}: stopping");
            // A second signal (after a drain, say) exits without waiting on the API.
            (true, first)
        } else if !running.is_empty() {
            if first {
                log::info!("signal {signal}: draining; running tasks may finish");
            } else {
                log::info!("signal {signal} again: killing the commands and handing tasks back");
            }
            for task in running {
                let _ = task.send(if first { Event::Drain } else { Event::Quit });
            }
            (false, false)
        } else if first {
            log::info!("signal {signal}: reporting results, for DRAIN_TIMEOUT at most");
            (false, false)
        } else {
            log::warn!(
                "signal {signal} again: exiting without the reports; the server requeues the \
                 tasks when their leases run out"
            );
            (true, false)
        };
        if exit && state.exits {
            self.exit(state, farewell);
        }
    }

    /// Exits the process, saying farewell first if asked to.
    fn exit(&self, mut state: std::sync::MutexGuard<'_, State>, farewell: bool) -> ! {
        // A pick may still deliver a task while the farewell is sent: it must not start.
        state.leaving = true;
        let farewell = state.farewell.clone().filter(|_| farewell);
        drop(state);
        if let Some(farewell) = farewell {
            farewell();
        }
        std::process::exit(0);
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

    /// Marks a task as under way in `slot`, with the inbox that signals go to, until the guard
    /// drops; `None` when the process is exiting. A task picked after a stop request (a
    /// signal came while the pick was being answered) must not start: see `Busy::may_start`.
    pub fn busy(&self, slot: usize, inbox: Sender<Event>) -> Option<Busy> {
        let mut state = self.lock();
        if state.leaving {
            return None;
        }
        let may_start = state.signals == 0;
        let phase = if may_start { Phase::Running(inbox) } else { Phase::Reporting };
        state.slots.insert(slot, Slot { phase, group: None });
        Some(Busy { stop: self.clone(), slot, may_start })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A task under way in a slot; the slot is idle again when dropped.
pub struct Busy {
    stop: Stop,
    slot: usize,
    may_start: bool,
}

impl Busy {
    /// False when a stop was requested before the task could start: it is to be handed back
    /// unstarted (the slot counts as reporting meanwhile, so that the agent does not exit
    /// before the hand-back is sent).
    pub fn may_start(&self) -> bool {
        self.may_start
    }

    /// Records the running command's process group.
    pub fn command_group(&self, group: Option<u32>) {
        if let Some(slot) = self.stop.lock().slots.get_mut(&self.slot) {
            slot.group = group;
        }
    }

    /// The command has ended: from now on the result is being reported.
    pub fn reporting(&self) {
        if let Some(slot) = self.stop.lock().slots.get_mut(&self.slot) {
            slot.phase = Phase::Reporting;
            slot.group = None;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.stop.lock();
        state.slots.remove(&self.slot);
        // Stopping, and the last task is done: nothing is left to wait for. (The pick loop may
        // be parked on the API; it would hand back whatever came.)
        if state.slots.is_empty() && state.signals > 0 && state.exits && !state.leaving {
            let farewell = state.signals == 1;
            self.stop.exit(state, farewell);
        }
    }
}
