//! SIGTERM and SIGINT. Idle, the agent exits at once. Busy, the first signal starts a drain
//! (the task may run on for `DRAIN_TIMEOUT`, then it is stopped and handed back); a second
//! signal hands it back at once.

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
    /// The running task's inbox, while there is one.
    task: Option<Sender<Event>>,
    /// The running command's process group: signals from it are the command's doing.
    group: Option<u32>,
}

impl Stop {
    /// A stop that only `request` triggers (for tests).
    pub fn new() -> Stop {
        Stop::default()
    }

    /// A stop triggered by SIGTERM or SIGINT.
    ///
    /// # Errors
    /// When the signal handlers cannot be installed.
    pub fn on_signals() -> std::io::Result<Stop> {
        let stop = Stop::new();
        let mut signals = SignalsInfo::<WithOrigin>::new([SIGTERM, SIGINT])?;
        let handle = stop.clone();
        thread::Builder::new().name("signals".into()).spawn(move || {
            for origin in signals.forever() {
                handle.request(origin.signal, origin.process.map(|p| p.pid));
            }
        })?;
        Ok(stop)
    }

    /// Records a stop request. Idle (waiting on a pick or a retry pause), the agent has nothing
    /// to lose and exits now; a pick answered at this very moment is recovered by the server
    /// when its lease expires.
    /// A signal sent by the running command itself is ignored: otherwise a command could make
    /// its agent hand it back again and again.
    pub fn request(&self, signal: i32, sender: Option<libc::pid_t>) {
        let mut state = self.lock();
        if let (Some(group), Some(sender)) = (state.group, sender) {
            // SAFETY: getpgid has no memory effects; a gone sender yields -1.
            if unsafe { libc::getpgid(sender) } == group as libc::pid_t {
                log::warn!("signal {signal} from the running command (pid {sender}) ignored");
                return;
            }
        }
        state.signals += 1;
        let Some(task) = &state.task else {
            log::info!("signal {signal}: stopping");
            std::process::exit(0);
        };
        let event = if state.signals == 1 {
            log::info!("signal {signal}: draining; the running task may finish");
            Event::Drain
        } else {
            log::info!("signal {signal} again: handing the running task back now");
            Event::StopNow
        };
        let _ = task.send(event);
    }

    pub fn requested(&self) -> bool {
        self.lock().signals > 0
    }

    /// Marks a task as under way, with the inbox that signals go to, until the guard drops.
    pub fn busy(&self, inbox: Sender<Event>) -> Busy<'_> {
        let mut state = self.lock();
        if state.signals > 0 {
            // A signal came while the pick was being answered: drain this task at once.
            let _ = inbox.send(Event::Drain);
        }
        state.task = Some(inbox);
        Busy(self)
    }

    /// Records the running command's process group.
    pub fn command_group(&self, group: Option<u32>) {
        self.lock().group = group;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Busy<'a>(&'a Stop);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.task = None;
        state.group = None;
    }
}
