//! The taskexec API server. `rocket()` builds the server the binary runs; `build()` builds
//! the same server from any figment, which is how the tests start it.

use rocket::fairing::AdHoc;
use rocket::figment::Figment;
use rocket::{catchers, Build, Rocket};
use rocket_db_pools::Database;

pub mod agents;
mod auth;
mod body;
pub mod cli;
pub mod config;
mod connections;
mod db;
pub mod dispatch;
mod error;
mod health;
mod logging;
pub mod metrics;
pub mod openapi;
pub mod output;
mod query;
pub mod reaper;
pub mod retention;
pub mod tasks;

pub use db::{Db, DbError};
pub use error::ApiError;

/// The server as configured by `Rocket.toml` and the environment.
pub fn rocket() -> Rocket<Build> {
    build(config::figment())
}

/// The server for a given figment.
pub fn build(figment: Figment) -> Rocket<Build> {
    let level = figment.extract_inner("logging").unwrap_or(log::LevelFilter::Info);
    // A bad format is refused by the settings' check; until then, lines are text.
    let format = figment.extract_inner("log_format").unwrap_or_default();
    logging::init(level, format);
    rocket::custom(connections::limit(figment))
        .attach(config::stage())
        .attach(metrics::stage())
        .attach(Db::init())
        .attach(AdHoc::try_on_ignite("Migrations", migrate))
        .attach(tasks::intake::stage())
        .attach(dispatch::stage())
        .attach(auth::verifier::stage())
        .attach(reaper::stage())
        .attach(agents::stage())
        .attach(logging::RequestLog)
        .attach(metrics::HttpMetrics)
        .attach(AdHoc::on_liftoff("Announce", |rocket| {
            Box::pin(async move {
                let config = rocket.config();
                log::info!("taskexec-api listening on {}:{}", config.address, config.port);
            })
        }))
        .manage(output::feed::Feeds::default())
        .mount("/", health::routes())
        .mount("/", tasks::routes::routes())
        .mount("/", output::routes::routes())
        .mount("/", auth::routes::routes())
        .mount("/", metrics::routes())
        .mount("/", agents::routes())
        .mount("/", openapi::routes())
        .register("/", catchers![error::catch_all])
}

/// Applies the embedded migrations before the server takes requests.
async fn migrate(rocket: Rocket<Build>) -> Result<Rocket<Build>, Rocket<Build>> {
    let Some(db) = Db::fetch(&rocket) else {
        return Err(rocket);
    };
    match db::migrator().run(db.pool()).await {
        Ok(()) => Ok(rocket),
        Err(e) => {
            log::error!("database migration failed: {e}");
            Err(rocket)
        }
    }
}
