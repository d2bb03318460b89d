//! The LISTEN connection of this API process and the NOTIFYs it sends. A task notification
//! (from any API process) becomes a hint for the dispatcher; an abort notification wakes the
//! heartbeats of that task; a token notification voids the cached verdicts on tokens. The connection is its own, not one from the request pool; when it
//! drops, `listening` says so (the dispatcher then stops trusting "the queue is empty"), and it
//! reconnects with backoff and hints a rescan.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::sleep;

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
#[derive(Clone, Default)]
pub struct Notifier {
    pub hints: Arc<Hints>,
    listening: Arc<AtomicBool>,
    /// Raised per committed insert; the sender turns each burst into one NOTIFY.
    queued: Arc<Notify>,
    pub events: TaskEvents,
    /// Moves on at each revocation of a token (and each reconnect, which may have missed
    /// one): cached verdicts of an older generation are void.
    tokens: Arc<AtomicU64>,
}

impl Notifier {
    /// Whether notifications can arrive (the LISTEN connection is up).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
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

    /// Follows the LISTEN connection on `url` until the future is dropped.
    pub async fn listen(self, url: String) {
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
            self.listening.store(true, Ordering::Release);
            self.hints.hint();
            self.tokens.fetch_add(1, Ordering::AcqRel);
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) if n.channel() == store::ABORT_CHANNEL => {
                        if let Ok(id) = n.payload().parse() {
                            self.events.wake(id, Woken::Abort);
                        }
                    }
                    Ok(Some(n)) if n.channel() == TOKENS_CHANNEL => {
                        self.tokens.fetch_add(1, Ordering::AcqRel);
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
            self.listening.store(false, Ordering::Release);
            self.hints.hint();
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
    listener.listen_all([store::CHANNEL, store::ABORT_CHANNEL, TOKENS_CHANNEL]).await?;
    Ok(listener)
}
