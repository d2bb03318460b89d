//! The reaper: every `reaper_interval_secs`, requeues tasks whose lease expired (their agent
//! is gone, or never received the pick), fails those on their last attempt ("agent lost") and
//! fails tasks that overran their timeout by more than grace plus lease. A thin loop around
//! `run_once`; several API processes may run it at once.

use std::time::Duration;

use rocket::fairing::AdHoc;
use sqlx::PgPool;

use crate::config::AppConfig;
use crate::dispatch::{Dispatcher, Woken};
use crate::tasks::store::{self, Reaped};
use crate::Db;
use rocket_db_pools::Database;

/// One pass. Requeued tasks are announced so that parked picks get them at once.
///
/// # Errors
/// The database's, when it cannot be reached; the next pass tries again.
pub async fn run_once(
    pool: &PgPool,
    config: &AppConfig,
    dispatcher: &Dispatcher,
) -> sqlx::Result<Reaped> {
    let overrun = config.kill_grace_secs + config.lease_secs;
    let reaped = store::reap(pool, config.max_attempts, overrun).await?;
    if reaped.requeued > 0 {
        dispatcher.task_queued();
    }
    for id in &reaped.ended {
        dispatcher.events().wake(*id, Woken::Ended);
    }
    if reaped != Reaped::default() {
        log::info!(
            "reaper: {} requeued ({} never confirmed), {} lost, {} cancelled, {} timed out",
            reaped.requeued,
            reaped.refunded,
            reaped.lost,
            reaped.cancelled,
            reaped.timed_out
        );
    }
    Ok(reaped)
}

pub fn stage() -> AdHoc {
    AdHoc::on_liftoff("Reaper", |rocket| {
        Box::pin(async move {
            let pool = Db::fetch(rocket).map(|db| db.pool().clone());
            let config = rocket.state::<AppConfig>().cloned();
            let dispatcher = rocket.state::<Dispatcher>().cloned();
            let (Some(pool), Some(config), Some(dispatcher)) = (pool, config, dispatcher) else {
                return;
            };
            let mut shutdown = rocket.shutdown();
            let mut tick = tokio::time::interval(Duration::from_secs(config.reaper_interval_secs));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tick.tick() => {}
                    }
                    if let Err(e) = run_once(&pool, &config, &dispatcher).await {
                        log::warn!("reaper pass failed: {e}");
                    }
                }
            });
        })
    })
}
