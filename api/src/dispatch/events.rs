//! Requests parked on a task in this process (heartbeats, output and status long polls),
//! woken when something happens to it: an abort is requested, output arrives, or the attempt
//! ends. An event is announced here at once and to the other API processes through one NOTIFY
//! per burst (the notifier sends and receives them), so a parked request costs the database
//! nothing until its task changes. Only while the LISTEN connection is down does a long poll
//! look at the database now and then; when it comes back, every parked request looks again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocket::request::ClientGone;
use rocket::Shutdown;
use taskexec_protocol::TaskId;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio::time::{sleep, Instant};

use crate::error::ApiError;

/// The registry of watches, by task (managed through the `Dispatcher`).
#[derive(Clone)]
pub struct TaskEvents {
    watches: Arc<Mutex<HashMap<TaskId, Vec<Arc<Wake>>>>>,
    /// Events announced here and not yet sent to the other processes, by task (`Woken` bits).
    outgoing: Arc<Mutex<HashMap<TaskId, usize>>>,
    pub(super) announced: Arc<Notify>,
    /// Whether the LISTEN connection is up, so that other processes' events arrive.
    pub(super) listening: Arc<AtomicBool>,
    /// Looks at the database by parked requests at once: at most half the pool, so that a
    /// burst of thousands of waits queues here rather than starving picks, heartbeats and
    /// `/health` of connections (and timing out as 503s).
    looks: Arc<Semaphore>,
}

impl Default for TaskEvents {
    fn default() -> TaskEvents {
        TaskEvents::with_look_limit(4)
    }
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
    /// Nothing in particular: events may have been missed (the LISTEN connection came back),
    /// look again. Every wait honours it.
    Rescan = 8,
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

/// How often a long poll on a task looks at the database while the LISTEN connection is down
/// (events from other processes cannot arrive then).
pub const RECHECK: Duration = Duration::from_secs(1);

impl TaskEvents {
    /// Events whose parked requests look at the database `looks` at a time.
    pub fn with_look_limit(looks: usize) -> TaskEvents {
        TaskEvents {
            watches: Arc::default(),
            outgoing: Arc::default(),
            announced: Arc::default(),
            listening: Arc::default(),
            looks: Arc::new(Semaphore::new(looks.max(1))),
        }
    }

    /// A turn to look at the database for a parked request (see `looks`).
    pub async fn look_turn(&self) -> SemaphorePermit<'_> {
        self.looks.acquire().await.expect("the semaphore is never closed")
    }

    pub fn watch(&self, id: TaskId) -> Watch {
        let wake = Arc::new(Wake::default());
        self.lock().entry(id).or_default().push(wake.clone());
        Watch { registry: self.clone(), id, wake }
    }

    /// Wakes the requests parked on task `id` in this process.
    pub fn wake(&self, id: TaskId, what: Woken) {
        self.wake_bits(id, what as usize);
    }

    pub(super) fn wake_bits(&self, id: TaskId, bits: usize) {
        for wake in self.lock().get(&id).into_iter().flatten() {
            wake.seen.fetch_or(bits, Ordering::AcqRel);
            // A stored permit: a watch that is not awaiting yet still sees it.
            wake.notify.notify_one();
        }
    }

    /// Wakes the requests parked on task `id` here, and in every other API process.
    pub fn announce(&self, id: TaskId, what: Woken) {
        self.wake(id, what);
        *self.outgoing().entry(id).or_default() |= what as usize;
        self.announced.notify_one();
    }

    /// Puts back a burst the notifier could not send.
    pub(super) fn requeue(&self, burst: HashMap<TaskId, usize>) {
        let mut outgoing = self.outgoing();
        for (id, bits) in burst {
            *outgoing.entry(id).or_default() |= bits;
        }
    }

    /// The events announced since the last call, for the notifier to send.
    pub(super) fn take_announced(&self) -> HashMap<TaskId, usize> {
        std::mem::take(&mut *self.outgoing())
    }

    /// Makes every parked request look at the database again (`Rescan`): events may have been
    /// missed while the LISTEN connection was down.
    pub(super) fn wake_all(&self) {
        for wake in self.lock().values().flatten() {
            wake.seen.fetch_or(Woken::Rescan as usize, Ordering::AcqRel);
            wake.notify.notify_one();
        }
    }

    fn outgoing(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, usize>> {
        self.outgoing.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether events from other API processes arrive (the LISTEN connection is up).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Vec<Arc<Wake>>>> {
        self.watches.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A long poll on task `id`: `look` at it until it says the wait is over, `deadline` passes
    /// or `stop` resolves (see [`ended`]), and between looks wait for one of `what` to happen to the task
    /// (here or in another process), or for `recheck` while events from other processes cannot
    /// arrive. A look waits for its turn (`looks`) until the deadline at most; a look at or past
    /// the deadline (a plain read, the last look) goes at once. Answers what the last look saw.
    ///
    /// # Errors
    /// The first error of `look`.
    pub async fn poll<T, Look, Seen>(
        &self,
        id: TaskId,
        what: &[Woken],
        deadline: Instant,
        recheck: Duration,
        stop: impl std::future::Future<Output = ()>,
        mut look: Look,
    ) -> Result<T, ApiError>
    where
        Look: FnMut() -> Seen,
        Seen: std::future::Future<Output = Result<(T, bool), ApiError>>,
    {
        let mut stop = std::pin::pin!(stop);
        loop {
            // Watch before looking, so that an event in between is not missed.
            let watch = self.watch(id);
            let turn = if Instant::now() < deadline {
                tokio::select! {
                    turn = self.look_turn() => Some(turn),
                    _ = tokio::time::sleep_until(deadline) => None,
                }
            } else {
                None
            };
            let (seen, over) = look().await?;
            drop(turn);
            let now = Instant::now();
            if over || now >= deadline {
                return Ok(seen);
            }
            let pause =
                if self.is_listening() { deadline - now } else { recheck.min(deadline - now) };
            tokio::select! {
                _ = watch.until(what) => {}
                // At the deadline, one last look: the answer shows the task as it is then.
                _ = sleep(pause) => {}
                _ = &mut stop => return Ok(seen),
            }
        }
    }
}

/// Resolves when a parked request has no reason to go on: the server stops, or its client has
/// gone (so that a departed waiter frees its slot at once, not at its deadline).
pub async fn ended(shutdown: Shutdown, gone: ClientGone) {
    tokio::select! {
        _ = shutdown => {}
        _ = gone.departed() => {}
    }
}

impl Watch {
    /// Resolves once one of `what`, or a `Rescan`, has happened since the watch began (other
    /// events pass it by: a wait for the end does not look again at every upload).
    pub async fn until(&self, what: &[Woken]) {
        let mask = what.iter().fold(Woken::Rescan as usize, |mask, kind| mask | *kind as usize);
        while self.wake.seen.load(Ordering::Acquire) & mask == 0 {
            self.wake.notify.notified().await;
        }
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
