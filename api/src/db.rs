//! The PostgreSQL pool, built for rocket_db_pools from the same `databases.taskexec` settings,
//! with one change to sqlx's defaults: a connection is pinged before use only when it has
//! been idle for a while. sqlx's default pings on every acquire, which doubles the round
//! trips (and the transactions) of every statement this service runs.

use std::ops::Deref;
use std::time::Duration;

use rocket::figment::Figment;
use rocket_db_pools::Database;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres};

/// The pool, as request guard (`&Db`) and managed state. Handlers run each statement on it, so
/// none of them pins a connection while it waits (a parked pick holds no connection at all).
#[derive(Database)]
#[database("taskexec")]
pub struct Db(TunedPool);

impl Db {
    pub fn pool(&self) -> &PgPool {
        &self.0
    }
}

/// A connection idle at least this long is pinged before use: one that died with a database
/// restart is then replaced rather than failing a request.
const PING_WHEN_IDLE: Duration = Duration::from_secs(10);

pub struct TunedPool(PgPool);

impl Deref for TunedPool {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self.0
    }
}

#[rocket::async_trait]
impl rocket_db_pools::Pool for TunedPool {
    type Connection = PoolConnection<Postgres>;
    type Error = sqlx::Error;

    async fn init(figment: &Figment) -> Result<Self, sqlx::Error> {
        let config: rocket_db_pools::Config =
            figment.extract().map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
        let options = config.url.parse::<PgConnectOptions>()?.disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections as u32)
            .min_connections(config.min_connections.unwrap_or_default())
            .acquire_timeout(Duration::from_secs(config.connect_timeout))
            .idle_timeout(config.idle_timeout.map(Duration::from_secs))
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_WHEN_IDLE {
                        connection.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        Ok(TunedPool(pool))
    }

    async fn get(&self) -> Result<Self::Connection, Self::Error> {
        self.0.acquire().await
    }

    async fn close(&self) {
        self.0.close().await;
    }
}

/// A database failure, with the operation that failed: the cause is kept for the log, never
/// shown to a client.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct DbError {
    /// What the service was doing, in words ("claim queued tasks").
    pub op: &'static str,
    #[source]
    pub source: sqlx::Error,
}

impl DbError {
    /// Whether the failure means "the database is not there right now" rather than "the
    /// statement is wrong": a client may retry later.
    pub fn is_unavailable(&self) -> bool {
        match &self.source {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
            // A connection that closes during the handshake (a proxy in front of a dead
            // server) surfaces as a protocol error.
            sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
            // 08: connection exception; 57P: operator intervention (shutdown, crash recovery);
            // 53: insufficient resources (too many connections).
            sqlx::Error::Database(e) => e.code().is_some_and(|c| {
                c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")
            }),
            _ => false,
        }
    }
}

/// Names the operation of a failed statement: `query.await.op("claim queued tasks")?`.
pub trait Op<T> {
    fn op(self, op: &'static str) -> Result<T, DbError>;
}

impl<T> Op<T> for Result<T, sqlx::Error> {
    fn op(self, op: &'static str) -> Result<T, DbError> {
        self.map_err(|source| DbError { op, source })
    }
}

/// The pool and the settings a background stage (`stage`, as its log line names it) needs;
/// `None`, with an error logged saying what is missing, when the stages that provide them
/// failed or were not attached: the stage then fails the launch.
pub fn required(
    rocket: &rocket::Rocket<rocket::Build>,
    stage: &str,
) -> Option<(PgPool, crate::config::AppConfig)> {
    let pool = Db::fetch(rocket).map(|db| db.pool().clone()).ok_or("its database pool");
    let config = rocket.state::<crate::config::AppConfig>().cloned().ok_or("its settings");
    match pool.and_then(|pool| Ok((pool, config?))) {
        Ok(found) => Some(found),
        Err(what) => {
            log::error!("{stage} cannot start without {what}");
            None
        }
    }
}

/// The embedded migrations, as every process of this release applies them. A newer release may
/// have migrated the database already (a rolling update, or a rollback of that release): its
/// migrations only add, so this release runs against them rather than refuse to start (README,
/// "Upgrades"). Processes starting at once take turns on sqlx's advisory lock.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("../migrations");
    migrator.set_ignore_missing(true);
    migrator
}
