//! Verifying the tokens created through `/tokens`: by the digest of the presented secret,
//! each answer cached for `TTL`, so that a hot path (a pick, a heartbeat, an upload) does not
//! pay a database round trip per request. A revocation reaches every API process at once
//! through a NOTIFY, and within `TTL` even if that notification is lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rocket::fairing::AdHoc;
use rocket::{Build, Rocket};
use rocket_db_pools::Database;
use sqlx::PgPool;
use taskexec_protocol::TOKEN_PREFIX;
use tokio::time::Instant;

use super::{tokens, Principal};
use crate::dispatch::Notifier;
use crate::error::ApiError;
use crate::Db;

/// How long a verified (or refused) token is taken at its word: below the 5 s within which a
/// revocation must be seen everywhere.
pub const TTL: Duration = Duration::from_secs(4);

/// The most answers kept: a caller spraying made-up tokens costs memory up to this, then the
/// cache starts afresh.
const MAX_CACHED: usize = 10_000;

pub struct Verifier {
    pool: PgPool,
    notifier: Notifier,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

#[derive(Clone)]
struct Cached {
    verdict: Option<(Principal, Option<DateTime<Utc>>)>,
    at: Instant,
    /// The notifier's token generation when it was cached: a revocation since voids it.
    generation: u64,
}

impl Verifier {
    pub fn new(pool: PgPool, notifier: Notifier) -> Verifier {
        Verifier { pool, notifier, cache: Mutex::new(HashMap::new()) }
    }

    /// The caller a presented secret stands for.
    ///
    /// # Errors
    /// `Unauthorized` for a secret that is unknown, revoked or expired; `Unavailable` when
    /// the database cannot be reached.
    pub async fn verify(&self, presented: &str) -> Result<Principal, ApiError> {
        let refused = || ApiError::Unauthorized("the token is unknown, revoked or expired".into());
        if !presented.starts_with(TOKEN_PREFIX) {
            return Err(refused());
        }
        let digest = tokens::digest(presented);
        let generation = self.notifier.token_generation();
        let cached = self.lock().get(&digest).cloned();
        let verdict = match cached {
            Some(hit) if hit.at.elapsed() < TTL && hit.generation == generation => hit.verdict,
            _ => {
                let verdict = tokens::find(&self.pool, &digest).await?;
                let mut cache = self.lock();
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
                let entry = Cached { verdict: verdict.clone(), at: Instant::now(), generation };
                cache.insert(digest, entry);
                verdict
            }
        };
        match verdict {
            Some((who, expires_at)) if expires_at.map_or(true, |at| at > Utc::now()) => Ok(who),
            _ => Err(refused()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Cached>> {
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
