//! The task endpoints: user endpoints to submit and read tasks, agent endpoints to pick and
//! finish them.

use std::time::Duration;

use rocket::response::status::Created;
use rocket::serde::json::Json;
use rocket::{get, post, routes, Responder, Route, Shutdown, State};
use serde::Serialize;
use uuid::Uuid;

use super::model::{FinishReport, NewTask, NewTaskBody, Picked, Task, TaskStatus};
use super::store;
use crate::auth::{AgentAuth, AgentName};
use crate::body::JsonBody;
use crate::config::AppConfig;
use crate::dispatch::Dispatcher;
use crate::error::ApiError;
use crate::Db;

pub fn routes() -> Vec<Route> {
    routes![create, list, show, pick, finish]
}

#[post("/tasks", data = "<body>")]
async fn create(
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    body: JsonBody<NewTaskBody>,
) -> Result<Created<Json<Task>>, ApiError> {
    let new = NewTask::from_json(body.0 .0, config.max_command_bytes)?;
    let task = store::insert(db, &new.command).await?;
    dispatcher.task_queued();
    let location = format!("/tasks/{}", task.id);
    Ok(Created::new(location).body(Json(task)))
}

#[derive(Serialize)]
struct Page {
    tasks: Vec<Task>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    next: Option<String>,
}

#[get("/tasks?<status>&<limit>&<cursor>")]
async fn list(
    db: &Db,
    config: &State<AppConfig>,
    status: Option<&str>,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<Json<Page>, ApiError> {
    let status = status.map(str::parse::<TaskStatus>).transpose()?;
    let limit = match limit {
        None => config.list_limit_default,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=config.list_limit_max).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "`limit` must be a whole number from 1 to {}",
                    config.list_limit_max
                ))
            })?,
    };
    let before = cursor.map(cursor::decode).transpose()?;
    // One row more than asked tells whether another page exists.
    let mut tasks = store::list(db, status, before, i64::from(limit) + 1).await?;
    let next = if tasks.len() > limit as usize {
        tasks.truncate(limit as usize);
        tasks.last().map(|t| cursor::encode(t.seq))
    } else {
        None
    };
    Ok(Json(Page { tasks, next }))
}

#[get("/tasks/<id>")]
async fn show(db: &Db, id: &str) -> Result<Json<Task>, ApiError> {
    let id = parse_id(id)?;
    store::get(db, id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(id))
}

#[derive(Responder)]
enum PickResponse {
    Task(Json<Picked>),
    #[response(status = 204)]
    Nothing(()),
}

/// Hands the oldest queued task to the agent, waiting up to `wait` seconds for one to arrive.
#[get("/tasks/pick?<wait>")]
async fn pick(
    _auth: AgentAuth,
    agent: AgentName,
    wait: Option<&str>,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    shutdown: Shutdown,
) -> Result<PickResponse, ApiError> {
    let wait = match wait {
        None => config.pick_wait_default_secs,
        Some(text) => text
            .parse::<u64>()
            .ok()
            .filter(|w| *w <= config.pick_wait_max_secs)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "`wait` must be a whole number of seconds from 0 to {}",
                    config.pick_wait_max_secs
                ))
            })?,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let reply = dispatcher.park(agent.0, deadline)?;
    // The dispatcher answers by the deadline unless the database holds it up; the margin keeps
    // this response inside the agent's read timeout even then. A task claimed for a pick that
    // gave up is put back by the dispatcher.
    let picked = tokio::select! {
        reply = reply => reply.unwrap_or(None),
        _ = shutdown => None,
        _ = tokio::time::sleep_until(deadline + Duration::from_secs(5)) => None,
    };
    Ok(match picked {
        Some(picked) => PickResponse::Task(Json(picked)),
        None => PickResponse::Nothing(()),
    })
}

/// Records the result of the attempt the lease identifies. A repeat of an accepted finish
/// (an agent retrying after a lost response) answers 200 without writing again.
#[post("/tasks/<id>/finish", data = "<report>")]
async fn finish(
    _auth: AgentAuth,
    db: &Db,
    id: &str,
    report: JsonBody<FinishReport>,
) -> Result<Json<Task>, ApiError> {
    let id = parse_id(id)?;
    let outcome = report.0.validate()?;
    if let Some(task) = store::finish(db, id, &outcome).await? {
        return Ok(Json(task));
    }
    let (task, lease) = store::get_with_lease(db, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let done = matches!(task.status, TaskStatus::Finished | TaskStatus::Failed);
    if lease == Some(outcome.lease) && done {
        return Ok(Json(task));
    }
    Err(ApiError::Conflict(if lease != Some(outcome.lease) {
        format!("task {id} is not leased with this token: another attempt owns it")
    } else {
        format!("task {id} is {}, not in progress", task.status.as_str())
    }))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a task id (a UUID)")))
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("no task with id {id}"))
}

/// The list cursor: opaque to clients, the `seq` of the last task of the page underneath.
mod cursor {
    use crate::error::ApiError;

    const PREFIX: &str = "s";

    pub fn encode(seq: i64) -> String {
        format!("{PREFIX}{seq:x}")
    }

    pub fn decode(cursor: &str) -> Result<i64, ApiError> {
        cursor
            .strip_prefix(PREFIX)
            .and_then(|hex| i64::from_str_radix(hex, 16).ok())
            .filter(|seq| *seq > 0)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("{cursor:?} is not a cursor from this API"))
            })
    }
}
