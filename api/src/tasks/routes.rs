//! The task endpoints: user endpoints to submit and read tasks, agent endpoints to pick and
//! report on them.

use std::io::{self, Cursor, SeekFrom};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rocket::http::ContentType;
use rocket::request::ClientGone;
use rocket::request::{self, FromRequest};
use rocket::response::status::Created;
use rocket::response::{self, Responder};
use rocket::serde::json::Json;
use rocket::tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use rocket::{get, post, routes, Request, Response, Route, Shutdown, State};
use serde::Serialize;
use taskexec_protocol::output::headers;
use taskexec_protocol::output::OutputText;
use taskexec_protocol::{
    Assignment, Attempt, FinishReport, HeartbeatReply, LeaseBody, NewTask, OutputCap, Picked,
    ReleaseBody, Stream, Task, TaskId, TaskPage, TaskStatus, MAX_PICK,
};

use super::intake::Intake;
use super::journal;
use super::lease::Lease;
use super::model::{self, NewTaskBody, NewTaskLimits, Outcome};
use super::store::{self, Aborted, Keyed};
use crate::agents::Agent;
use crate::auth::{Abort, Allowed, Read, Run, Submit};
use crate::body::JsonBody;
use crate::config::AppConfig;
use crate::dispatch::{ended, Delivery, Dispatcher, Handover, WaitSlots, Woken, RECHECK};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openapi::{AgentHeaders, Conflict, TooMany};
use crate::output::store::{self as output, Uploads};
use crate::query::{self, StrictQuery};
use crate::Db;

pub fn routes() -> Vec<Route> {
    routes![create, list, show, attempts, abort, pick, heartbeat, release, finish]
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(create, list, show, attempts, abort, pick, heartbeat, release, finish),
    components(schemas(
        NewTask,
        Task,
        TaskPage,
        Attempt,
        Assignment,
        LeaseBody,
        HeartbeatReply,
        FinishReport
    ),)
)]
pub struct ApiDoc;

/// What a submit answers: 201 with the new task, or 200 with the task an earlier submit with
/// the same `Idempotency-Key` created.
#[derive(rocket::Responder)]
enum Submitted {
    Created(Created<Json<Task>>),
    Existing(Json<Task>),
}

#[utoipa::path(
    post,
    path = "/tasks",
    operation_id = "createTask",
    summary = "Submit a command",
    tag = "tasks",
    security(("bearer" = ["admin", "submitter"])),
    params(
        ("Idempotency-Key" = Option<String>, Header,
         description = "1 to 255 visible ASCII characters, per owner, kept 24 h: a repeat with \
                        the same body answers 200 with the task the first one created"),
    ),
    request_body(content = NewTask, content_type = "application/json"),
    responses(
        (status = 201, description = "Queued", body = Task,
         headers(("Location" = String, description = "The task's address")),
         links(
             ("GetTask" = (operation_id = "getTask", parameters(("id" = "$response.body#/id")))),
             ("ListAttempts" = (operation_id = "listAttempts", parameters(("id" = "$response.body#/id")))),
             ("ReadOutput" = (operation_id = "readOutput", parameters(("id" = "$response.body#/id")))),
             ("ReadLog" = (operation_id = "readLog", parameters(("id" = "$response.body#/id")))),
             ("AbortTask" = (operation_id = "abortTask", parameters(("id" = "$response.body#/id")))),
         )),
        (status = 200, description = "An earlier submit with this Idempotency-Key and body created it", body = Task),
        (status = 429, response = TooMany),
    )
)]
#[post("/tasks", data = "<body>")]
#[allow(clippy::too_many_arguments)]
async fn create(
    access: Allowed<Submit>,
    _query: StrictQuery,
    key: IdempotencyKey,
    intake: &State<Intake>,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    body: JsonBody<NewTaskBody>,
) -> Result<Submitted, ApiError> {
    let limits = NewTaskLimits {
        max_command_bytes: config.max_command_bytes,
        max_timeout_secs: config.max_timeout_secs,
    };
    let new = model::new_task(body.0 .0, &limits)?;
    let timeout_secs = new.timeout_secs.unwrap_or(config.default_timeout_secs);
    let owner = access.who.name;
    let task = match key.0 {
        None => intake.submit(new, timeout_secs, owner).await?,
        Some(key) => {
            // The body as checked (tags sorted, defaults left out), with the timeout it gets.
            let digest = model::digest(&new, timeout_secs);
            match intake.submit_keyed(&new, timeout_secs, &owner, &key, &digest).await? {
                Keyed::Created(task) => task,
                Keyed::Existing(task) => return Ok(Submitted::Existing(Json(task))),
                Keyed::Mismatch(id) => {
                    return Err(ApiError::Invalid(format!(
                        "the {} was used with another body (for task {id}); use a new key",
                        headers::IDEMPOTENCY_KEY
                    )))
                }
                Keyed::OverQuota => return Err(ApiError::Internal),
            }
        }
    };
    dispatcher.task_queued();
    journal::created(&task);
    let location = format!("/tasks/{}", task.id);
    Ok(Submitted::Created(Created::new(location).body(Json(task))))
}

/// A submit's `Idempotency-Key`: 1 to 255 visible ASCII characters, given once.
struct IdempotencyKey(Option<String>);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for IdempotencyKey {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        let mut given = request.headers().get(headers::IDEMPOTENCY_KEY);
        let Some(key) = given.next() else {
            return request::Outcome::Success(IdempotencyKey(None));
        };
        let detail = if given.next().is_some() {
            format!("{} was given more than once", headers::IDEMPOTENCY_KEY)
        } else if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) {
            return request::Outcome::Success(IdempotencyKey(Some(key.to_owned())));
        } else {
            format!("{} must be 1 to 255 visible ASCII characters", headers::IDEMPOTENCY_KEY)
        };
        request::Outcome::Error(ApiError::Malformed(detail).remember(request))
    }
}

/// A page of the list; each task without `stdout` and `stderr` (fetch a task for those).
#[derive(Serialize)]
struct Page {
    tasks: Vec<Summary>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    next: Option<String>,
}

/// A task as lists show it: without its output fields.
struct Summary(Task);

impl Serialize for Summary {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut value = serde_json::to_value(&self.0).map_err(serde::ser::Error::custom)?;
        if let serde_json::Value::Object(fields) = &mut value {
            fields.remove("stdout");
            fields.remove("stderr");
        }
        value.serialize(serializer)
    }
}

/// The list, newest first. A submitter's holds its own tasks only; `owner` filters by owner.
#[utoipa::path(
    get,
    path = "/tasks",
    operation_id = "listTasks",
    summary = "List tasks",
    tag = "tasks",
    security(("bearer" = ["admin", "reader", "submitter"])),
    params(
        ("status" = Option<TaskStatus>, Query, description = "Only tasks in this state"),
        ("owner" = Option<String>, Query, description = "Only tasks of this owner (a submitter sees its own only)"),
        ("limit" = Option<u32>, Query, minimum = 1,
         description = "Tasks per page: 1 to list_limit_max (1,000 by default); list_limit_default (100) when absent"),
        ("cursor" = Option<String>, Query, description = "The previous page's `next`"),
    ),
    responses((status = 200, description = "A page, newest first, without stdout and stderr", body = TaskPage))
)]
#[get("/tasks?<status>&<owner>&<limit>&<cursor>")]
#[allow(clippy::too_many_arguments)]
async fn list(
    access: Allowed<Read>,
    _query: StrictQuery,
    db: &Db,
    config: &State<AppConfig>,
    status: Option<&str>,
    owner: Option<&str>,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<Json<Page>, ApiError> {
    let status = query::parsed("status", status, str::parse::<TaskStatus>)?;
    let owner = match (access.who.scope(), owner) {
        // Another owner's tasks, asked for by a submitter: none it may see.
        (Some(me), Some(other)) if other != me => {
            return Ok(Json(Page { tasks: Vec::new(), next: None }))
        }
        (Some(me), _) => Some(me),
        (None, owner) => owner,
    };
    let bounds = (1, u64::from(config.list_limit_max));
    let limit = query::number("limit", limit, config.list_limit_default.into(), bounds, "")?;
    let before = query::parsed("cursor", cursor, cursor::decode)?;
    // One row more than asked tells whether another page exists.
    let mut tasks = store::list(db, status, owner, before, limit as i64 + 1).await?;
    let next = if tasks.len() > limit as usize {
        tasks.truncate(limit as usize);
        tasks.last().map(|t| cursor::encode(t.seq))
    } else {
        None
    };
    let tasks = tasks.into_iter().map(|listed| Summary(listed.task)).collect();
    Ok(Json(Page { tasks, next }))
}

/// The task. With `wait`, holds the request up to that many seconds until the task has ended,
/// so that a user can submit and then wait in two calls.
#[utoipa::path(
    get,
    path = "/tasks/{id}",
    operation_id = "getTask",
    summary = "Get a task, or wait for it to end",
    tag = "tasks",
    security(("bearer" = ["admin", "reader", "submitter"])),
    params(
        ("id" = TaskId, Path),
        ("wait" = Option<u64>, Query, minimum = 0,
         description = "Seconds to hold the answer until the task has ended; a longer wait is cut to pick_wait_max_secs (60 by default)"),
    ),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 429, response = TooMany),
    )
)]
#[get("/tasks/<id>?<wait>")]
#[allow(clippy::too_many_arguments)]
async fn show(
    access: Allowed<Read>,
    _query: StrictQuery,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    slots: &State<WaitSlots>,
    id: &str,
    wait: Option<&str>,
    shutdown: Shutdown,
    gone: ClientGone,
) -> Result<Json<Task>, ApiError> {
    let id = parse_id(id)?;
    let wait = Duration::from_secs(query::wait_secs_capped(wait, config.pick_wait_max_secs)?);
    let _slot = if wait.is_zero() { None } else { Some(slots.take(&access.who)?) };
    let deadline = tokio::time::Instant::now() + wait;
    let scope = access.who.scope();
    let look = || async {
        let task = store::get(db, id, scope).await?.ok_or_else(|| ApiError::task_not_found(id))?;
        let ended = task.status.is_terminal();
        Ok((task, ended))
    };
    let events = dispatcher.events();
    let stop = ended(shutdown, gone);
    let task = events.poll(id, &[Woken::Ended], deadline, RECHECK, stop, look).await?;
    Ok(Json(task))
}

/// Every attempt of the task, oldest first; the current one of a running task last, without
/// an outcome.
#[utoipa::path(
    get,
    path = "/tasks/{id}/attempts",
    operation_id = "listAttempts",
    summary = "A task's attempts",
    tag = "tasks",
    security(("bearer" = ["admin", "reader", "submitter"])),
    params(("id" = TaskId, Path)),
    responses(
        (status = 200, description = "Every attempt, oldest first", body = Vec<Attempt>),
    )
)]
#[get("/tasks/<id>/attempts")]
async fn attempts(
    access: Allowed<Read>,
    _query: StrictQuery,
    db: &Db,
    id: &str,
) -> Result<Json<Vec<Attempt>>, ApiError> {
    let id = parse_id(id)?;
    let attempts = store::attempts(db, id, access.who.scope()).await?;
    Ok(Json(attempts.ok_or_else(|| ApiError::task_not_found(id))?))
}

#[derive(rocket::Responder)]
enum AbortResponse {
    /// A queued task, cancelled at once.
    Cancelled(Json<Task>),
    /// A running task: its agent stops it and reports.
    #[response(status = 202)]
    Requested(Json<Task>),
}

/// Cancels a queued task at once, or asks the agent of a running one to stop it.
#[utoipa::path(
    post,
    path = "/tasks/{id}/abort",
    operation_id = "abortTask",
    summary = "Abort a task",
    tag = "tasks",
    security(("bearer" = ["admin", "submitter"])),
    params(("id" = TaskId, Path)),
    responses(
        (status = 200, description = "A queued task, cancelled at once", body = Task),
        (status = 202, description = "A running task: its agent stops it and reports", body = Task),
        (status = 409, response = Conflict),
    )
)]
#[post("/tasks/<id>/abort")]
async fn abort(
    access: Allowed<Abort>,
    _query: StrictQuery,
    db: &Db,
    dispatcher: &State<Dispatcher>,
    metrics: &State<Metrics>,
    id: &str,
) -> Result<AbortResponse, ApiError> {
    let id = parse_id(id)?;
    let (who, scope) = (&access.who.name, access.who.scope());
    match store::abort(db, id, who, scope).await? {
        Some(Aborted::Cancelled(task)) => {
            dispatcher.events().announce(id, Woken::Ended);
            metrics.ended(&task);
            journal::ended(&task);
            Ok(AbortResponse::Cancelled(Json(task)))
        }
        Some(Aborted::Requested(task)) => {
            journal::abort_requested(&task);
            Ok(AbortResponse::Requested(Json(task)))
        }
        None => {
            let task =
                store::get(db, id, scope).await?.ok_or_else(|| ApiError::task_not_found(id))?;
            Err(ApiError::TaskEnded { id, status: task.status })
        }
    }
}

#[derive(rocket::Responder)]
enum PickResponse {
    Task(Box<Handed>),
    #[response(status = 204)]
    Nothing(()),
}

/// Hands the agent the queued tasks it should run first (highest priority, then oldest, among
/// those due whose tags are all among the agent's `tags`): one, or up to `max` for an agent
/// with that many free slots, as soon as any is there; waiting up to `wait` seconds for one
/// to arrive.
#[utoipa::path(
    get,
    path = "/tasks/pick",
    operation_id = "pickTask",
    summary = "Pick tasks (long poll)",
    tag = "agents",
    security(("bearer" = ["admin", "agent"])),
    params(
        AgentHeaders,
        ("wait" = Option<u64>, Query, minimum = 0,
         description = "Seconds to wait for a task: 0 to pick_wait_max_secs (60 by default); pick_wait_default_secs (25) when absent"),
        ("tags" = Option<String>, Query,
         description = "The agent's tags, comma-separated (up to 64 of `[a-z0-9][a-z0-9_.-]{0,63}`)"),
        ("max" = Option<u64>, Query, minimum = 1, maximum = 64,
         description = "Take up to this many tasks (an agent's free slots); the answer is then a list of 1 to `max` assignments. Without it, one assignment, not in a list"),
    ),
    responses(
        (status = 200, description = "Tasks, their leases and the leases' terms: one assignment, or a list of them when `max` is given", body = Picked),
        (status = 204, description = "No task within the wait"),
    )
)]
#[get("/tasks/pick?<wait>&<tags>&<max>")]
#[allow(clippy::too_many_arguments)]
async fn pick(
    _access: Allowed<Run>,
    _query: StrictQuery,
    agent: Agent,
    wait: Option<&str>,
    tags: Option<&str>,
    max: Option<&str>,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    metrics: &State<Metrics>,
    shutdown: Shutdown,
    gone: ClientGone,
) -> Result<PickResponse, ApiError> {
    let wait = query::wait_secs(wait, config.pick_wait_default_secs, config.pick_wait_max_secs)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let tags = query::parsed("tags", tags, parse_agent_tags)?.unwrap_or_default();
    let listed = max.is_some();
    let max = query::number("max", max, 1, (1, MAX_PICK as u64), "")? as usize;
    agent.declare_tags(&tags);
    let mut reply = dispatcher.park(agent.name.clone(), &tags, max, deadline)?;
    // The dispatcher answers by the deadline unless the database holds it up; the margin keeps
    // this response inside the agent's read timeout even then.
    let mut departed = false;
    let handed = tokio::select! {
        biased;
        answer = &mut reply => answer.unwrap_or_default(),
        _ = shutdown => Vec::new(),
        _ = gone.departed() => {
            departed = true;
            Vec::new()
        }
        _ = tokio::time::sleep_until(deadline + Duration::from_secs(5)) => Vec::new(),
    };
    // Giving up: close the channel so that the dispatcher puts back anything it claims from
    // now on, and deliver what it may have sent in the meantime rather than drop it.
    let handed = if handed.is_empty() {
        reply.close();
        reply.try_recv().unwrap_or_default()
    } else {
        handed
    };
    if departed {
        // An agent that has gone leaves the parked picks now, not at the next rescan.
        dispatcher.left();
    }
    if handed.is_empty() {
        return Ok(PickResponse::Nothing(()));
    }
    for handover in &handed {
        metrics.picked(&handover.assignment.task);
        journal::picked(&handover.assignment.task);
    }
    Ok(PickResponse::Task(Box::new(Handed { handovers: handed, listed })))
}

/// A pick's tasks as JSON: a list when the pick gave `max`, else its one assignment. Their
/// deliveries are signed only when the server reads the body to its end, which it does only
/// after the connection took the response: an agent that has gone (its connection closed
/// while the pick was parked) never takes them, and the tasks go back to the queue at once.
struct Handed {
    handovers: Vec<Handover>,
    listed: bool,
}

impl<'r> Responder<'r, 'static> for Handed {
    fn respond_to(self, _: &'r Request<'_>) -> response::Result<'static> {
        let (assignments, deliveries): (Vec<Assignment>, Vec<Delivery>) =
            self.handovers.into_iter().map(|h| (h.assignment, h.delivery)).unzip();
        let encoded = if self.listed {
            serde_json::to_vec(&assignments)
        } else {
            serde_json::to_vec(&assignments[0])
        };
        let body = encoded.map_err(|e| {
            log::error!(
                "task {}: the assignment could not be encoded: {e}",
                assignments[0].task.id
            );
            rocket::http::Status::InternalServerError
        })?;
        let size = body.len();
        let signed = Signed { bytes: Cursor::new(body), deliveries };
        Response::build().header(ContentType::JSON).sized_body(size, signed).ok()
    }
}

/// A body that signs its deliveries when it has been read to the end.
struct Signed {
    bytes: Cursor<Vec<u8>>,
    deliveries: Vec<Delivery>,
}

impl AsyncRead for Signed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.bytes).poll_read(cx, buf))?;
        if buf.filled().len() == before && buf.remaining() > 0 {
            // The end: every byte went to a connection that was alive to take them.
            for delivery in this.deliveries.drain(..) {
                delivery.delivered();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for Signed {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.get_mut().bytes).start_seek(position)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.get_mut().bytes).poll_complete(cx)
    }
}

/// Extends the lease of the attempt, then holds the request up to `wait` seconds (at most a
/// third of the lease) and answers at once if an abort of the task is requested meanwhile.
/// An agent that heartbeats again as soon as this returns learns of an abort within
/// milliseconds, without a busy poll.
#[utoipa::path(
    post,
    path = "/tasks/{id}/heartbeat",
    operation_id = "heartbeat",
    summary = "Extend an attempt's lease",
    tag = "agents",
    security(("bearer" = ["admin", "agent"])),
    params(
        ("id" = TaskId, Path),
        AgentHeaders,
        ("wait" = Option<u64>, Query, minimum = 0,
         description = "Seconds to hold the answer unless an abort comes: at most a third of the lease"),
    ),
    request_body(content = LeaseBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The lease, extended", body = HeartbeatReply),
        (status = 409, response = Conflict),
    )
)]
#[post("/tasks/<id>/heartbeat?<wait>", data = "<body>")]
#[allow(clippy::too_many_arguments)]
async fn heartbeat(
    _access: Allowed<Run>,
    _query: StrictQuery,
    _agent: Agent,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    id: &str,
    wait: Option<&str>,
    body: JsonBody<LeaseBody>,
    shutdown: Shutdown,
) -> Result<Json<HeartbeatReply>, ApiError> {
    let lease = Lease { task: parse_id(id)?, token: body.0.lease };
    let max_hold = u64::from(config.heartbeat_hold_secs());
    let mut hold = Duration::from_secs(query::wait_secs(wait, 0, max_hold)?);
    if !dispatcher.is_listening() {
        // No notification can arrive: come back soon and look at the database again.
        hold = hold.min(Duration::from_secs(1));
    }
    // Watch before reading, so that an abort requested in between is not missed.
    let watch = dispatcher.events().watch(lease.task);
    let Some(beat) = lease.heartbeat(db, config.lease_secs).await? else {
        return Err(not_current(db, lease).await);
    };
    // Output events come and go; an abort answers at once, the attempt's end ends the hold.
    let abort_or_end = async {
        // A rescan (events may have been missed) ends the hold too: the next heartbeat reads
        // the abort from the database.
        watch.until(&[Woken::Abort, Woken::Ended]).await;
        watch.seen(Woken::Abort)
    };
    let abort = beat.abort
        || tokio::select! {
            abort = abort_or_end => abort,
            _ = tokio::time::sleep(hold) => false,
            _ = shutdown => false,
        };
    let lease_expires_at = beat.lease_expires_at;
    Ok(Json(HeartbeatReply { abort, lease_expires_at, lease_secs: config.lease_secs }))
}

/// Hands the task back to the queue without counting the attempt (an agent that is draining).
#[utoipa::path(
    post,
    path = "/tasks/{id}/release",
    operation_id = "releaseTask",
    summary = "Hand a task back",
    tag = "agents",
    security(("bearer" = ["admin", "agent"])),
    params(("id" = TaskId, Path), AgentHeaders),
    request_body(content = ReleaseBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Back in the queue (or failed, handed back too often)", body = Task),
        (status = 409, response = Conflict),
    )
)]
#[post("/tasks/<id>/release", data = "<body>")]
#[allow(clippy::too_many_arguments)]
async fn release(
    _access: Allowed<Run>,
    _query: StrictQuery,
    _agent: Agent,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    metrics: &State<Metrics>,
    id: &str,
    body: JsonBody<ReleaseBody>,
) -> Result<Json<Task>, ApiError> {
    let lease = Lease { task: parse_id(id)?, token: body.0.lease };
    // Never started (by the agent's word, and no heartbeat says otherwise): queued again as if
    // never picked. Its command never ran, so it cannot be what keeps handing it back.
    if body.0.unstarted && lease.unclaim(&***db).await? {
        if let Some(task) = store::get(db, lease.task, None).await? {
            dispatcher.events().announce(lease.task, Woken::Ended);
            dispatcher.task_queued();
            journal::released(&task);
            return Ok(Json(task));
        }
    }
    let Some(task) = lease.release(db, config.max_attempts).await? else {
        return Err(not_current(db, lease).await);
    };
    dispatcher.events().announce(lease.task, Woken::Ended);
    if task.status == TaskStatus::Queued {
        dispatcher.task_queued();
    }
    // Handed back too often, it fails.
    metrics.ended(&task);
    journal::released(&task);
    Ok(Json(task))
}

/// Records the result of the attempt the lease identifies. A repeat of an accepted finish
/// (an agent retrying after a lost response) answers 200 without writing again. The task's
/// text is made from the uploaded output by the cap's rule: stated lengths must be the
/// uploads' lengths, and a reported text must be that text, so that the task's text and
/// `/output` can never disagree.
#[utoipa::path(
    post,
    path = "/tasks/{id}/finish",
    operation_id = "finishTask",
    summary = "Report an attempt's result",
    tag = "agents",
    security(("bearer" = ["admin", "agent"])),
    params(("id" = TaskId, Path), AgentHeaders),
    request_body(content = FinishReport, content_type = "application/json"),
    responses(
        (status = 200, description = "The task as it ended (or queued again, to be retried)", body = Task),
        (status = 409, response = Conflict),
    )
)]
#[post("/tasks/<id>/finish", data = "<report>")]
#[allow(clippy::too_many_arguments)]
async fn finish(
    _access: Allowed<Run>,
    _query: StrictQuery,
    agent: Agent,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    metrics: &State<Metrics>,
    id: &str,
    report: JsonBody<FinishReport>,
) -> Result<Json<Task>, ApiError> {
    let lease = Lease { task: parse_id(id)?, token: report.0.lease };
    let default_cap = OutputCap::new(config.max_output_bytes as usize);
    let outcome = model::outcome(report.0)?;
    // The attempt's end reaches the other API processes with the finish's own commit.
    let ended = dispatcher.event_prefix(Woken::Ended);
    let recorded = match outcome.lengths {
        // Nothing uploaded, says the agent (a command without output): the write checks it,
        // with no read before it.
        Some([0, 0]) => {
            let stated = outcome
                .reported
                .iter()
                .position(|t| t.as_ref().is_some_and(|t| !t.text.is_empty()));
            if let Some(index) = stated {
                return Err(ApiError::OutputMismatch(Stream::ALL[index]));
            }
            let empty = || default_cap.text(&[], &[], 0);
            lease.finish(db, &outcome, &[empty(), empty()], [0, 0], &ended).await?
        }
        stated => {
            let upto = stated.unwrap_or([u64::MAX; 2]);
            match output::uploads(db, &lease, upto, default_cap).await? {
                Some(uploads) => {
                    let (texts, lengths) = output_texts(&outcome, &uploads)?;
                    lease.finish(db, &outcome, &texts, lengths, &ended).await?
                }
                None => None,
            }
        }
    };
    if let Some(task) = recorded {
        // The attempt is over: its parked heartbeat need not wait out its hold. (The other
        // processes were told by the finish itself.)
        dispatcher.events().wake(lease.task, Woken::Ended);
        if task.status == TaskStatus::Queued {
            // Retried, not ended: every dispatcher learns when it is due.
            dispatcher.task_queued();
            journal::retried(&task);
            return Ok(Json(task));
        }
        agent.reported_end();
        metrics.ended(&task);
        journal::ended(&task);
        return Ok(Json(task));
    }
    // Nothing written. A repeat of the report that ended this very attempt is answered as it
    // was; another report for the same attempt is a conflict; an upload that came in between
    // the check and the write leaves the finish to be sent again.
    if let Some((task, Some(current))) = store::get_with_lease(db, lease.task).await? {
        if current == lease.token && task.status == TaskStatus::InProgress {
            return Err(ApiError::OutputIncomplete {
                stdout_bytes: task.stdout_bytes.max(0) as u64,
                stderr_bytes: task.stderr_bytes.max(0) as u64,
            });
        }
        if current == lease.token {
            if outcome.is_recorded_in(&task) {
                return Ok(Json(task));
            }
            return Err(ApiError::ReportConflict { id: lease.task, status: task.status });
        }
    }
    Err(not_current(db, lease).await)
}

/// The texts a finish records, and the lengths it records them for: the texts of the uploads,
/// always. Stated lengths must be the uploads' lengths (a finish that states none takes
/// them); a reported text must be the uploads' text.
fn output_texts(
    outcome: &Outcome,
    uploads: &Uploads,
) -> Result<([OutputText; 2], [u64; 2]), ApiError> {
    let lengths = match outcome.lengths {
        Some(stated) if stated != uploads.lengths => {
            let [stdout_bytes, stderr_bytes] = uploads.lengths;
            return Err(ApiError::OutputIncomplete { stdout_bytes, stderr_bytes });
        }
        stated => stated.unwrap_or(uploads.lengths),
    };
    let text_of = |stream: Stream| {
        let reported = &outcome.reported[stream.index()];
        match (uploads.text(stream, lengths[stream.index()]), reported) {
            (Some(text), Some(reported)) if text.text == reported.text => Ok(text),
            (Some(text), None) => Ok(text),
            _ => Err(ApiError::OutputMismatch(stream)),
        }
    };
    Ok(([text_of(Stream::Stdout)?, text_of(Stream::Stderr)?], lengths))
}

/// Why a write fenced by `lease` changed nothing: 404, or 409 naming the reason.
async fn not_current(db: &Db, lease: Lease) -> ApiError {
    let id = lease.task;
    match store::get_with_lease(db, id).await {
        Err(e) => e.into(),
        Ok(None) => ApiError::task_not_found(id),
        Ok(Some((task, None))) => {
            let why = format!("no attempt holds it (it is {})", task.status);
            ApiError::LeaseNotCurrent { id, why }
        }
        Ok(Some((_, Some(current)))) if current != lease.token => {
            ApiError::LeaseNotCurrent { id, why: "another attempt owns it".into() }
        }
        Ok(Some((task, _))) => ApiError::LeaseNotCurrent {
            id,
            why: format!("the attempt has ended ({})", task.status),
        },
    }
}

/// The most tags an agent may declare.
const MAX_AGENT_TAGS: usize = 64;

/// An agent's tags, `linux,gpu`: sorted, without repeats.
fn parse_agent_tags(text: &str) -> Result<Vec<String>, String> {
    let mut tags = std::collections::BTreeSet::new();
    for tag in text.split(',').filter(|t| !t.is_empty()) {
        if !taskexec_protocol::is_tag(tag) {
            return Err(format!(
                "{tag:?} is not a tag: 1 to 64 of a-z, 0-9, `_`, `.`, `-`, starting with a \
                 letter or digit"
            ));
        }
        tags.insert(tag.to_owned());
    }
    if tags.len() > MAX_AGENT_TAGS {
        return Err(format!("{} tags; an agent may declare {MAX_AGENT_TAGS}", tags.len()));
    }
    Ok(tags.into_iter().collect())
}

pub(crate) fn parse_id(id: &str) -> Result<TaskId, ApiError> {
    id.parse().map_err(|_| ApiError::Malformed(format!("{id:?} is not a task id (a UUID)")))
}

/// The list cursor: opaque to clients, the `seq` of the last task of the page underneath.
mod cursor {
    const PREFIX: &str = "s";

    pub fn encode(seq: i64) -> String {
        format!("{PREFIX}{seq:x}")
    }

    pub fn decode(cursor: &str) -> Result<i64, String> {
        cursor
            .strip_prefix(PREFIX)
            .and_then(|hex| i64::from_str_radix(hex, 16).ok())
            .filter(|seq| *seq > 0)
            .ok_or_else(|| format!("{cursor:?} is not a cursor from this API"))
    }
}
