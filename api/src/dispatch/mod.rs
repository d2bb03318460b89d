//! How tasks reach agents: the notifier (this process's LISTEN connection and its NOTIFYs),
//! the dispatcher (parked picks, one claim for all of them), and the per-task events that
//! heartbeats and long polls wait on.

pub mod dispatcher;
pub mod events;
pub mod notifier;
pub mod waits;

use std::sync::Arc;
use std::time::Duration;

use rocket::fairing::AdHoc;
use rocket::{Build, Rocket, Shutdown};
use taskexec_protocol::LeaseTerms;
use tokio::sync::Mutex;

pub use dispatcher::{Delivery, DispatchLoop, Dispatcher, Handover, Reply, Round};
pub use events::{ended, TaskEvents, Watch, Woken, RECHECK};
pub use notifier::Notifier;
pub use waits::{WaitSlot, WaitSlots};

use crate::config::{AppConfig, DATABASE_URL_KEY, LISTEN_URL_KEY};
use crate::db::required;

/// The terms a pick grants, from the settings.
pub fn terms(config: &AppConfig) -> LeaseTerms {
    LeaseTerms {
        lease_secs: config.pick_confirm_secs.min(config.lease_secs),
        kill_grace_secs: config.kill_grace_secs,
        max_output_bytes: config.max_output_bytes,
    }
}

/// Runs the notifier and the dispatcher from liftoff until shutdown. The launch fails if they
/// cannot be set up: a server whose picks could never be answered must not start.
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Dispatcher", |rocket: Rocket<Build>| async {
        let Some((pool, config)) = required(&rocket, "the dispatcher") else {
            return Err(rocket);
        };
        let figment = rocket.figment();
        let url = [LISTEN_URL_KEY, DATABASE_URL_KEY]
            .into_iter()
            .find_map(|key| figment.extract_inner::<String>(key).ok());
        let Some(url) = url else {
            log::error!("the dispatcher cannot start without a database URL");
            return Err(rocket);
        };
        let rescan = Duration::from_secs(config.dispatch_rescan_secs.max(1));
        let listen_probe = Duration::from_secs(config.listen_probe_secs.max(1));
        // Half the pool for parked requests' looks; the rest stays free for everything else.
        let looks = pool.options().get_max_connections() as usize / 2;
        let notifier = Notifier::with_events(TaskEvents::with_look_limit(looks));
        let (dispatcher, state) =
            DispatchLoop::new(pool.clone(), notifier.clone(), rescan, terms(&config));
        // The loop's end is awaited at shutdown: it puts back the tasks of picks that never
        // took them before the process exits.
        let running = Arc::new(Mutex::new(None));
        let stopping = running.clone();
        let slots = waits::WaitSlots::new(config.max_waits_per_token, config.max_waits);
        let rocket = rocket.manage(dispatcher).manage(notifier.clone()).manage(slots);
        Ok(rocket
            .attach(AdHoc::on_liftoff("Dispatcher loop", move |rocket| {
                Box::pin(async move {
                    let shutdown = rocket.shutdown();
                    tokio::spawn(until(
                        shutdown.clone(),
                        notifier.clone().listen(url, listen_probe),
                    ));
                    // Not stopped at shutdown: events of the requests served in the grace
                    // must reach the other processes; it ends when the pool closes.
                    tokio::spawn(notifier.clone().send_events(pool.clone()));
                    tokio::spawn(until(shutdown.clone(), notifier.send(pool)));
                    *running.lock().await = Some(tokio::spawn(state.run(shutdown)));
                })
            }))
            .attach(AdHoc::on_shutdown("Dispatcher drain", move |_| {
                Box::pin(async move {
                    if let Some(run) = stopping.lock().await.take() {
                        let _ = run.await;
                    }
                })
            })))
    })
}

async fn until(shutdown: Shutdown, work: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = shutdown => {}
        _ = work => {}
    }
}
