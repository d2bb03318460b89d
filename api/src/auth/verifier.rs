//! Verifying the tokens created through `/tokens`: by the digest of the presented secret,
//! each answer cached for `TTL`, so that a hot path (a pick, a heartbeat, an upload) does not
//! pay a database round trip per request. A revocation reaches every API process at once
//! through a NOTIFY, and within `TTL` even if that notification is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rocket::fairing::AdHoc;
use rocket::{Build, Rocket};
use rocket_db_pools::Database;
use sqlx::PgPool;
use tokio::time::Instant;

use super::{tokens, Principal};
use crate::dispatch::Notifier;
use crate::error::ApiError;
use crate::Db;

/// How long a verified (or refused) token is taken at its word: below the 5 s within which a
/// revocation must be seen everywhere.
pub const TTL: Duration = Duration::from_secs(4);

/// The most current tokens remembered; past it, they are all looked up afresh. (Only real
/// tokens get here, so this is the number of tokens in use at once.)
const MAX_KNOWN: usize = 10_000;

/// The most refusals remembered. A refusal is cached so that a client retrying a revoked token
/// does not cost a query per try; made-up tokens only ever evict other refusals.
const MAX_REFUSED: usize = 1_000;

type Digest = [u8; 32];

/// Cheap to clone: the clones share one cache.
#[derive(Clone)]
pub struct Verifier {
    pool: PgPool,
    notifier: Notifier,
    cache: Arc<Mutex<Cache>>,
}

#[derive(Default)]
struct Cache {
    known: HashMap<Digest, Known>,
    refused: HashMap<Digest, Instant>,
}

#[derive(Clone)]
struct Known {
    who: Principal,
    expires_at: Option<DateTime<Utc>>,
    at: Instant,
    /// The notifier's token generation when it was cached: a revocation since voids it.
    generation: u64,
}

fn refused() -> ApiError {
    ApiError::Unauthorized("the token is unknown, revoked or expired".into())
}

impl Verifier {
    pub fn new(pool: PgPool, notifier: Notifier) -> Verifier {
        Verifier { pool, notifier, cache: Arc::default() }
    }

    /// The caller a presented secret stands for.
    ///
    /// # Errors
    /// `Unauthorized` for a secret that is malformed, unknown, revoked or expired;
    /// `Unavailable` when the database cannot be reached.
    pub async fn verify(&self, presented: &str) -> Result<Principal, ApiError> {
        if !tokens::is_well_formed(presented) {
            return Err(refused());
        }
        self.verify_digest(&tokens::digest(presented)).await
    }

    /// Whether a caller verified earlier still holds a current token: for a response that
    /// outlasts a revocation (a followed log). The shared tokens always do.
    ///
    /// # Errors
    /// As `verify`.
    pub async fn recheck(&self, who: &Principal) -> Result<(), ApiError> {
        match &who.digest {
            Some(digest) => self.verify_digest(digest).await.map(drop),
            None => Ok(()),
        }
    }

    async fn verify_digest(&self, digest: &Digest) -> Result<Principal, ApiError> {
        let generation = self.notifier.token_generation();
        let cached = {
            let cache = self.lock();
            if cache.refused.get(digest).is_some_and(|at| at.elapsed() < TTL) {
                return Err(refused());
            }
            cache.known.get(digest).cloned()
        };
        let known = match cached {
            Some(hit) if hit.at.elapsed() < TTL && hit.generation == generation => Some(hit),
            _ => {
                let found = tokens::find(&self.pool, digest).await?;
                let mut cache = self.lock();
                cache.known.remove(digest);
                match found {
                    Some((who, expires_at)) => {
                        if cache.known.len() >= MAX_KNOWN {
                            cache.known.clear();
                        }
                        let at = Instant::now();
                        let known = Known { who, expires_at, at, generation };
                        cache.known.insert(*digest, known.clone());
                        Some(known)
                    }
                    None => {
                        if cache.refused.len() >= MAX_REFUSED {
                            cache.refused.clear();
                        }
                        cache.refused.insert(*digest, Instant::now());
                        None
                    }
                }
            }
        };
        match known {
            // Expiry is checked on every use, cached or not.
            Some(known) if known.expires_at.map_or(true, |at| at > Utc::now()) => Ok(known.who),
            _ => Err(refused()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Manages the verifier; the launch fails without its pool or the notifier.
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Token verifier", |rocket: Rocket<Build>| async {
        let pool = Db::fetch(&rocket).map(|db| db.pool().clone());
        let notifier = rocket.state::<Notifier>().cloned();
        let (Some(pool), Some(notifier)) = (pool, notifier) else {
            log::error!("the token verifier cannot start without its pool and the notifier");
            return Err(rocket);
        };
        Ok(rocket.manage(Verifier::new(pool, notifier)))
    })
}
