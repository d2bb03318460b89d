//! The long poll. One dispatcher per API process owns the parked picks and one dedicated
//! LISTEN connection. A wake-up (a NOTIFY from any API process, a new pick, the fallback
//! timer) leads to at most one claim statement for all parked picks together, and the claimed
//! tasks go to the oldest waiters first. Parking costs the database nothing while the queue is
//! known to be empty; notifications are hints and the rescan timer is the guarantee.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocket::fairing::AdHoc;
use rocket::Shutdown;
use rocket_db_pools::Database;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{sleep, sleep_until, Instant};
use uuid::Uuid;

use crate::config::{AppConfig, DATABASE_URL_KEY};
use crate::error::ApiError;
use crate::tasks::model::Picked;
use crate::tasks::store;
use crate::Db;

/// The most picks served by one claim statement.
const MAX_BATCH: usize = 512;

/// The handle that request handlers use (managed state).
#[derive(Clone)]
pub struct Dispatcher {
    parks: mpsc::UnboundedSender<Waiter>,
    hints: Arc<Hints>,
    queued: Arc<Notify>,
    parked: Arc<AtomicUsize>,
    listening: Arc<AtomicBool>,
    events: TaskEvents,
}

/// What a pick grants besides the task: the lease's length and the kill grace the agent keeps.
#[derive(Debug, Clone, Copy)]
pub struct PickTerms {
    /// The lease a pick grants until the agent's first heartbeat confirms it.
    pub confirm_secs: u32,
    pub kill_grace_secs: u32,
    pub max_output_bytes: u32,
}

/// What a parked pick receives: a task, or `None` at its deadline or on shutdown.
pub type Reply = oneshot::Receiver<Option<Picked>>;

struct Waiter {
    agent: String,
    deadline: Instant,
    reply: oneshot::Sender<Option<Picked>>,
}

impl Dispatcher {
    /// Parks a pick for `agent`. The reply comes by `deadline` (a deadline in the past asks
    /// for one look at the queue), unless the dispatcher is stuck on the database.
    ///
    /// # Errors
    /// `Unavailable` when the dispatcher has stopped (the server is shutting down).
    pub fn park(&self, agent: String, deadline: Instant) -> Result<Reply, ApiError> {
        let (reply, receiver) = oneshot::channel();
        self.parks.send(Waiter { agent, deadline, reply }).map_err(|_| ApiError::Unavailable)?;
        Ok(receiver)
    }

    /// How many picks are parked right now (as of the dispatcher's last round).
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Whether notifications can arrive (the LISTEN connection is up). When they cannot,
    /// long polls that wait for one should wait less.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// The registry of requests waiting for something to happen to a task.
    pub fn events(&self) -> &TaskEvents {
        &self.events
    }

    /// Announces a committed insert (or requeue): to this process's dispatcher at once (so a
    /// pick that follows the 201 sees the task), and to every API process through one NOTIFY
    /// per burst, sent after the caller's statement has committed.
    pub fn task_queued(&self) {
        self.hints.hint();
        self.queued.notify_one();
    }
}

/// "The queue may have changed since the last claim": raised by notifications, local inserts
/// and a lost LISTEN connection; taken by the dispatcher's next round.
#[derive(Default)]
struct Hints {
    fresh: AtomicBool,
    wake: Notify,
}

impl Hints {
    fn hint(&self) {
        self.fresh.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn take(&self) -> bool {
        self.fresh.swap(false, Ordering::AcqRel)
    }
}

/// What one round of the dispatcher did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Whether a claim statement ran.
    pub queried: bool,
    /// Tasks handed to parked picks.
    pub delivered: usize,
    /// Tasks claimed for picks that had gone, and put back.
    pub returned: usize,
    /// Picks answered "nothing" at their deadline.
    pub expired: usize,
}

/// The dispatcher's state, owned by its loop.
pub struct DispatchLoop {
    pool: PgPool,
    parks: mpsc::UnboundedReceiver<Waiter>,
    hints: Arc<Hints>,
    queued: Arc<Notify>,
    listening: Arc<AtomicBool>,
    parked: Arc<AtomicUsize>,
    events: TaskEvents,
    terms: PickTerms,
    waiters: VecDeque<Waiter>,
    /// The last claim found fewer tasks than waiters, and no hint has come since.
    queue_empty: bool,
    rescan: Duration,
    last_claim: Instant,
}

impl DispatchLoop {
    /// A dispatcher and its loop; nothing runs until `run` or `run_once` is called.
    pub fn new(pool: PgPool, rescan: Duration, terms: PickTerms) -> (Dispatcher, DispatchLoop) {
        let (parks, receiver) = mpsc::unbounded_channel();
        let queued = Arc::new(Notify::new());
        let parked = Arc::new(AtomicUsize::new(0));
        let listening = Arc::new(AtomicBool::new(false));
        let events = TaskEvents::default();
        let hints = Arc::new(Hints::default());
        let dispatcher = Dispatcher {
            parks,
            hints: hints.clone(),
            queued: queued.clone(),
            parked: parked.clone(),
            listening: listening.clone(),
            events: events.clone(),
        };
        let state = DispatchLoop {
            pool,
            parks: receiver,
            hints,
            queued,
            listening,
            parked,
            events,
            terms,
            waiters: VecDeque::new(),
            queue_empty: false,
            rescan,
            last_claim: Instant::now(),
        };
        (dispatcher, state)
    }

    /// Waits for the next reason to look at the queue, then does one round, until shutdown.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        loop {
            let next_deadline = self.waiters.iter().map(|w| w.deadline).min();
            let rescan_at = self.last_claim + self.rescan;
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                waiter = self.parks.recv() => match waiter {
                    Some(waiter) => self.waiters.push_back(waiter),
                    None => break,
                },
                _ = self.hints.wake.notified() => {}
                _ = sleep_until(next_deadline.unwrap_or(rescan_at)), if next_deadline.is_some() => {}
                _ = sleep_until(rescan_at), if !self.waiters.is_empty() => self.queue_empty = false,
            }
            self.run_once().await;
        }
        for waiter in self.waiters.drain(..) {
            let _ = waiter.reply.send(None);
        }
    }

    /// Takes in newly parked picks, claims tasks for as many of them as the queue allows (one
    /// statement per `MAX_BATCH` picks, skipped when the queue is known to be empty unless a
    /// pick asked for one look at once), and answers the picks whose deadline has passed.
    pub async fn run_once(&mut self) -> Round {
        while let Ok(waiter) = self.parks.try_recv() {
            self.waiters.push_back(waiter);
        }
        self.waiters.retain(|w| !w.reply.is_closed());
        // Without a LISTEN connection no hint can arrive: "empty" may be stale.
        if self.hints.take() || !self.listening.load(Ordering::Acquire) {
            self.queue_empty = false;
        }
        let mut round = Round::default();
        let now = Instant::now();
        // A pick with `wait=0` gets a look at the database itself: a task another API process
        // has just created may not have been announced here yet.
        let immediate = self.waiters.iter().any(|w| w.deadline <= now);
        if immediate {
            self.queue_empty = false;
        }
        while !self.waiters.is_empty() && !self.queue_empty {
            if !self.claim(&mut round).await {
                break;
            }
        }
        let now = Instant::now();
        let (expired, waiting): (Vec<_>, Vec<_>) =
            self.waiters.drain(..).partition(|w| w.deadline <= now);
        self.waiters.extend(waiting);
        for waiter in expired {
            let _ = waiter.reply.send(None);
            round.expired += 1;
        }
        self.parked.store(self.waiters.len(), Ordering::Relaxed);
        round
    }

    /// One claim statement for the oldest `MAX_BATCH` waiters. False when it failed.
    async fn claim(&mut self, round: &mut Round) -> bool {
        let batch = self.waiters.len().min(MAX_BATCH);
        let agents: Vec<String> =
            self.waiters.iter().take(batch).map(|w| w.agent.clone()).collect();
        self.last_claim = Instant::now();
        round.queried = true;
        let claimed = match store::claim(&self.pool, &agents, self.terms.confirm_secs).await {
            Ok(claimed) => claimed,
            Err(e) => {
                log::warn!("claim for {batch} parked picks failed: {e}");
                return false;
            }
        };
        self.queue_empty = claimed.len() < batch;
        let served: Vec<Waiter> = self.waiters.drain(..claimed.len()).collect();
        for (waiter, claimed) in served.into_iter().zip(claimed) {
            let picked = Picked {
                task: claimed.task,
                lease: claimed.lease,
                lease_expires_at: claimed.lease_expires_at,
                lease_secs: self.terms.confirm_secs,
                kill_grace_secs: self.terms.kill_grace_secs,
                max_output_bytes: self.terms.max_output_bytes,
            };
            match waiter.reply.send(Some(picked)) {
                Ok(()) => round.delivered += 1,
                Err(Some(picked)) => {
                    round.returned += 1;
                    self.put_back(picked).await;
                }
                Err(None) => {}
            }
        }
        true
    }

    /// The pick that this task was claimed for has gone: queue the task again at once rather
    /// than leave it to lease expiry, and say so to every dispatcher (this one included).
    async fn put_back(&mut self, picked: Picked) {
        let id = picked.task.id;
        match store::unclaim(&self.pool, id, picked.lease).await {
            Ok(_) => {
                self.hints.hint();
                self.queued.notify_one();
            }
            Err(e) => log::warn!(
                "task {id} was claimed for a pick that left, and could not be put back: {e}"
            ),
        }
    }
}

impl DispatchLoop {
    /// The task that keeps this dispatcher's LISTEN connection, on its own connection to
    /// `url` (not one from the request pool). Spawn it beside `run`.
    pub fn listener(&self, url: String) -> impl std::future::Future<Output = ()> + Send + 'static {
        listen(url, self.hints.clone(), self.listening.clone(), self.events.clone())
    }

    /// Whether the LISTEN connection is up, so that notifications can arrive.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }
}

/// Follows the LISTEN connection: a task notification is a hint for the dispatcher, an abort
/// notification wakes the heartbeats of that task; a lost connection is reported by
/// `listening` and followed by a rescan once it is back.
async fn listen(url: String, hints: Arc<Hints>, listening: Arc<AtomicBool>, events: TaskEvents) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut listener = match connect_listener(&url).await {
            Ok(listener) => listener,
            Err(e) => {
                log::warn!("LISTEN connection failed, retrying in {delay:?}: {e}");
                sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        listening.store(true, Ordering::Release);
        hints.hint();
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.channel() == store::ABORT_CHANNEL => {
                    if let Ok(id) = n.payload().parse() {
                        events.wake(id, Woken::Abort);
                    }
                }
                Ok(Some(_)) => hints.hint(),
                Ok(None) => {
                    log::warn!("LISTEN connection lost; reconnecting");
                    break;
                }
                Err(e) => {
                    log::warn!("LISTEN connection failed: {e}");
                    break;
                }
            }
        }
        listening.store(false, Ordering::Release);
        hints.hint();
    }
}

async fn connect_listener(url: &str) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen_all([store::CHANNEL, store::ABORT_CHANNEL]).await?;
    Ok(listener)
}

/// Sends one NOTIFY per burst of `task_queued` calls.
async fn notify(pool: PgPool, queued: Arc<Notify>) {
    loop {
        queued.notified().await;
        if let Err(e) = store::notify(&pool).await {
            log::warn!("NOTIFY failed; parked picks will find the task at their next rescan: {e}");
        }
    }
}

/// Runs the dispatcher, its listener and its notifier from liftoff until shutdown.
pub fn stage() -> AdHoc {
    AdHoc::on_ignite("Dispatcher", |rocket| async {
        let Some(pool) = Db::fetch(&rocket).map(|db| db.pool().clone()) else {
            return rocket;
        };
        let Some(config) = rocket.state::<AppConfig>() else {
            return rocket;
        };
        let rescan = Duration::from_secs(config.dispatch_rescan_secs.max(1));
        let terms = PickTerms {
            confirm_secs: config.pick_confirm_secs.min(config.lease_secs),
            kill_grace_secs: config.kill_grace_secs,
            max_output_bytes: config.max_output_bytes,
        };
        let url: String = rocket.figment().extract_inner(DATABASE_URL_KEY).unwrap_or_default();
        let (dispatcher, state) = DispatchLoop::new(pool.clone(), rescan, terms);
        let queued = state.queued.clone();
        rocket.manage(dispatcher).attach(AdHoc::on_liftoff("Dispatcher loop", move |rocket| {
            Box::pin(async move {
                let shutdown = rocket.shutdown();
                tokio::spawn(until(shutdown.clone(), state.listener(url)));
                tokio::spawn(until(shutdown.clone(), notify(pool, queued)));
                tokio::spawn(state.run(shutdown));
            })
        }))
    })
}

async fn until(shutdown: Shutdown, work: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = shutdown => {}
        _ = work => {}
    }
}

/// Requests parked on a task in this process (heartbeats, output and status long polls), woken
/// when something happens to it: an abort is requested, output arrives, or the attempt ends.
#[derive(Clone, Default)]
pub struct TaskEvents {
    watches: Arc<Mutex<HashMap<Uuid, Vec<Arc<Wake>>>>>,
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
    id: Uuid,
    wake: Arc<Wake>,
}

impl TaskEvents {
    pub fn watch(&self, id: Uuid) -> Watch {
        let wake = Arc::new(Wake::default());
        self.lock().entry(id).or_default().push(wake.clone());
        Watch { registry: self.clone(), id, wake }
    }

    /// Wakes the requests parked on task `id` in this process.
    pub fn wake(&self, id: Uuid, what: Woken) {
        for wake in self.lock().get(&id).into_iter().flatten() {
            wake.seen.fetch_or(what as usize, Ordering::AcqRel);
            // A stored permit: a watch that is not awaiting yet still sees it.
            wake.notify.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<Arc<Wake>>>> {
        self.watches.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How often a long poll on a task looks at the database when no event wakes it: events are
/// local to one API process, and the task may change through another.
pub const RECHECK: Duration = Duration::from_secs(1);

impl TaskEvents {
    /// A long poll on task `id`: `look` at it until it says the wait is over, `deadline` passes
    /// or the server stops, and between looks wait for `what` to happen to the task here, or
    /// `recheck`. Answers what the last look saw.
    ///
    /// # Errors
    /// The first error of `look`.
    pub async fn poll<T, Look, Seen>(
        &self,
        id: Uuid,
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
