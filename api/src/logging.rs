//! Logs through fern to stderr, as text or JSON lines (`LOG_FORMAT`, the protocol crate's
//! `logline`), and the request ids that tie a client's report to the lines of its request.
//!
//! One line per request, never a header or a body (tokens travel in headers, and commands may
//! hold anything): at info for what people do, at debug for agents' polling, heartbeats and
//! uploads and for probes and scrapes (they would drown the rest), at warn for a 5xx.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use log::kv::Value;
use rocket::fairing::{Fairing, Info, Kind};
use rocket::http::{Header, Method};
use rocket::{Data, Request, Response};
use taskexec_protocol::logline::LogFormat;

/// The header a request id comes in (from a client or a proxy) and goes back in.
pub const REQUEST_ID: &str = "X-Request-Id";
/// The longest request id taken from a client; a longer or odder one is replaced.
const MAX_REQUEST_ID_CHARS: usize = 64;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the process-wide logger. Must run before `rocket::custom`, which installs Rocket's
/// own logger when none is set. A second call (tests build many servers) keeps the first.
pub fn init(level: log::LevelFilter, format: LogFormat) {
    let format = *FORMAT.get_or_init(|| format);
    let quiet = level.min(log::LevelFilter::Warn);
    let _ = fern::Dispatch::new()
        .format(move |out, message, record| {
            out.finish(format_args!("{}", format.line(record, message, &[])))
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

/// The request's id: the client's `X-Request-Id` when it is 1 to 64 of `[A-Za-z0-9._:-]`,
/// else a new one.
#[derive(Clone)]
pub struct RequestId(pub String);

/// The id of `request` (made on first use).
pub fn request_id<'r>(request: &'r Request<'_>) -> &'r str {
    &request
        .local_cache(|| {
            let given = request.headers().get_one(REQUEST_ID).map(str::trim).filter(|id| {
                !id.is_empty()
                    && id.len() <= MAX_REQUEST_ID_CHARS
                    && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
            });
            RequestId(
                given.map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned),
            )
        })
        .0
}

/// Time since the request arrived (as the first fairing saw it).
pub fn elapsed(request: &Request<'_>) -> Duration {
    request.local_cache(|| Arrived(Instant::now())).0.elapsed()
}

/// When the request arrived, kept in the request's local cache.
struct Arrived(Instant);

/// Gives each request its id and writes its line.
pub struct RequestLog;

#[rocket::async_trait]
impl Fairing for RequestLog {
    fn info(&self) -> Info {
        Info { name: "Request log", kind: Kind::Request | Kind::Response }
    }

    async fn on_request(&self, request: &mut Request<'_>, _: &mut Data<'_>) {
        request.local_cache(|| Arrived(Instant::now()));
        request_id(request);
    }

    async fn on_response<'r>(&self, request: &'r Request<'_>, response: &mut Response<'r>) {
        let id = request_id(request);
        response.set_header(Header::new(REQUEST_ID, id.to_owned()));
        let status = response.status().code;
        let route = request.route().map(|route| route.uri.path());
        let level = match (status, route) {
            (500.., _) => log::Level::Warn,
            (..=399, Some(route)) if is_routine(request.method(), route) => log::Level::Debug,
            _ => log::Level::Info,
        };
        if level > log::max_level() {
            return;
        }
        let took = elapsed(request).as_secs_f64() * 1000.0;
        let method = request.method().as_str();
        let path = request.uri().path();
        let mut fields: Vec<(&str, Value<'_>)> = vec![("request_id", Value::from(id))];
        if FORMAT.get() == Some(&LogFormat::Json) {
            // The message says these to people; a pipeline gets them as fields too.
            fields.push(("method", Value::from(method)));
            fields.push(("route", Value::from(route.unwrap_or("unmatched"))));
            fields.push(("status", Value::from(status)));
            fields.push(("duration_ms", Value::from((took * 10.0).round() / 10.0)));
        }
        let task =
            route.filter(|route| route.starts_with("/tasks/<id>")).and(request.routed_segment(1));
        if let Some(task) = task {
            fields.push(("task", Value::from(task)));
        }
        // The name the agent guard accepted, never the header as sent (anyone can send one).
        if let Some(agent) = crate::agents::agent_of(request) {
            fields.push(("agent", Value::from(agent)));
        }
        log::logger().log(
            &log::Record::builder()
                .level(level)
                .target("taskexec_api::request")
                .args(format_args!("{method} {path} {status} {took:.1}ms"))
                .key_values(&fields.as_slice())
                .build(),
        );
    }
}

/// Requests that come all the time and tell nothing unless they fail: the agents' long polls,
/// heartbeats and uploads (their task's creation, pick and end are logged as events), and
/// probes and scrapes.
fn is_routine(method: Method, route: &str) -> bool {
    matches!(
        (method, route),
        (Method::Get, "/tasks/pick" | "/health" | "/" | "/metrics")
            | (Method::Post, "/tasks/<id>/heartbeat" | "/tasks/<id>/output")
    )
}
