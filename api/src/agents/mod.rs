//! The agent registry: `GET /agents` for operators, `POST /agents/leave` for an agent that
//! exits. Every agent request carries its name (and version); the `Agent` guard notes the
//! sighting in memory, and a thin loop writes the sightings of all agents in one statement at
//! most every `sightings::TICK`, only when something changed or a present agent is due again
//! (every third of the lease). Busy or idle is read from the tasks in progress, gone from the
//! times: nothing is written per task.

pub mod sightings;
mod store;

use std::time::Duration;

use rocket::fairing::AdHoc;
use rocket::http::Status;
use rocket::outcome::Outcome;
use rocket::request::{self, FromRequest};
use rocket::serde::json::Json;
use rocket::{get, post, routes, Build, Request, Rocket, Route, State};
use sqlx::PgPool;
use taskexec_protocol::agent::is_agent_version;
use taskexec_protocol::output::headers;
use taskexec_protocol::AgentInfo;
use uuid::Uuid;

use crate::auth::{AgentName, Allowed, Observe, Run};
use crate::config::AppConfig;
use crate::db::{required, DbError};
use crate::error::ApiError;
use crate::query::StrictQuery;
use crate::Db;
pub use sightings::Sightings;
use sightings::{Presence, TICK};

pub fn routes() -> Vec<Route> {
    routes![list, leave]
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(list, leave), components(schemas(AgentInfo)))]
pub struct ApiDoc;

/// The agent making a request, by its `X-Agent-Name`: present until the request is answered.
/// Goes after the access guard, so that only a caller allowed to act as an agent is noted.
pub struct Agent {
    pub name: String,
    presence: Presence,
}

/// The name an `Agent` guard took, for the request's log line.
struct Named(Option<String>);

/// The agent name of `request`, once its `Agent` guard has checked it.
pub fn agent_of<'r>(request: &'r Request<'_>) -> Option<&'r str> {
    request.local_cache(|| Named(None)).0.as_deref()
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Agent {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        let name = match AgentName::from_request(request).await {
            Outcome::Success(AgentName(name)) => name,
            Outcome::Error(e) => return Outcome::Error(e),
            Outcome::Forward(status) => return Outcome::Forward(status),
        };
        let version = request.headers().get_one(headers::AGENT_VERSION).map(str::trim);
        if version.is_some_and(|version| !is_agent_version(version)) {
            let detail = format!(
                "{} must be 1 to {} visible ASCII characters",
                headers::AGENT_VERSION,
                taskexec_protocol::agent::MAX_AGENT_VERSION_CHARS
            );
            return Outcome::Error(ApiError::Malformed(detail).remember(request));
        }
        let instance = match instance(request) {
            Ok(instance) => instance,
            Err(e) => return Outcome::Error(e.remember(request)),
        };
        let Some(sightings) = request.rocket().state::<Sightings>() else {
            return Outcome::Error(ApiError::Internal.remember(request));
        };
        let presence = sightings.arrive(&name, version, instance);
        request.local_cache(|| Named(Some(name.clone())));
        Outcome::Success(Agent { name, presence })
    }
}

/// The run of the agent, from `X-Agent-Instance` (optional).
fn instance(request: &Request<'_>) -> Result<Option<Uuid>, ApiError> {
    match request.headers().get_one(headers::AGENT_INSTANCE) {
        None => Ok(None),
        Some(value) => value.trim().parse().map(Some).map_err(|_| {
            ApiError::Malformed(format!("{} must be a UUID", headers::AGENT_INSTANCE))
        }),
    }
}

/// `X-Agent-Instance`, for the leave.
struct Instance(Option<Uuid>);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Instance {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        match instance(request) {
            Ok(instance) => Outcome::Success(Instance(instance)),
            Err(e) => Outcome::Error(e.remember(request)),
        }
    }
}

impl Agent {
    /// This agent's report ended a task (counted under its own name, which is present).
    pub fn reported_end(&self) {
        self.presence.sightings().finished(&self.name);
    }

    /// This agent picks with `tags` (sorted, without repeats): the registry shows them, and
    /// the queue's figures count the tasks no live agent's tags can take.
    pub fn declare_tags(&self, tags: &[String]) {
        self.presence.sightings().declare_tags(&self.name, &tags.join(","));
    }
}

/// Every agent seen in the last day, by name.
#[utoipa::path(
    get,
    path = "/agents",
    operation_id = "listAgents",
    summary = "List agents",
    tag = "operations",
    security(("bearer" = ["admin", "reader"])),
    responses((status = 200, description = "The agents, by name", body = Vec<AgentInfo>))
)]
#[get("/agents")]
async fn list(
    _access: Allowed<Observe>,
    _query: StrictQuery,
    db: &Db,
    config: &State<AppConfig>,
) -> Result<Json<Vec<AgentInfo>>, ApiError> {
    Ok(Json(store::list(db.pool(), config.lease_secs).await?))
}

/// The agent is exiting: it is `gone` from now on, unless it comes back under the same name
/// (a new run, with a new `X-Agent-Instance`). Its requests still in flight anywhere are no
/// sign of life (when it sends its instance).
#[utoipa::path(
    post,
    path = "/agents/leave",
    operation_id = "leave",
    summary = "Leave (an agent exiting)",
    tag = "agents",
    security(("bearer" = ["admin", "agent"])),
    params(
        ("X-Agent-Name" = String, Header, description = "The agent's name"),
        ("X-Agent-Instance" = Option<uuid::Uuid>, Header,
         description = "This run of the agent: a later run under the same name is not gone"),
    ),
    responses((status = 204, description = "Gone from now on"))
)]
#[post("/agents/leave")]
async fn leave(
    _access: Allowed<Run>,
    _query: StrictQuery,
    agent: AgentName,
    instance: Instance,
    db: &Db,
    sightings: &State<Sightings>,
) -> Result<Status, ApiError> {
    let row = sightings.leave(&agent.0, instance.0);
    if let Err(e) = store::record(db.pool(), std::slice::from_ref(&row), true).await {
        // Its counts are kept; its leave is not a sighting (it is gone within a lease).
        sightings.restore_counts(&row);
        return Err(e.into());
    }
    log::info!(agent = agent.0.as_str(); "agent {:?} left", agent.0);
    Ok(Status::NoContent)
}

/// Writes what is due of the sightings; on failure they are kept for the next pass.
///
/// # Errors
/// The database's.
pub async fn run_once(pool: &PgPool, sightings: &Sightings) -> Result<usize, DbError> {
    let rows = sightings.take_due();
    if rows.is_empty() {
        return Ok(0);
    }
    match store::record(pool, &rows, false).await {
        Ok(()) => Ok(rows.len()),
        Err(e) => {
            sightings.restore(rows);
            Err(e)
        }
    }
}

/// The sightings, and the loop that writes them from liftoff to shutdown (once more then).
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Agents", |rocket: Rocket<Build>| async {
        let Some((pool, config)) = required(&rocket, "the agent registry") else {
            return Err(rocket);
        };
        // A present agent's sighting is written every third of the lease, and the writer looks
        // at least that often: one not seen for a lease has surely gone.
        let refresh = Duration::from_secs(u64::from(config.heartbeat_hold_secs().max(1)));
        let sightings = Sightings::new(refresh);
        let writer = sightings.clone();
        Ok(rocket.manage(sightings).attach(AdHoc::on_liftoff("Agents writer", move |rocket| {
            let mut shutdown = rocket.shutdown();
            Box::pin(async move {
                let mut tick = tokio::time::interval(TICK.min(refresh));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tokio::spawn(async move {
                    loop {
                        let stopping = tokio::select! {
                            _ = &mut shutdown => true,
                            _ = tick.tick() => false,
                        };
                        if let Err(e) = run_once(&pool, &writer).await {
                            log::warn!("the agents' sightings could not be written: {e}");
                        }
                        if stopping {
                            break;
                        }
                    }
                });
            })
        })))
    })
}
