//! The output endpoints: the agent's uploads, reads by offset, the combined log, followed.

use std::io::Cursor;
use std::time::Duration;

use rocket::data::{Data, Limits, ToByteUnit};
use rocket::http::{ContentType, Header, Status};
use rocket::outcome::Outcome;
use rocket::request::{self, ClientGone, FromRequest};
use rocket::response::stream::ByteStream;
use rocket::response::{self, Responder};
use rocket::serde::json::Json;
use rocket::{get, post, routes, Request, Response, Route, Shutdown, State};
use taskexec_protocol::output::headers;
use taskexec_protocol::{LeaseToken, OutputAck, OutputCap, Stream, TaskId, TaskStatus};
use tokio::time::Instant;

use super::feed::{Feeds, Shared};
use super::store::{self, Appended, Chunk, Standing};
use crate::agents::Agent;
use crate::auth::verifier::Verifier;
use crate::auth::{Allowed, Read, Run};
use crate::body::read_within;
use crate::config::AppConfig;
use crate::dispatch::{ended, Dispatcher, WaitSlots, Woken, RECHECK};
use crate::error::ApiError;
use crate::openapi::{AgentHeaders, Conflict, Invalid, RawBytes, TooMany};
use crate::query::{self, StrictQuery};
use crate::tasks::lease::Lease;
use crate::tasks::routes::parse_id;
use crate::Db;

pub fn routes() -> Vec<Route> {
    routes![upload, read, read_log]
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(upload, read, read_log), components(schemas(OutputAck, Stream, RawBytes)))]
pub struct ApiDoc;

/// The largest answer to one read, in bytes.
const MAX_READ: usize = 256 * 1024;

/// How often a followed log checks its caller's token again (and looks at the database, while
/// events cannot arrive). How long it may go without anything to send before it ends is
/// `follow_idle_secs`.
const FOLLOW_RECHECK: Duration = Duration::from_secs(5);

/// The lease, from `X-Lease`, on uploads (whose body is the raw bytes).
pub struct LeaseHeader(LeaseToken);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for LeaseHeader {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        match request.headers().get_one(headers::LEASE).map(str::parse) {
            Some(Ok(lease)) => Outcome::Success(LeaseHeader(lease)),
            _ => Outcome::Error(
                ApiError::Malformed(format!("send the lease in an {} header", headers::LEASE))
                    .remember(request),
            ),
        }
    }
}

/// The largest offset accepted: 2^53 bytes (9 PB), far beyond any output, small enough that
/// no offset arithmetic can overflow and every offset is exact in JSON numbers.
const MAX_OFFSET: u64 = 1 << 53;

fn offset(value: Option<&str>) -> Result<u64, ApiError> {
    query::number("offset", value, 0, (0, MAX_OFFSET), " of bytes")
}

fn stream(value: Option<&str>) -> Result<Stream, ApiError> {
    Ok(query::parsed("stream", value, str::parse::<Stream>)?.unwrap_or(Stream::Stdout))
}

/// A chunk of live output, the raw bytes as the body: `offset` is where they start in the
/// stream; `skip=true` allows starting past the end of the stream (the bytes between are
/// dropped), once its first half is complete. Answers the stream's new length.
#[utoipa::path(
    post,
    path = "/tasks/{id}/output",
    operation_id = "uploadOutput",
    summary = "Upload a chunk of output",
    tag = "agents",
    security(("bearer" = ["admin", "agent"])),
    params(
        ("id" = TaskId, Path),
        AgentHeaders,
        ("X-Lease" = LeaseToken, Header, description = "The attempt's lease"),
        ("stream" = Option<Stream>, Query, description = "stdout when absent"),
        ("offset" = Option<u64>, Query, minimum = 0, maximum = 9007199254740992_u64,
         description = "Where the chunk starts in the stream"),
        ("skip" = Option<bool>, Query,
         description = "Allow starting past the end of the stream (the bytes between are dropped), once its first half is complete"),
    ),
    request_body(content = RawBytes, content_type = "application/octet-stream", description = "The raw bytes"),
    responses(
        (status = 200, description = "Where the server's copy of the stream now ends", body = OutputAck),
        (status = 409, response = Conflict),
        (status = 422, response = Invalid),
    )
)]
#[post("/tasks/<id>/output?<stream>&<offset>&<skip>", data = "<data>")]
#[allow(clippy::too_many_arguments)]
async fn upload(
    _access: Allowed<Run>,
    _query: StrictQuery,
    _agent: Agent,
    lease: LeaseHeader,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    id: &str,
    stream: Option<&str>,
    offset: Option<&str>,
    skip: Option<&str>,
    limits: &Limits,
    data: Data<'_>,
) -> Result<Json<OutputAck>, ApiError> {
    let lease = Lease { task: parse_id(id)?, token: lease.0 };
    let stream = self::stream(stream)?;
    let offset = self::offset(offset)?;
    let skip = query::flag("skip", skip, false)?;
    let bytes = read_within(data, limits.get("output").unwrap_or(64.kibibytes())).await?;
    if bytes.is_empty() {
        return Err(ApiError::Invalid("a chunk must hold at least one byte".into()));
    }
    let chunk = Chunk { stream, offset, data: &bytes, skip };
    let cap = OutputCap::new(config.max_output_bytes as usize);
    match store::append(db, &lease, chunk, cap).await? {
        Appended::Stored { next } => {
            dispatcher.events().announce(lease.task, Woken::Output);
            Ok(Json(OutputAck { next_offset: next }))
        }
        Appended::Gap { expected } => Err(ApiError::OffsetGap { expected_offset: expected }),
        Appended::NotCurrent => Err(ApiError::LeaseNotCurrent {
            id: lease.task,
            why: "another attempt owns it, or it has ended".into(),
        }),
    }
}

/// Bytes of one stream from an offset, raw.
pub struct OutputRead(store::Read);

impl<'r> Responder<'r, 'static> for OutputRead {
    fn respond_to(self, _: &'r Request<'_>) -> response::Result<'static> {
        let read = self.0;
        Response::build()
            .status(Status::Ok)
            .header(ContentType::Binary)
            .header(Header::new(headers::NEXT_OFFSET, read.next.to_string()))
            .header(Header::new(headers::DROPPED, read.dropped.to_string()))
            .header(Header::new(headers::TOTAL, read.total.to_string()))
            .header(Header::new(headers::ENDED, read.ended.to_string()))
            .sized_body(read.data.len(), Cursor::new(read.data))
            .ok()
    }
}

/// The bytes of `stream` from `offset` (default 0), with where to read next and whether the
/// task has ended. When there is nothing new yet and the task is still running, waits up to
/// `wait` seconds for more.
#[utoipa::path(
    get,
    path = "/tasks/{id}/output",
    operation_id = "readOutput",
    summary = "Read one stream of output by offset",
    tag = "output",
    security(("bearer" = ["admin", "reader", "submitter"])),
    params(
        ("id" = TaskId, Path),
        ("stream" = Option<Stream>, Query, description = "stdout when absent"),
        ("offset" = Option<u64>, Query, minimum = 0, maximum = 9007199254740992_u64,
         description = "The first byte wanted; 0 when absent"),
        ("wait" = Option<u64>, Query, minimum = 0,
         description = "Seconds to wait for new bytes while the task runs; a longer wait is cut to pick_wait_max_secs (60 by default)"),
    ),
    responses(
        (status = 200, description = "The raw bytes from `offset` (up to 256 KiB)",
         content_type = "application/octet-stream", body = RawBytes,
         headers(
             ("Taskexec-Next-Offset" = u64, description = "Where to read next"),
             ("Taskexec-Dropped" = u64, description = "Bytes before the first one returned that were dropped (a flood)"),
             ("Taskexec-Total" = u64, description = "The stream's length so far"),
             ("Taskexec-Ended" = bool, description = "The task has ended: nothing more will come"),
         )),
        (status = 429, response = TooMany),
    )
)]
#[get("/tasks/<id>/output?<stream>&<offset>&<wait>")]
#[allow(clippy::too_many_arguments)]
async fn read(
    access: Allowed<Read>,
    _query: StrictQuery,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    slots: &State<WaitSlots>,
    id: &str,
    stream: Option<&str>,
    offset: Option<&str>,
    wait: Option<&str>,
    shutdown: Shutdown,
    gone: ClientGone,
) -> Result<OutputRead, ApiError> {
    let id = parse_id(id)?;
    let stream = self::stream(stream)?;
    let offset = self::offset(offset)?;
    let wait = Duration::from_secs(query::wait_secs_capped(wait, config.pick_wait_max_secs)?);
    let _slot = if wait.is_zero() { None } else { Some(slots.take(&access.who)?) };
    let scope = access.who.scope();
    let look = || async {
        let read = store::read(db, id, scope, stream, offset, MAX_READ)
            .await?
            .ok_or_else(|| ApiError::task_not_found(id))?;
        let news = !read.data.is_empty() || read.dropped > 0 || read.ended;
        Ok((read, news))
    };
    let events = dispatcher.events();
    let deadline = Instant::now() + wait;
    let read = events
        .poll(id, &[Woken::Output, Woken::Ended], deadline, RECHECK, ended(shutdown, gone), look)
        .await?;
    Ok(OutputRead(read))
}

/// The last line of a followed log: how the task ended.
fn ending(standing: &Standing) -> String {
    let how = match (standing.status, standing.exit_code, &standing.error) {
        (TaskStatus::Finished, Some(code), _) => format!("finished, exit code {code}"),
        (TaskStatus::Failed, _, Some(error)) => format!("failed: {error}"),
        (TaskStatus::Cancelled, _, _) => "cancelled".to_owned(),
        (status, _, _) => status.to_string(),
    };
    format!("\n[taskexec: task {how}]\n")
}

/// stdout and stderr combined, in the order the agent sent them, as `text/plain`. With
/// `follow=true` the response goes on (chunked) until the task ends, like `tail -f`, and then
/// says how it ended. Bytes that were dropped (a flood) are replaced by a line that says how
/// many. A follower waits on the task's events and shares the reads of the others here (see
/// `feed`); it checks its caller's token again every `FOLLOW_RECHECK` (and ends once the token
/// is revoked or expired), and looks at the log on its timer only now and then, in case an
/// event was lost (every time while no event can arrive).
#[utoipa::path(
    get,
    path = "/tasks/{id}/log",
    operation_id = "readLog",
    summary = "Read or follow the combined log",
    description = "stdout and stderr combined, in the order the agent sent them. With \
                   `follow=true` the response goes on (chunked) until the task ends, like \
                   `tail -f`, and then says how it ended (`[taskexec: task finished, exit code \
                   0]`); a follow that has sent nothing for `follow_idle_secs` (15 minutes by \
                   default) ends. Bytes that were dropped (a flood) are replaced by a line that \
                   says how many.",
    tag = "output",
    security(("bearer" = ["admin", "reader", "submitter"])),
    params(
        ("id" = TaskId, Path),
        ("follow" = Option<bool>, Query,
         description = "Go on (chunked) until the task ends, then say how it ended; false when absent"),
    ),
    responses(
        (status = 200, description = "stdout and stderr combined, in the order they came",
         content_type = "text/plain", body = String),
        (status = 429, response = TooMany),
    )
)]
#[get("/tasks/<id>/log?<follow>")]
#[allow(clippy::too_many_arguments)]
async fn read_log(
    access: Allowed<Read>,
    _query: StrictQuery,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    verifier: &State<Verifier>,
    feeds: &State<Feeds>,
    slots: &State<WaitSlots>,
    id: &str,
    follow: Option<&str>,
    shutdown: Shutdown,
) -> Result<(ContentType, ByteStream![Shared]), ApiError> {
    let id = parse_id(id)?;
    let follow = query::flag("follow", follow, false)?;
    let slot = if follow { Some(slots.take(&access.who)?) } else { None };
    // The check of the caller's scope: the stream below reads a task it may see.
    store::log(db, id, access.who.scope(), i64::MAX)
        .await?
        .ok_or_else(|| ApiError::task_not_found(id))?;
    let (pool, events) = (db.pool().clone(), dispatcher.events().clone());
    let (verifier, who) = (verifier.inner().clone(), access.who);
    let feed = feeds.feed(id);
    let idle = Duration::from_secs(config.follow_idle_secs);
    let stream = ByteStream! {
        let _slot = slot;
        let mut shutdown = shutdown;
        let (mut after, mut next) = (0i64, [0u64; 2]);
        let (mut last_sent, mut checked) = (Instant::now(), Instant::now());
        // Events after `watched` wake `watch`; what came before is in any read started after
        // it. `since` is the oldest read start the next read takes: `watched`, or later for a
        // look on the timer.
        let mut watch = events.watch(id);
        let mut watched = Instant::now();
        let mut since = watched;
        'follow: loop {
            if checked.elapsed() >= FOLLOW_RECHECK {
                if let Err(e) = verifier.recheck(&who).await {
                    let why = match e {
                        ApiError::Unauthorized(_) => "the token was revoked or has expired",
                        _ => "the token could not be checked again",
                    };
                    let line = format!("\n[taskexec: stopped following: {why}]\n");
                    yield Shared::from(line.into_bytes());
                    break;
                }
                checked = Instant::now();
            }
            let Ok(Some((chunks, standing))) = feed.read(&pool, &events, after, since).await else {
                break;
            };
            if chunks.is_empty() {
                let ended = standing.status.is_terminal();
                if ended && follow {
                    yield Shared::from(ending(&standing).into_bytes());
                }
                if ended || !follow || last_sent.elapsed() >= idle {
                    break;
                }
                let look = FOLLOW_RECHECK.min(idle.saturating_sub(last_sent.elapsed()));
                tokio::select! {
                    _ = watch.until(&[Woken::Output, Woken::Ended]) => {
                        watch = events.watch(id);
                        watched = Instant::now();
                        since = watched;
                    }
                    _ = tokio::time::sleep(look) => {
                        // Against an event that never came (a lost NOTIFY): a look now and then,
                        // one read per task for all its followers here; every time while no
                        // event can arrive at all.
                        since = if events.is_listening() {
                            watched.max(feed.safety_mark())
                        } else {
                            Instant::now()
                        };
                    }
                    _ = &mut shutdown => break 'follow,
                }
                continue;
            }
            last_sent = Instant::now();
            for chunk in chunks {
                after = chunk.seq;
                let seen = &mut next[chunk.stream.index()];
                if chunk.start == 0 && *seen > 0 {
                    // A new attempt (the task was requeued) starts its streams again.
                    yield Shared::from(b"\n[taskexec: the task started again]\n".to_vec());
                    next = [0, 0];
                }
                let seen = &mut next[chunk.stream.index()];
                if chunk.start > *seen {
                    let marker = format!(
                        "\n[taskexec: {} bytes of {} dropped here]\n",
                        chunk.start - *seen,
                        chunk.stream
                    );
                    yield Shared::from(marker.into_bytes());
                }
                *seen = chunk.start + chunk.data.0.len() as u64;
                yield chunk.data;
            }
        }
    };
    // Plain text, but no charset: the bytes are the command's, UTF-8 or not.
    Ok((ContentType::new("text", "plain"), stream))
}
