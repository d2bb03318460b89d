//! The long poll. One dispatcher per API process owns the parked picks. A wake-up (a hint from
//! the notifier, a new pick, the fallback timer) leads to at most one claim statement for all
//! parked picks together, and the claimed tasks go to the oldest waiters first. Parking costs
//! the database nothing while the queue is known to be empty.
//!
//! A parked pick whose agent has gone (scaled in, killed) is found out when its task is handed
//! over: its connection is closed, so the response is never taken, the [`Handover`] is dropped
//! unread, and the task goes straight back to the queue and on to the next waiter, within the
//! same few milliseconds. Only an agent that dies in the instant its response is being written
//! costs the confirmation window (`pick_confirm_secs`, then the reaper).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rocket::Shutdown;
use sqlx::{Connection, PgConnection, PgPool};
use taskexec_protocol::{Assignment, LeaseTerms};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{sleep_until, Instant};

use super::events::{TaskEvents, Woken};
use super::notifier::Notifier;
use crate::db::{DbError, Op};
use crate::error::ApiError;
use crate::tasks::lease::Lease;
use crate::tasks::store::{self, Claimed, Picker};

/// The most tasks claimed by one statement (a pick taking `max` counts `max` times).
const MAX_BATCH: usize = 512;

/// The handle that request handlers use (managed state).
#[derive(Clone)]
pub struct Dispatcher {
    parks: mpsc::UnboundedSender<Waiter>,
    parked: Arc<AtomicUsize>,
    /// Raised when a parked pick's client has gone, so that the loop lets it go at once.
    left: Arc<Notify>,
    notifier: Notifier,
}

/// What a parked pick receives: one to `max` tasks, or none at its deadline or on shutdown.
pub type Reply = oneshot::Receiver<Vec<Handover>>;

struct Waiter {
    agent: String,
    /// The agent's tags, sorted and joined by commas (empty for none).
    tags: String,
    /// How many tasks the pick takes at most (an agent's free slots).
    max: usize,
    deadline: Instant,
    reply: oneshot::Sender<Vec<Handover>>,
}

impl Dispatcher {
    /// Parks a pick for `agent`, which takes up to `max` tasks (at least one) whose tags are
    /// among `tags` (sorted, without repeats). The reply comes as soon as a claim finds any,
    /// else by `deadline` (a deadline in the past asks for one look at the queue), unless the
    /// dispatcher is stuck on the database.
    ///
    /// # Errors
    /// `Unavailable` when the dispatcher has stopped (the server is shutting down).
    pub fn park(
        &self,
        agent: String,
        tags: &[String],
        max: usize,
        deadline: Instant,
    ) -> Result<Reply, ApiError> {
        let (reply, receiver) = oneshot::channel();
        let waiter = Waiter { agent, tags: tags.join(","), max: max.max(1), deadline, reply };
        self.parks.send(waiter).map_err(|_| ApiError::Unavailable)?;
        Ok(receiver)
    }

    /// A parked pick's client has gone: the dispatcher drops it in a round now (one without a
    /// query unless one was due anyway) rather than at its next rescan, and claims nothing
    /// for it.
    pub fn left(&self) {
        self.left.notify_one();
    }

    /// How many picks are parked right now (as of the dispatcher's last round).
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// How many times the LISTEN connection was established again after the first.
    pub fn listen_reconnects(&self) -> u64 {
        self.notifier.reconnects()
    }

    /// Whether notifications can arrive (the LISTEN connection is up). When they cannot,
    /// long polls that wait for one should wait less.
    pub fn is_listening(&self) -> bool {
        self.notifier.is_listening()
    }

    /// The payload announcing `what` of a task to the other API processes, but for the task's
    /// id: for a statement that sends the NOTIFY itself, on its commit.
    pub fn event_prefix(&self, what: Woken) -> String {
        self.notifier.event_prefix(what)
    }

    /// The registry of requests waiting for something to happen to a task.
    pub fn events(&self) -> &TaskEvents {
        &self.notifier.events
    }

    /// Announces a committed insert (or requeue) to every dispatcher, this one at once.
    pub fn task_queued(&self) {
        self.notifier.task_queued();
    }
}

/// A task claimed for a parked pick, on its way to the agent. It counts as delivered only once
/// the pick's response has been taken for sending on a live connection (see the responder in
/// `tasks::routes`); until `delivery` is signed, dropping it puts its task back in the queue.
pub struct Handover {
    pub assignment: Assignment,
    pub delivery: Delivery,
}

impl Handover {
    /// The assignment, taken as delivered (an in-process caller).
    pub fn delivered(self) -> Assignment {
        self.delivery.delivered();
        self.assignment
    }
}

/// The receipt of a handover: `delivered` signs it; dropping it unsigned sends the lease back
/// to the dispatcher, which puts the task back in the queue. Either way it stops counting as
/// in flight.
pub struct Delivery(Option<Receipt>);

struct Receipt {
    lease: Lease,
    returns: mpsc::UnboundedSender<Lease>,
    in_flight: Arc<InFlight>,
}

/// Handovers neither delivered nor come back yet, and a wake for a dispatcher waiting for them
/// to settle at shutdown.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    settled: Notify,
}

impl InFlight {
    fn settle(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.settled.notify_one();
    }
}

impl Delivery {
    fn new(
        lease: Lease,
        returns: mpsc::UnboundedSender<Lease>,
        in_flight: Arc<InFlight>,
    ) -> Delivery {
        in_flight.count.fetch_add(1, Ordering::AcqRel);
        Delivery(Some(Receipt { lease, returns, in_flight }))
    }

    pub fn delivered(mut self) {
        if let Some(receipt) = self.0.take() {
            receipt.in_flight.settle();
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(receipt) = self.0.take() {
            // Sent before it stops counting: see `put_back_stragglers`.
            let _ = receipt.returns.send(receipt.lease);
            receipt.in_flight.settle();
        }
    }
}

/// How long a stopping dispatcher waits for the handovers in flight to be delivered or come
/// back (they resolve within milliseconds; this bounds a stuck one).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

/// A connection for the put-backs at shutdown, opened on first use with the pool's settings.
async fn straggler_connection<'c>(
    pool: &PgPool,
    connection: &'c mut Option<PgConnection>,
) -> Result<&'c mut PgConnection, DbError> {
    if connection.is_none() {
        let options = pool.connect_options();
        *connection = Some(PgConnection::connect_with(&options).await.op("connect at shutdown")?);
    }
    Ok(connection.as_mut().expect("just opened"))
}

/// What one round of the dispatcher did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Claim statements run: none while nothing can be claimed, one for every parked pick
    /// at once, more only when a task that picks of several tag sets could take went to one
    /// of them and the others must look again.
    pub claims: usize,
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
    undelivered: mpsc::UnboundedReceiver<Lease>,
    /// Cloned into each handover, so that it can come back.
    returns: mpsc::UnboundedSender<Lease>,
    /// Handovers that came back, to be put back in the next round.
    returning: Vec<Lease>,
    /// Handovers neither delivered nor come back yet.
    in_flight: Arc<InFlight>,
    parked: Arc<AtomicUsize>,
    left: Arc<Notify>,
    notifier: Notifier,
    terms: LeaseTerms,
    waiters: VecDeque<Waiter>,
    /// The tag sets for which the last claim found fewer tasks than waiters, with no hint
    /// since: nothing to claim for their waiters until one comes (or a delayed task is due).
    empty: HashSet<String>,
    /// When the earliest delayed task is due, as last learned from the database.
    due: Option<Instant>,
    rescan: Duration,
    last_claim: Instant,
}

impl DispatchLoop {
    /// A dispatcher and its loop; nothing runs until `run` or `run_once` is called.
    pub fn new(
        pool: PgPool,
        notifier: Notifier,
        rescan: Duration,
        terms: LeaseTerms,
    ) -> (Dispatcher, DispatchLoop) {
        let (parks, parks_rx) = mpsc::unbounded_channel();
        let (undelivered, undelivered_rx) = mpsc::unbounded_channel();
        let parked = Arc::new(AtomicUsize::new(0));
        let left = Arc::new(Notify::new());
        let dispatcher = Dispatcher {
            parks,
            parked: parked.clone(),
            left: left.clone(),
            notifier: notifier.clone(),
        };
        let state = DispatchLoop {
            pool,
            parks: parks_rx,
            undelivered: undelivered_rx,
            returns: undelivered,
            returning: Vec::new(),
            in_flight: Arc::default(),
            parked,
            left,
            notifier,
            terms,
            waiters: VecDeque::new(),
            empty: HashSet::new(),
            due: None,
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
                Some(lease) = self.undelivered.recv() => self.returning.push(lease),
                _ = self.notifier.hints.wake.notified() => {}
                _ = self.left.notified() => {}
                _ = sleep_until(next_deadline.unwrap_or(rescan_at)), if next_deadline.is_some() => {}
                _ = sleep_until(rescan_at), if !self.waiters.is_empty() => self.empty.clear(),
                // A delayed task has come due: a look for every tag set, waiting or not (a
                // pick that parks later must not take its tags for empty).
                _ = sleep_until(self.due.unwrap_or(rescan_at)), if self.due.is_some() => {
                    self.due = None;
                    self.empty.clear();
                }
            }
            self.run_once().await;
        }
        for waiter in self.waiters.drain(..) {
            let _ = waiter.reply.send(Vec::new());
        }
        self.put_back_stragglers().await;
    }

    /// At shutdown: the handovers still in flight are delivered or come back within moments
    /// (a pick whose agent has gone); those that come back are put back in the queue before
    /// the process exits, rather than left to the confirmation window. The request pool is
    /// closing meanwhile, so this uses a connection of its own.
    async fn put_back_stragglers(&mut self) {
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        let mut connection = None;
        let mut put_back = 0;
        loop {
            // Read before draining: a delivery that comes back sends its lease before it stops
            // counting, so when none was in flight here, the drain below has them all.
            let in_flight = self.in_flight.count.load(Ordering::Acquire);
            while let Ok(lease) = self.undelivered.try_recv() {
                self.returning.push(lease);
            }
            for lease in std::mem::take(&mut self.returning) {
                match straggler_connection(&self.pool, &mut connection).await {
                    Ok(db) => match lease.unclaim(db).await {
                        Ok(done) => put_back += usize::from(done),
                        Err(e) => {
                            log::warn!("task {}: not put back (the reaper will): {e}", lease.task)
                        }
                    },
                    Err(e) => {
                        log::warn!("task {}: not put back (the reaper will): {e}", lease.task)
                    }
                }
            }
            if in_flight == 0 {
                break;
            }
            tokio::select! {
                Some(lease) = self.undelivered.recv() => self.returning.push(lease),
                _ = self.in_flight.settled.notified() => {}
                _ = sleep_until(deadline) => break,
            }
        }
        if put_back > 0 {
            log::info!("stopping: {put_back} tasks whose picks had gone queued again");
            // The notifier has stopped: tell the other API processes directly.
            if let Ok(db) = straggler_connection(&self.pool, &mut connection).await {
                if let Err(e) = store::notify(db).await {
                    log::warn!("NOTIFY after putting tasks back failed; rescans find them: {e}");
                }
            }
        }
    }

    /// Puts back the tasks of handovers that never reached their agent, takes in newly parked
    /// picks, claims tasks for as many of them as the queue allows (one statement per
    /// `MAX_BATCH` picks, skipped when the queue is known to be empty unless a pick asked for
    /// one look at once), and answers the picks whose deadline has passed.
    pub async fn run_once(&mut self) -> Round {
        let mut round = Round::default();
        while let Ok(lease) = self.undelivered.try_recv() {
            self.returning.push(lease);
        }
        for lease in std::mem::take(&mut self.returning) {
            round.returned += usize::from(self.put_back(lease).await);
        }
        while let Ok(waiter) = self.parks.try_recv() {
            self.waiters.push_back(waiter);
        }
        self.waiters.retain(|w| !w.reply.is_closed());
        // Without a LISTEN connection no hint can arrive: "empty" may be stale.
        if self.notifier.hints.take() || !self.notifier.is_listening() {
            self.empty.clear();
        }
        let now = Instant::now();
        // A pick with `wait=0` gets a look at the database itself: a task another API process
        // has just created may not have been announced here yet.
        if self.waiters.iter().any(|w| w.deadline <= now) {
            self.empty.clear();
        }
        while self.waiters.iter().any(|w| !self.empty.contains(&w.tags)) {
            if !self.claim(&mut round).await {
                break;
            }
        }
        let now = Instant::now();
        let (expired, waiting): (Vec<_>, Vec<_>) =
            self.waiters.drain(..).partition(|w| w.deadline <= now);
        self.waiters.extend(waiting);
        for waiter in expired {
            let _ = waiter.reply.send(Vec::new());
            round.expired += 1;
        }
        self.parked.store(self.waiters.len(), Ordering::Relaxed);
        round
    }

    /// One claim statement for the oldest waiters whose tags are not known to have nothing to
    /// claim, up to `MAX_BATCH` tasks: a pick that takes `max` tasks counts as `max` pickers.
    /// False when it failed.
    async fn claim(&mut self, round: &mut Round) -> bool {
        // A waiter's index once for every task it may take.
        let batch: Vec<usize> = (0..self.waiters.len())
            .filter(|&i| !self.empty.contains(&self.waiters[i].tags))
            .flat_map(|i| std::iter::repeat(i).take(self.waiters[i].max))
            .take(MAX_BATCH)
            .collect();
        let pickers: Vec<Picker<'_>> = batch
            .iter()
            .map(|&i| Picker { agent: &self.waiters[i].agent, tags: &self.waiters[i].tags })
            .collect();
        self.last_claim = Instant::now();
        round.claims += 1;
        let claim = match store::claim(&self.pool, &pickers, &self.terms).await {
            Ok(claim) => claim,
            Err(e) => {
                log::warn!("claim for {} parked picks failed: {e}", batch.len());
                return false;
            }
        };
        let claimed_count = claim.claimed.len();
        // The tasks each waiter got, by its place in the queue of waiters.
        let mut handed: HashMap<usize, Vec<Claimed>> = HashMap::new();
        for claimed in claim.claimed {
            handed.entry(batch[claimed.slot]).or_default().push(claimed);
        }
        if !claim.shared {
            // Every tag set with a waiter that got fewer than it asked (in this batch) has
            // nothing more to claim.
            let mut asked: HashMap<usize, usize> = HashMap::new();
            for &i in &batch {
                *asked.entry(i).or_default() += 1;
            }
            for (i, asked) in asked {
                if handed.get(&i).map_or(0, Vec::len) < asked {
                    self.empty.insert(self.waiters[i].tags.clone());
                }
            }
        }
        let waiters = std::mem::take(&mut self.waiters);
        for (i, waiter) in waiters.into_iter().enumerate() {
            let Some(claimed) = handed.remove(&i) else {
                self.waiters.push_back(waiter);
                continue;
            };
            let handovers: Vec<Handover> = claimed
                .into_iter()
                .map(|claimed| Handover {
                    assignment: Assignment {
                        task: claimed.task,
                        lease: claimed.lease.token,
                        lease_expires_at: claimed.lease_expires_at,
                        terms: self.terms,
                    },
                    delivery: Delivery::new(
                        claimed.lease,
                        self.returns.clone(),
                        self.in_flight.clone(),
                    ),
                })
                .collect();
            let count = handovers.len();
            // A pick that gave up meanwhile drops the handovers, which come back to be put
            // back in the next round.
            if waiter.reply.send(handovers).is_ok() {
                round.delivered += count;
            }
        }
        // Waiters are left without a task: learn when the next delayed one is due, so as to
        // wake for it rather than poll.
        if claimed_count < batch.len() && !claim.shared {
            let next_due = match claim.next_due {
                Some(next_due) => next_due,
                None => match store::next_due(&self.pool).await {
                    Ok(next_due) => next_due,
                    Err(e) => {
                        log::warn!("looking for delayed tasks failed (the rescan will): {e}");
                        None
                    }
                },
            };
            // A millisecond late, so that the claim finds it due by the database's clock.
            self.due = next_due.map(|secs| {
                let wait = Duration::try_from_secs_f64(secs).unwrap_or(Duration::ZERO);
                Instant::now() + wait.min(self.rescan * 1000) + Duration::from_millis(1)
            });
        }
        true
    }

    /// The pick this task was claimed for has gone: queue the task again at once rather than
    /// leave it to the confirmation window, and say so to every dispatcher (this one
    /// included). True when it was put back.
    async fn put_back(&mut self, lease: Lease) -> bool {
        match lease.unclaim(&self.pool).await {
            Ok(true) => {
                log::info!("task {}: its pick had gone; queued again", lease.task);
                self.notifier.task_queued();
                true
            }
            Ok(false) => false,
            // The server is stopping: the put-backs at shutdown take it, on a connection of
            // their own.
            Err(_) if self.pool.is_closed() => {
                self.returning.push(lease);
                false
            }
            Err(e) => {
                log::warn!(
                    "task {}: its pick had gone, and it could not be put back \
                     (the reaper will): {e}",
                    lease.task
                );
                false
            }
        }
    }
}
