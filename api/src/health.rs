//! Liveness and readiness: `GET /` for container health checks that only need the process,
//! `GET /health` for checks that need the database too.

use std::time::Duration;

use rocket::serde::json::Json;
use rocket::{get, routes, Route, State};
use serde_json::{json, Value};

use crate::dispatch::{Dispatcher, WaitSlots};
use crate::error::ApiError;
use crate::query::StrictQuery;
use crate::Db;

pub fn routes() -> Vec<Route> {
    routes![index, health]
}

#[get("/")]
fn index(_query: StrictQuery) -> Json<Value> {
    Json(json!({"service": "taskexec-api", "version": env!("CARGO_PKG_VERSION")}))
}

/// 200 when the database answers within two seconds, 503 otherwise. Also tells how many
/// agents are parked on a pick right now, and how many waits and follows are held.
#[get("/health")]
async fn health(
    _query: StrictQuery,
    db: &Db,
    dispatcher: &State<Dispatcher>,
    slots: &State<WaitSlots>,
) -> Result<Json<Value>, ApiError> {
    let ping = sqlx::query!("SELECT 1 AS one").fetch_one(db.pool());
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => Ok(Json(json!({
            "status": "ok",
            "database": "ok",
            "parked_picks": dispatcher.parked(),
            "parked_waits": slots.held(),
        }))),
        // Whatever the cause (down, gone, refusing us), the database does not answer.
        Ok(Err(e)) => {
            log::warn!("health check: the database does not answer: {e}");
            Err(ApiError::Unavailable)
        }
        Err(_) => Err(ApiError::Unavailable),
    }
}
