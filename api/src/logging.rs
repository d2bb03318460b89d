//! Logs through fern to stderr: one line per request at info, never a header or a body (the
//! agent token travels in a header, and commands may hold anything).

use std::time::Instant;

use rocket::fairing::{Fairing, Info, Kind};
use rocket::{Data, Request, Response};

/// Installs the process-wide logger. Must run before `rocket::custom`, which installs Rocket's
/// own logger when none is set. A second call (tests build many servers) keeps the first.
pub fn init(level: log::LevelFilter) {
    let quiet = level.min(log::LevelFilter::Warn);
    let _ = fern::Dispatch::new()
        .format(|out, message, record| {
            out.finish(format_args!(
                "{} {:<5} {}: {}",
                chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                record.level(),
                record.target(),
                message
            ))
        })
        .level(level)
        // Rocket, its pools and the drivers narrate every request (targets ending in `::_` are
        // Rocket's per-request notes, even in our modules); our one line replaces all that.
        // Handler errors that matter are logged where they are mapped, in error.rs.
        .filter(|meta| !meta.target().ends_with("::_") && meta.target() != "rocket::launch")
        .level_for("rocket", quiet)
        .level_for("rocket_db_pools", quiet)
        .level_for("sqlx", quiet)
        .level_for("hyper", quiet)
        .chain(std::io::stderr())
        .apply();
}

/// Writes the one line per request: method, path (without the query), status, duration.
pub struct RequestLog;

/// When the request arrived, kept in the request's local cache.
struct Arrived(Instant);

#[rocket::async_trait]
impl Fairing for RequestLog {
    fn info(&self) -> Info {
        Info { name: "Request log", kind: Kind::Request | Kind::Response }
    }

    async fn on_request(&self, request: &mut Request<'_>, _: &mut Data<'_>) {
        request.local_cache(|| Arrived(Instant::now()));
    }

    async fn on_response<'r>(&self, request: &'r Request<'_>, response: &mut Response<'r>) {
        let Arrived(arrived) = request.local_cache(|| Arrived(Instant::now()));
        log::info!(
            target: "taskexec_api::request",
            "{} {} {} {:.1}ms",
            request.method(),
            request.uri().path(),
            response.status().code,
            arrived.elapsed().as_secs_f64() * 1000.0
        );
    }
}
