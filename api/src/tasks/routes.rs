//! The task endpoints: user endpoints to submit and read tasks, agent endpoints to pick and
//! finish them.

use std::time::Duration;

use rocket::response::status::Created;
use rocket::serde::json::Json;
use rocket::{get, post, routes, Responder, Route, Shutdown, State};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::intake::Intake;
use super::model::{
    FinishReport, HeartbeatReply, LeaseBody, NewTask, NewTaskBody, NewTaskLimits, Picked, Task,
    TaskStatus,
};
use super::store::{self, Aborted};
use crate::auth::{AgentAuth, AgentName};
use crate::body::JsonBody;
use crate::config::AppConfig;
use crate::dispatch::{Dispatcher, Woken, RECHECK};
use crate::error::ApiError;
use crate::Db;

pub fn routes() -> Vec<Route> {
    routes![create, list, show, abort, pick, heartbeat, release, finish]
}

#[post("/tasks", data = "<body>")]
async fn create(
    intake: &State<Intake>,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    body: JsonBody<NewTaskBody>,
) -> Result<Created<Json<Task>>, ApiError> {
    let limits = NewTaskLimits {
        max_command_bytes: config.max_command_bytes,
        max_timeout_secs: config.max_timeout_secs,
    };
    let new = NewTask::from_json(body.0 .0, &limits)?;
    let timeout_secs = new.timeout_secs.unwrap_or(config.default_timeout_secs);
    let task = intake.submit(new.command, timeout_secs).await?;
    dispatcher.task_queued();
    let location = format!("/tasks/{}", task.id);
    Ok(Created::new(location).body(Json(task)))
}

#[derive(Serialize)]
struct Page {
    /// Tasks without `stdout` and `stderr` (fetch a task for those).
    tasks: Vec<Value>,
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
    let tasks = tasks.iter().map(summary).collect();
    Ok(Json(Page { tasks, next }))
}

/// The task. With `wait`, holds the request up to that many seconds until the task has ended,
/// so that a user can submit and then wait in two calls.
#[get("/tasks/<id>?<wait>")]
async fn show(
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    id: &str,
    wait: Option<&str>,
    mut shutdown: Shutdown,
) -> Result<Json<Task>, ApiError> {
    let id = parse_id(id)?;
    let wait = Duration::from_secs(parse_wait(wait, 0, config.pick_wait_max_secs)?);
    let deadline = tokio::time::Instant::now() + wait;
    let look = || async {
        let task = store::get(db, id).await?.ok_or_else(|| not_found(id))?;
        let ended = !matches!(task.status, TaskStatus::Queued | TaskStatus::InProgress);
        Ok((task, ended))
    };
    let events = dispatcher.events();
    let task = events.poll(id, Woken::Ended, deadline, RECHECK, &mut shutdown, look).await?;
    Ok(Json(task))
}

#[derive(Responder)]
enum AbortResponse {
    /// A queued task, cancelled at once.
    Cancelled(Json<Task>),
    /// A running task: its agent stops it and reports.
    #[response(status = 202)]
    Requested(Json<Task>),
}

/// Cancels a queued task at once, or asks the agent of a running one to stop it.
#[post("/tasks/<id>/abort")]
async fn abort(
    db: &Db,
    dispatcher: &State<Dispatcher>,
    id: &str,
) -> Result<AbortResponse, ApiError> {
    let id = parse_id(id)?;
    match store::abort(db, id).await? {
        Some(Aborted::Cancelled(task)) => {
            dispatcher.events().wake(id, Woken::Ended);
            Ok(AbortResponse::Cancelled(Json(task)))
        }
        Some(Aborted::Requested(task)) => Ok(AbortResponse::Requested(Json(task))),
        None => {
            let task = store::get(db, id).await?.ok_or_else(|| not_found(id))?;
            Err(ApiError::Conflict(format!(
                "task {id} is {}; only a queued or running task can be aborted",
                task.status.as_str()
            )))
        }
    }
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
        Some(text) => {
            text.parse::<u64>().ok().filter(|w| *w <= config.pick_wait_max_secs).ok_or_else(
                || {
                    ApiError::BadRequest(format!(
                        "`wait` must be a whole number of seconds from 0 to {}",
                        config.pick_wait_max_secs
                    ))
                },
            )?
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut reply = dispatcher.park(agent.0, deadline)?;
    // The dispatcher answers by the deadline unless the database holds it up; the margin keeps
    // this response inside the agent's read timeout even then.
    let picked = tokio::select! {
        biased;
        answer = &mut reply => answer.unwrap_or(None),
        _ = shutdown => None,
        _ = tokio::time::sleep_until(deadline + Duration::from_secs(5)) => None,
    };
    // Giving up: close the channel so that the dispatcher puts back anything it claims from
    // now on, and deliver what it may have sent in the meantime rather than drop it.
    let picked = picked.or_else(|| {
        reply.close();
        reply.try_recv().ok().flatten()
    });
    Ok(match picked {
        Some(picked) => PickResponse::Task(Json(picked)),
        None => PickResponse::Nothing(()),
    })
}

/// Extends the lease of the attempt, then holds the request up to `wait` seconds (at most a
/// third of the lease) and answers at once if an abort of the task is requested meanwhile.
/// An agent that heartbeats again as soon as this returns learns of an abort within
/// milliseconds, without a busy poll.
#[post("/tasks/<id>/heartbeat?<wait>", data = "<body>")]
async fn heartbeat(
    _auth: AgentAuth,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    id: &str,
    wait: Option<&str>,
    body: JsonBody<LeaseBody>,
    shutdown: Shutdown,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let id = parse_id(id)?;
    let max_hold = u64::from(config.heartbeat_hold_secs());
    let mut hold = Duration::from_secs(parse_wait(wait, 0, max_hold)?);
    if !dispatcher.is_listening() {
        // No notification can arrive: come back soon and look at the database again.
        hold = hold.min(Duration::from_secs(1));
    }
    // Watch before reading, so that an abort requested in between is not missed.
    let watch = dispatcher.events().watch(id);
    let lease = body.0.lease;
    let Some((abort, lease_expires_at)) =
        store::heartbeat(db, id, lease, config.lease_secs).await?
    else {
        return Err(not_current(db, id, lease).await);
    };
    // Output events come and go; an abort answers at once, the attempt's end ends the hold.
    let abort_or_end = async {
        loop {
            watch.next(Woken::Abort).await;
            if watch.seen(Woken::Abort) || watch.seen(Woken::Ended) {
                return watch.seen(Woken::Abort);
            }
        }
    };
    let abort = abort
        || tokio::select! {
            abort = abort_or_end => abort,
            _ = tokio::time::sleep(hold) => false,
            _ = shutdown => false,
        };
    Ok(Json(HeartbeatReply { abort, lease_expires_at, lease_secs: config.lease_secs }))
}

/// Hands the task back to the queue without counting the attempt (an agent that is draining).
#[post("/tasks/<id>/release", data = "<body>")]
async fn release(
    _auth: AgentAuth,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    id: &str,
    body: JsonBody<LeaseBody>,
) -> Result<Json<Task>, ApiError> {
    let id = parse_id(id)?;
    let lease = body.0.lease;
    let task = store::release(db, id, lease, config.max_attempts).await?;
    let Some(task) = task else {
        return Err(not_current(db, id, lease).await);
    };
    dispatcher.events().wake(id, Woken::Ended);
    if task.status == TaskStatus::Queued {
        dispatcher.task_queued();
    }
    Ok(Json(task))
}

/// Records the result of the attempt the lease identifies. A repeat of an accepted finish
/// (an agent retrying after a lost response) answers 200 without writing again.
#[post("/tasks/<id>/finish", data = "<report>")]
async fn finish(
    _auth: AgentAuth,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    id: &str,
    report: JsonBody<FinishReport>,
) -> Result<Json<Task>, ApiError> {
    let id = parse_id(id)?;
    let outcome = report.0.validate(config.max_output_bytes as usize)?;
    if let Some(task) = store::finish(db, id, &outcome).await? {
        // The attempt is over: its parked heartbeat need not wait out its hold.
        dispatcher.events().wake(id, Woken::Ended);
        return Ok(Json(task));
    }
    // A repeat of the report that ended this very attempt is answered as it was; another
    // report for the same attempt is a conflict; a report whose stream lengths the uploads do
    // not add up to yet says where they stand.
    if let Some((task, Some(lease))) = store::get_with_lease(db, id).await? {
        if lease == outcome.lease && task.status == TaskStatus::InProgress {
            return Err(ApiError::OutputIncomplete {
                stdout_bytes: task.stdout_bytes,
                stderr_bytes: task.stderr_bytes,
            });
        }
        if lease == outcome.lease && task.status != TaskStatus::InProgress {
            if outcome.is_recorded_in(&task) {
                return Ok(Json(task));
            }
            return Err(ApiError::Conflict(format!(
                "task {id} was already reported {} with a different result",
                task.status.as_str()
            )));
        }
    }
    Err(not_current(db, id, outcome.lease).await)
}

/// Why a write fenced by `lease` changed nothing: 404, or 409 naming the reason.
async fn not_current(db: &Db, id: Uuid, lease: Uuid) -> ApiError {
    match store::get_with_lease(db, id).await {
        Err(e) => e.into(),
        Ok(None) => not_found(id),
        Ok(Some((_, current))) if current != Some(lease) => ApiError::Conflict(format!(
            "task {id} is not leased with this token: another attempt owns it"
        )),
        Ok(Some((task, _))) => {
            ApiError::Conflict(format!("task {id} is {}, not in progress", task.status.as_str()))
        }
    }
}

/// A `wait` query parameter: whole seconds from 0 to `max`, `default` when absent.
pub(crate) fn parse_wait(wait: Option<&str>, default: u64, max: u64) -> Result<u64, ApiError> {
    let Some(text) = wait else { return Ok(default) };
    text.parse::<u64>().ok().filter(|w| *w <= max).ok_or_else(|| {
        ApiError::BadRequest(format!("`wait` must be a whole number of seconds from 0 to {max}"))
    })
}

/// A task as lists show it: without its output.
fn summary(task: &Task) -> Value {
    let mut value = serde_json::to_value(task).unwrap_or_default();
    if let Value::Object(fields) = &mut value {
        fields.remove("stdout");
        fields.remove("stderr");
    }
    value
}

pub(crate) fn parse_id(id: &str) -> Result<Uuid, ApiError> {
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
