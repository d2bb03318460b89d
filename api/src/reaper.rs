//! The reaper: every `reaper_interval_secs`, requeues tasks whose lease expired (their agent
//! is gone, or never received the pick), fails those on their last attempt ("agent lost") and
//! fails tasks that overran their timeout by more than grace plus lease. A thin loop around
//! `run_once`; several API processes may run it at once.

use std::time::Duration;

use rocket::fairing::AdHoc;
use rocket::{Build, Rocket};
use sqlx::PgPool;

use crate::config::AppConfig;
use crate::db::{required, DbError};
use crate::dispatch::{Dispatcher, Woken};
use crate::metrics::Metrics;
use crate::retention;
use crate::tasks::journal;
use crate::tasks::store::{self, Fate, Reaped};

/// One pass. Requeued tasks are announced so that parked picks get them at once; the requests
/// waiting on the ended attempts are woken.
///
/// # Errors
/// The database's, when it cannot be reached; the next pass tries again.
pub async fn run_once(
    pool: &PgPool,
    config: &AppConfig,
    dispatcher: &Dispatcher,
) -> Result<Reaped, DbError> {
    let overrun = config.kill_grace_secs + config.lease_secs;
    let reaped = store::reap(pool, config.max_attempts, overrun).await?;
    if reaped.requeued() > 0 {
        dispatcher.task_queued();
    }
    for (id, fate) in &reaped.ended {
        dispatcher.events().announce(*id, Woken::Ended);
        journal::reaped(*id, *fate);
    }
    if !reaped.ended.is_empty() {
        log::info!(
            "reaper: {} requeued ({} never confirmed), {} lost, {} cancelled, {} timed out",
            reaped.requeued(),
            reaped.count(Fate::Refunded),
            reaped.count(Fate::Lost),
            reaped.count(Fate::Cancelled),
            reaped.count(Fate::TimedOut)
        );
    }
    Ok(reaped)
}

/// Runs the reaper from liftoff until shutdown, and retention once a minute in the same loop.
/// The launch fails if it cannot be set up: without it, lost agents would hold their tasks
/// forever.
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Reaper", |rocket: Rocket<Build>| async {
        let Some((pool, config)) = required(&rocket, "the reaper") else {
            return Err(rocket);
        };
        let Some(dispatcher) = rocket.state::<Dispatcher>().cloned() else {
            log::error!("the reaper cannot start without the dispatcher");
            return Err(rocket);
        };
        let Some(metrics) = rocket.state::<Metrics>().cloned() else {
            log::error!("the reaper cannot start without its metrics");
            return Err(rocket);
        };
        Ok(rocket.attach(AdHoc::on_liftoff("Reaper loop", move |rocket| {
            let mut shutdown = rocket.shutdown();
            Box::pin(async move {
                let period = Duration::from_secs(config.reaper_interval_secs);
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tokio::spawn(async move {
                    let mut retention_due = tokio::time::Instant::now();
                    loop {
                        tokio::select! {
                            _ = &mut shutdown => break,
                            _ = tick.tick() => {}
                        }
                        match run_once(&pool, &config, &dispatcher).await {
                            Ok(reaped) => metrics.reaped(&reaped),
                            Err(e) => log::warn!("reaper pass failed: {e}"),
                        }
                        if retention_due.elapsed() < retention::EVERY {
                            continue;
                        }
                        retention_due = tokio::time::Instant::now();
                        let days = config.retention_days;
                        match retention::run_once(&pool, days, retention::BATCH).await {
                            Ok(deleted) => metrics.deleted(deleted.tasks),
                            Err(e) => log::warn!("retention pass failed: {e}"),
                        }
                    }
                });
            })
        })))
    })
}
