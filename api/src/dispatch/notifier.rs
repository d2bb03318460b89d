//! The LISTEN connection of this API process and the NOTIFYs it sends. A task notification
//! (from any API process) becomes a hint for the dispatcher; an abort notification wakes the
//! heartbeats of that task; an event notification (another process's task events, in bursts)
//! wakes the requests parked on those tasks; a token notification voids the cached verdicts on
//! tokens. The connection is its own, not one from the request pool; when it drops,
//! `listening` says so (the dispatcher then stops trusting "the queue is empty", long polls
//! look at the database every second), and it reconnects with backoff, hints a rescan and
//! makes every parked request look again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::sleep;

use taskexec_protocol::TaskId;

use super::events::{TaskEvents, Woken};
use crate::auth::tokens::TOKENS_CHANNEL;
use crate::tasks::store;

/// "The queue may have changed since the last claim": raised by notifications, local inserts
/// and a lost LISTEN connection; taken by the dispatcher's next round.
#[derive(Default)]
pub struct Hints {
    fresh: AtomicBool,
    pub(super) wake: Notify,
}

impl Hints {
    pub fn hint(&self) {
        self.fresh.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether a hint came since the last call.
    pub fn take(&self) -> bool {
        self.fresh.swap(false, Ordering::AcqRel)
    }
}

/// The notifier's state, shared with the dispatcher and the request handlers.
#[derive(Clone)]
pub struct Notifier {
    pub hints: Arc<Hints>,
    /// Raised per committed insert; the sender turns each burst into one NOTIFY.
    queued: Arc<Notify>,
    pub events: TaskEvents,
    /// Moves on at each revocation of a token (and each reconnect, which may have missed
    /// one): cached verdicts of an older generation are void.
    tokens: Arc<AtomicU64>,
    /// This process among the API processes, to skip its own events when they come back.
    instance: String,
    /// LISTEN connections established; all but the first are reconnects.
    connections: Arc<AtomicU64>,
}

impl Default for Notifier {
    fn default() -> Notifier {
        Notifier::with_events(TaskEvents::default())
    }
}

impl Notifier {
    /// A notifier that wakes requests parked on `events`.
    pub fn with_events(events: TaskEvents) -> Notifier {
        Notifier {
            hints: Arc::default(),
            queued: Arc::default(),
            events,
            tokens: Arc::default(),
            instance: instance_id(),
            connections: Arc::default(),
        }
    }
}

impl Notifier {
    /// Whether notifications can arrive (the LISTEN connection is up).
    pub fn is_listening(&self) -> bool {
        self.events.is_listening()
    }

    /// The payload of a NOTIFY on `EVENTS_CHANNEL` announcing `what` of one task, all but the
    /// task id, for a statement that sends it itself (see `payloads`).
    pub fn event_prefix(&self, what: Woken) -> String {
        format!("{};{}:", self.instance, what as usize)
    }

    /// How many times the LISTEN connection was established again after the first.
    pub fn reconnects(&self) -> u64 {
        self.connections.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// The current token generation (see `tokens`).
    pub fn token_generation(&self) -> u64 {
        self.tokens.load(Ordering::Acquire)
    }

    /// A token was revoked through this process: its cached verdicts are void now, not when
    /// the NOTIFY comes back (a request right after the revocation must be refused).
    pub fn tokens_changed(&self) {
        self.tokens.fetch_add(1, Ordering::AcqRel);
    }

    /// Announces a committed insert (or requeue): to this process's dispatcher at once, and to
    /// every API process through one NOTIFY per burst.
    pub fn task_queued(&self) {
        self.hints.hint();
        self.queued.notify_one();
    }

    /// Follows the LISTEN connection on `url` until the future is dropped. A connection silent
    /// for `probe` is asked to answer a query within `probe`, or replaced: one whose peer
    /// vanished without closing it (a host gone, a partition) would otherwise look alive
    /// forever while the other processes' events never came.
    pub async fn listen(self, url: String, probe: Duration) {
        let mut delay = Duration::from_millis(100);
        loop {
            let mut listener = match connect(&url).await {
                Ok(listener) => listener,
                Err(e) => {
                    log::warn!("LISTEN connection failed, retrying in {delay:?}: {e}");
                    sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            self.connections.fetch_add(1, Ordering::Relaxed);
            self.events.listening.store(true, Ordering::Release);
            self.hints.hint();
            self.tokens.fetch_add(1, Ordering::AcqRel);
            // Events of other processes may have been missed while the connection was down.
            self.events.wake_all();
            loop {
                // A timeout that cuts a notification half-read leaves the stream out of step;
                // the probe then fails and the connection is replaced, every waiter woken: a
                // spurious reconnect at worst.
                let Ok(received) = tokio::time::timeout(probe, listener.try_recv()).await else {
                    match tokio::time::timeout(probe, store::probe(&mut listener)).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => log::warn!("LISTEN connection failed its probe: {e}"),
                        Err(_) => log::warn!(
                            "LISTEN connection silent for {probe:?} did not answer within \
                             {probe:?}; reconnecting"
                        ),
                    }
                    break;
                };
                match received {
                    Ok(Some(n)) if n.channel() == store::ABORT_CHANNEL => {
                        if let Ok(id) = n.payload().parse() {
                            self.events.wake(id, Woken::Abort);
                        }
                    }
                    Ok(Some(n)) if n.channel() == TOKENS_CHANNEL => {
                        self.tokens.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(Some(n)) if n.channel() == store::EVENTS_CHANNEL => {
                        for (id, bits) in parse_events(n.payload(), &self.instance) {
                            self.events.wake_bits(id, bits);
                        }
                    }
                    Ok(Some(_)) => self.hints.hint(),
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
            self.events.listening.store(false, Ordering::Release);
            self.hints.hint();
        }
    }

    /// Sends the task events announced here to the other API processes: one NOTIFY per burst
    /// (a few for a large one), until the pool closes (it runs through the shutdown's grace, so
    /// that the events of requests finished then still go out). A failed burst is sent again.
    pub async fn send_events(self, pool: PgPool) {
        loop {
            self.events.announced.notified().await;
            let burst = self.events.take_announced();
            for payload in payloads(&self.instance, &burst) {
                if let Err(e) = store::notify_events(&pool, &payload).await {
                    if pool.is_closed() {
                        return;
                    }
                    // Not lost: the burst goes again with the next, after a pause.
                    log::warn!("NOTIFY of task events failed, retrying: {e}");
                    self.events.requeue(burst);
                    sleep(Duration::from_secs(1)).await;
                    self.events.announced.notify_one();
                    break;
                }
            }
        }
    }

    /// Sends one NOTIFY per burst of `task_queued` calls, until the future is dropped.
    pub async fn send(self, pool: PgPool) {
        loop {
            self.queued.notified().await;
            if let Err(e) = store::notify(&pool).await {
                log::warn!("NOTIFY failed; parked picks find the task at their next rescan: {e}");
            }
        }
    }
}

async fn connect(url: &str) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect(url).await?;
    let channels = [store::CHANNEL, store::ABORT_CHANNEL, store::EVENTS_CHANNEL, TOKENS_CHANNEL];
    listener.listen_all(channels).await?;
    Ok(listener)
}

/// 64 random bits in hex: which API process sent an event burst.
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    // A failure leaves zeros: the process then skips another's events only if both failed.
    let _ = getrandom::getrandom(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The most of a NOTIFY payload used (PostgreSQL allows 8,000 bytes).
const MAX_PAYLOAD: usize = 7_900;

/// Payloads for a burst of events: `instance;bits:id;bits:id...`, each under `MAX_PAYLOAD`.
fn payloads(instance: &str, events: &HashMap<TaskId, usize>) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut current = String::from(instance);
    for (id, bits) in events {
        let item = format!(";{bits}:{id}");
        if current.len() + item.len() > MAX_PAYLOAD {
            payloads.push(std::mem::replace(&mut current, String::from(instance)));
        }
        current.push_str(&item);
    }
    if current.len() > instance.len() {
        payloads.push(current);
    }
    payloads
}

/// The events of another process's payload; none from this process's own (already woken).
fn parse_events(payload: &str, instance: &str) -> Vec<(TaskId, usize)> {
    let mut parts = payload.split(';');
    if parts.next() == Some(instance) {
        return Vec::new();
    }
    parts
        .filter_map(|item| {
            let (bits, id) = item.split_once(':')?;
            Some((id.parse().ok()?, bits.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_go_through_payloads_and_not_back_to_their_sender() {
        let events: HashMap<TaskId, usize> =
            (0..500).map(|i| (TaskId::random(), 1 + i % 6)).collect();
        let payloads = payloads("a1", &events);
        assert!(payloads.len() > 1, "500 events need several payloads");
        assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let mut back: HashMap<TaskId, usize> = HashMap::new();
        for payload in &payloads {
            assert!(parse_events(payload, "a1").is_empty(), "our own");
            back.extend(parse_events(payload, "b2"));
        }
        assert_eq!(back, events);
    }
}
