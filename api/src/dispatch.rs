//! The long poll. One dispatcher per API process owns the parked picks and one dedicated
//! LISTEN connection. A wake-up (a NOTIFY from any API process, a new pick, the fallback
//! timer) leads to at most one claim statement for all parked picks together, and the claimed
//! tasks go to the oldest waiters first. Parking costs the database nothing while the queue is
//! known to be empty; notifications are hints and the rescan timer is the guarantee.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rocket::fairing::AdHoc;
use rocket::Shutdown;
use rocket_db_pools::Database;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{sleep, sleep_until, Instant};

use crate::config::{AppConfig, DATABASE_URL_KEY};
use crate::error::ApiError;
use crate::tasks::model::Picked;
use crate::tasks::store;
use crate::Db;

/// The most picks served by one claim statement.
const MAX_BATCH: usize = 512;

/// The handle that request handlers use (managed state).
pub struct Dispatcher {
    parks: mpsc::UnboundedSender<Waiter>,
    queued: Arc<Notify>,
    parked: Arc<AtomicUsize>,
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
        self.parks
            .send(Waiter {
                agent,
                deadline,
                reply,
            })
            .map_err(|_| ApiError::Unavailable)?;
        Ok(receiver)
    }

    /// How many picks are parked right now (as of the dispatcher's last round).
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Announces a committed insert (or requeue) to every API process. Bursts are coalesced
    /// into one NOTIFY, sent after the caller's statement has committed.
    pub fn task_queued(&self) {
        self.queued.notify_one();
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
    hints: Arc<Notify>,
    queued: Arc<Notify>,
    listening: Arc<AtomicBool>,
    parked: Arc<AtomicUsize>,
    waiters: VecDeque<Waiter>,
    /// The last claim found fewer tasks than waiters, and no hint has come since.
    queue_empty: bool,
    rescan: Duration,
    last_claim: Instant,
}

impl DispatchLoop {
    /// A dispatcher and its loop; nothing runs until `run` or `run_once` is called.
    pub fn new(pool: PgPool, rescan: Duration) -> (Dispatcher, DispatchLoop) {
        let (parks, receiver) = mpsc::unbounded_channel();
        let queued = Arc::new(Notify::new());
        let parked = Arc::new(AtomicUsize::new(0));
        let dispatcher = Dispatcher {
            parks,
            queued: queued.clone(),
            parked: parked.clone(),
        };
        let state = DispatchLoop {
            pool,
            parks: receiver,
            hints: Arc::new(Notify::new()),
            queued,
            listening: Arc::new(AtomicBool::new(false)),
            parked,
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
                _ = self.hints.notified() => self.queue_empty = false,
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
    /// statement, skipped when the queue is known to be empty), and answers the picks whose
    /// deadline has passed.
    pub async fn run_once(&mut self) -> Round {
        while let Ok(waiter) = self.parks.try_recv() {
            self.waiters.push_back(waiter);
        }
        self.waiters.retain(|w| !w.reply.is_closed());
        if !self.listening.load(Ordering::Acquire) {
            // Without a LISTEN connection no hint can arrive: "empty" may be stale.
            self.queue_empty = false;
        }
        let mut round = Round::default();
        if !self.waiters.is_empty() && !self.queue_empty {
            self.claim(&mut round).await;
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

    async fn claim(&mut self, round: &mut Round) {
        let batch = self.waiters.len().min(MAX_BATCH);
        let agents: Vec<String> = self
            .waiters
            .iter()
            .take(batch)
            .map(|w| w.agent.clone())
            .collect();
        self.last_claim = Instant::now();
        round.queried = true;
        let claimed = match store::claim(&self.pool, &agents).await {
            Ok(claimed) => claimed,
            Err(e) => {
                log::warn!("claim for {batch} parked picks failed: {e}");
                return;
            }
        };
        self.queue_empty = claimed.len() < batch;
        let served: Vec<Waiter> = self.waiters.drain(..claimed.len()).collect();
        for (waiter, claimed) in served.into_iter().zip(claimed) {
            let picked = Picked {
                task: claimed.task,
                lease: claimed.lease,
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
    }

    /// The pick that this task was claimed for has gone: queue the task again at once rather
    /// than leave it to lease expiry, and say so to every dispatcher (this one included).
    async fn put_back(&mut self, picked: Picked) {
        let id = picked.task.id;
        match store::unclaim(&self.pool, id, picked.lease).await {
            Ok(_) => self.queued.notify_one(),
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
        listen(url, self.hints.clone(), self.listening.clone())
    }

    /// Whether the LISTEN connection is up, so that notifications can arrive.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }
}

/// Follows the LISTEN connection: every notification is a hint; a lost connection is
/// reported by `listening` and followed by a rescan once it is back.
async fn listen(url: String, hints: Arc<Notify>, listening: Arc<AtomicBool>) {
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
        hints.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => hints.notify_one(),
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
        hints.notify_one();
    }
}

async fn connect_listener(url: &str) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(store::CHANNEL).await?;
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
        let Some(pool) = Db::fetch(&rocket).map(|db| (**db).clone()) else {
            return rocket;
        };
        let rescan = rocket
            .state::<AppConfig>()
            .map_or(Duration::from_secs(5), |c| {
                Duration::from_secs(c.dispatch_rescan_secs.max(1))
            });
        let url: String = rocket
            .figment()
            .extract_inner(DATABASE_URL_KEY)
            .unwrap_or_default();
        let (dispatcher, state) = DispatchLoop::new(pool.clone(), rescan);
        let queued = state.queued.clone();
        rocket
            .manage(dispatcher)
            .attach(AdHoc::on_liftoff("Dispatcher loop", move |rocket| {
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
