//! Liveness and readiness: `GET /` for container health checks that only need the process,
//! `GET /health` for checks that need the database too.

use std::time::Duration;

use rocket::serde::json::Json;
use rocket::{get, routes, Route, State};
use serde::Serialize;

use crate::dispatch::{Dispatcher, WaitSlots};
use crate::error::ApiError;
use crate::query::StrictQuery;
use crate::Db;

pub fn routes() -> Vec<Route> {
    routes![index, health]
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(index, health))]
pub struct ApiDoc;

/// Liveness: the service's name and version, answered by the process alone. No token needed.
#[utoipa::path(
    get,
    path = "/",
    operation_id = "getService",
    summary = "Liveness",
    tag = "operations",
    responses((status = 200, description = "The process is up", body = inline(Service)))
)]
#[get("/")]
fn index(_query: StrictQuery) -> Json<Service> {
    Json(Service { service: "taskexec-api", version: env!("CARGO_PKG_VERSION") })
}

/// What `GET /` says.
#[derive(Serialize, utoipa::ToSchema)]
struct Service {
    service: &'static str,
    version: &'static str,
}

/// What `GET /health` says when the database answers.
#[derive(Serialize, utoipa::ToSchema)]
struct Health {
    status: &'static str,
    database: &'static str,
    /// Agents parked on a pick in this process right now.
    parked_picks: usize,
    /// Waits and follows held in this process.
    parked_waits: usize,
}

/// Readiness: 200 when the database answers within two seconds, 503 otherwise. Also tells
/// how many agents are parked on a pick right now, and how many waits and follows are held.
/// No token needed.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "getHealth",
    summary = "Readiness",
    tag = "operations",
    responses((status = 200, description = "Ready", body = inline(Health)))
)]
#[get("/health")]
async fn health(
    _query: StrictQuery,
    db: &Db,
    dispatcher: &State<Dispatcher>,
    slots: &State<WaitSlots>,
) -> Result<Json<Health>, ApiError> {
    let ping = sqlx::query!("SELECT 1 AS one").fetch_one(db.pool());
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => Ok(Json(Health {
            status: "ok",
            database: "ok",
            parked_picks: dispatcher.parked(),
            parked_waits: slots.held(),
        })),
        // Whatever the cause (down, gone, refusing us), the database does not answer.
        Ok(Err(e)) => {
            log::warn!("health check: the database does not answer: {e}");
            Err(ApiError::Unavailable)
        }
        Err(_) => Err(ApiError::Unavailable),
    }
}
