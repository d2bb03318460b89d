//! SIGTERM and SIGINT: stop picking at once, but let a running task finish and be reported.

use std::sync::{Arc, Mutex};
use std::thread;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Whether a stop was asked for, and whether a task is under way. Shared with the signal
/// thread, which exits the process at once when no task is under way.
#[derive(Clone, Default)]
pub struct Stop {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    requested: bool,
    busy: bool,
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
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
        let handle = stop.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    handle.request(signal);
                }
            })?;
        Ok(stop)
    }

    /// Records the request. Idle (waiting on a pick or a retry pause), the agent has nothing
    /// to lose and exits now; a pick answered at this very moment is recovered by the
    /// server when its lease expires.
    pub fn request(&self, signal: i32) {
        let mut state = self.lock();
        state.requested = true;
        if state.busy {
            log::info!("signal {signal}: stopping after the current task is finished and reported");
        } else {
            log::info!("signal {signal}: stopping");
            std::process::exit(0);
        }
    }

    pub fn requested(&self) -> bool {
        self.lock().requested
    }

    /// Marks a task as under way until the guard is dropped.
    pub fn busy(&self) -> Busy<'_> {
        self.lock().busy = true;
        Busy(self)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Busy<'a>(&'a Stop);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.lock().busy = false;
    }
}
