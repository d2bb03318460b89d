//! The output endpoints: the agent's uploads, reads by offset, the combined log, followed.

use std::io::Cursor;
use std::time::Duration;

use rocket::data::{Data, Limits, ToByteUnit};
use rocket::http::{ContentType, Header, Status};
use rocket::outcome::Outcome;
use rocket::request::{self, FromRequest};
use rocket::response::stream::ByteStream;
use rocket::response::{self, Responder};
use rocket::serde::json::Json;
use rocket::{get, post, routes, Request, Response, Route, Shutdown, State};
use serde_json::{json, Value};
use tokio::time::Instant;
use uuid::Uuid;

use super::store::{self, Appended, Chunk, Stream};
use crate::auth::AgentAuth;
use crate::body::read_within;
use crate::config::AppConfig;
use crate::dispatch::{Dispatcher, Woken, RECHECK};
use crate::error::ApiError;
use crate::tasks::routes::{parse_id, parse_wait};
use crate::Db;

pub fn routes() -> Vec<Route> {
    routes![upload, read, log]
}

/// The largest answer to one read, in bytes.
const MAX_READ: usize = 256 * 1024;

/// How often a followed log looks at the database without an event, and how long it may go
/// without anything to send before it ends (the client reconnects; a follower that went away
/// without a word cannot be told from one that waits, so it must not cost forever).
const FOLLOW_RECHECK: Duration = Duration::from_secs(5);
const FOLLOW_IDLE: Duration = Duration::from_secs(15 * 60);

/// The lease, from `X-Lease`, on uploads (whose body is the raw bytes).
pub struct LeaseHeader(Uuid);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for LeaseHeader {
    type Error = ApiError;

    async fn from_request(request: &'r Request<'_>) -> request::Outcome<Self, ApiError> {
        match request.headers().get_one("X-Lease").map(Uuid::parse_str) {
            Some(Ok(lease)) => Outcome::Success(LeaseHeader(lease)),
            _ => Outcome::Error(
                ApiError::BadRequest("send the lease in an X-Lease header".into())
                    .remember(request),
            ),
        }
    }
}

/// A chunk of live output, the raw bytes as the body: `offset` is where they start in the
/// stream; `skip=true` allows starting past the end of the stream (the bytes between are
/// dropped), once its first half is complete. Answers the stream's new length.
#[post("/tasks/<id>/output?<stream>&<offset>&<skip>", data = "<data>")]
#[allow(clippy::too_many_arguments)]
async fn upload(
    _auth: AgentAuth,
    lease: LeaseHeader,
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    id: &str,
    stream: &str,
    offset: &str,
    skip: Option<bool>,
    limits: &Limits,
    data: Data<'_>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(id)?;
    let stream: Stream = stream.parse()?;
    let offset = parse_offset(offset)?;
    let bytes = read_within(data, limits.get("output").unwrap_or(64.kibibytes())).await?;
    if bytes.is_empty() {
        return Err(ApiError::Invalid("a chunk must hold at least one byte".into()));
    }
    let chunk = Chunk { stream, offset, data: &bytes, skip: skip.unwrap_or(false) };
    match store::append(db, id, lease.0, chunk, i64::from(config.max_output_bytes)).await? {
        Appended::Stored { next } => {
            dispatcher.events().wake(id, Woken::Output);
            Ok(Json(json!({ "next_offset": next })))
        }
        Appended::Gap { expected } => Err(ApiError::OffsetGap { expected_offset: expected }),
        Appended::NotCurrent => Err(ApiError::Conflict(format!(
            "task {id} is not running under this lease: another attempt owns it, or it ended"
        ))),
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
            .header(Header::new("Taskexec-Next-Offset", read.next.to_string()))
            .header(Header::new("Taskexec-Dropped", read.dropped.to_string()))
            .header(Header::new("Taskexec-Total", read.total.to_string()))
            .header(Header::new("Taskexec-Ended", read.ended.to_string()))
            .sized_body(read.data.len(), Cursor::new(read.data))
            .ok()
    }
}

/// The bytes of `stream` from `offset` (default 0), with where to read next and whether the
/// task has ended. When there is nothing new yet and the task is still running, waits up to
/// `wait` seconds for more.
#[get("/tasks/<id>/output?<stream>&<offset>&<wait>")]
async fn read(
    db: &Db,
    config: &State<AppConfig>,
    dispatcher: &State<Dispatcher>,
    id: &str,
    stream: Option<&str>,
    offset: Option<&str>,
    wait: Option<&str>,
    mut shutdown: Shutdown,
) -> Result<OutputRead, ApiError> {
    let id = parse_id(id)?;
    let stream: Stream = stream.unwrap_or("stdout").parse()?;
    let offset = offset.map(parse_offset).transpose()?.unwrap_or(0);
    let wait = Duration::from_secs(parse_wait(wait, 0, config.pick_wait_max_secs)?);
    let look = || async {
        let read = store::read(db, id, stream, offset, MAX_READ)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no task with id {id}")))?;
        let news = !read.data.is_empty() || read.dropped > 0 || read.ended;
        Ok((read, news))
    };
    let events = dispatcher.events();
    let deadline = Instant::now() + wait;
    let read = events.poll(id, Woken::Output, deadline, RECHECK, &mut shutdown, look).await?;
    Ok(OutputRead(read))
}

/// The largest offset accepted: 2^53 bytes (9 PB), far beyond any output, small enough that
/// no offset arithmetic can overflow and every offset is exact in JSON numbers.
const MAX_OFFSET: i64 = 1 << 53;

fn parse_offset(text: &str) -> Result<i64, ApiError> {
    text.parse().ok().filter(|o| (0..=MAX_OFFSET).contains(o)).ok_or_else(|| {
        ApiError::BadRequest(format!("`offset` must be a byte offset from 0 to {MAX_OFFSET}"))
    })
}

/// stdout and stderr combined, in the order the agent sent them, as `text/plain`. With
/// `follow=true` the response goes on (chunked) until the task ends, like `tail -f`. Bytes
/// that were dropped (a flood) are replaced by a line that says how many.
#[get("/tasks/<id>/log?<follow>")]
async fn log(
    db: &Db,
    dispatcher: &State<Dispatcher>,
    id: &str,
    follow: Option<bool>,
    shutdown: Shutdown,
) -> Result<(ContentType, ByteStream![Vec<u8>]), ApiError> {
    let id = parse_id(id)?;
    store::log(db, id, i64::MAX)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no task with id {id}")))?;
    let (pool, events) = (db.pool().clone(), dispatcher.events().clone());
    let follow = follow.unwrap_or(false);
    let stream = ByteStream! {
        let mut shutdown = shutdown;
        let (mut after, mut next_stdout, mut next_stderr) = (0i64, 0i64, 0i64);
        let mut last_sent = Instant::now();
        loop {
            let watch = events.watch(id);
            let Ok(Some((chunks, ended))) = store::log(&pool, id, after).await else { break };
            if chunks.is_empty() {
                if ended || !follow || last_sent.elapsed() >= FOLLOW_IDLE {
                    break;
                }
                tokio::select! {
                    _ = watch.next(Woken::Output) => {}
                    _ = tokio::time::sleep(FOLLOW_RECHECK) => {}
                    _ = &mut shutdown => break,
                }
                continue;
            }
            last_sent = Instant::now();
            for chunk in chunks {
                after = chunk.seq;
                let seen = if chunk.stream == Stream::Stdout { next_stdout } else { next_stderr };
                if chunk.start == 0 && seen > 0 {
                    // A new attempt (the task was requeued) starts its streams again.
                    yield b"\n[taskexec: the task started again]\n".to_vec();
                    next_stdout = 0;
                    next_stderr = 0;
                }
                let next = match chunk.stream {
                    Stream::Stdout => &mut next_stdout,
                    Stream::Stderr => &mut next_stderr,
                };
                if chunk.start > *next {
                    let marker = format!(
                        "\n[taskexec: {} bytes of {} dropped here]\n",
                        chunk.start - *next,
                        chunk.stream.as_str()
                    );
                    yield marker.into_bytes();
                }
                *next = chunk.start + chunk.data.len() as i64;
                yield chunk.data;
            }
        }
    };
    // Plain text, but no charset: the bytes are the command's, UTF-8 or not.
    Ok((ContentType::new("text", "plain"), stream))
}
