//! Requests parked on a task in this process (heartbeats, output and status long polls),
//! woken when something happens to it: an abort is requested, output arrives, or the attempt
//! ends. Events are local to one API process; a long poll also looks at the database now and
//! then, for changes made through another.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocket::Shutdown;
use taskexec_protocol::TaskId;
use tokio::sync::Notify;
use tokio::time::{sleep, Instant};

use crate::error::ApiError;

/// The registry of watches, by task (managed through the `Dispatcher`).
#[derive(Clone, Default)]
pub struct TaskEvents {
    watches: Arc<Mutex<HashMap<TaskId, Vec<Arc<Wake>>>>>,
}

/// What happened to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// A user asked to abort the task.
    Abort = 1,
    /// The attempt was finished, handed back or cancelled.
    Ended = 2,
    /// The agent uploaded output.
    Output = 4,
}

#[derive(Default)]
struct Wake {
    notify: Notify,
    /// The `Woken` bits seen since the watch began.
    seen: AtomicUsize,
}

/// Interest in one task, from before the caller looks at the database (so that an event
/// landing in between is not missed) until it is dropped.
pub struct Watch {
    registry: TaskEvents,
    id: TaskId,
    wake: Arc<Wake>,
}

/// How often a long poll on a task looks at the database when no event wakes it: events are
/// local to one API process, and the task may change through another.
pub const RECHECK: Duration = Duration::from_secs(1);

impl TaskEvents {
    pub fn watch(&self, id: TaskId) -> Watch {
        let wake = Arc::new(Wake::default());
        self.lock().entry(id).or_default().push(wake.clone());
        Watch { registry: self.clone(), id, wake }
    }

    /// Wakes the requests parked on task `id` in this process.
    pub fn wake(&self, id: TaskId, what: Woken) {
        for wake in self.lock().get(&id).into_iter().flatten() {
            wake.seen.fetch_or(what as usize, Ordering::AcqRel);
            // A stored permit: a watch that is not awaiting yet still sees it.
            wake.notify.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Vec<Arc<Wake>>>> {
        self.watches.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A long poll on task `id`: `look` at it until it says the wait is over, `deadline` passes
    /// or the server stops, and between looks wait for `what` to happen to the task here, or
    /// `recheck`. Answers what the last look saw.
    ///
    /// # Errors
    /// The first error of `look`.
    pub async fn poll<T, Look, Seen>(
        &self,
        id: TaskId,
        what: Woken,
        deadline: Instant,
        recheck: Duration,
        shutdown: &mut Shutdown,
        mut look: Look,
    ) -> Result<T, ApiError>
    where
        Look: FnMut() -> Seen,
        Seen: std::future::Future<Output = Result<(T, bool), ApiError>>,
    {
        loop {
            // Watch before looking, so that an event in between is not missed.
            let watch = self.watch(id);
            let (seen, over) = look().await?;
            let now = Instant::now();
            if over || now >= deadline {
                return Ok(seen);
            }
            tokio::select! {
                _ = watch.next(what) => {}
                _ = sleep(recheck.min(deadline - now)) => {}
                _ = &mut *shutdown => return Ok(seen),
            }
        }
    }
}

impl Watch {
    /// Resolves at the next event, and tells whether `what` has happened since the watch began.
    pub async fn next(&self, what: Woken) -> bool {
        self.wake.notify.notified().await;
        self.seen(what)
    }

    /// Whether `what` has happened since the watch began.
    pub fn seen(&self, what: Woken) -> bool {
        self.wake.seen.load(Ordering::Acquire) & what as usize != 0
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watches = self.registry.lock();
        if let Some(list) = watches.get_mut(&self.id) {
            list.retain(|w| !Arc::ptr_eq(w, &self.wake));
            if list.is_empty() {
                watches.remove(&self.id);
            }
        }
    }
}
