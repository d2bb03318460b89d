//! The SQL of live output. Each stream of a task keeps its first half (offsets below
//! `max_output_bytes / 2`) and a window of its latest bytes; the chunks in between are
//! deleted as the window moves. Offsets are absolute, so a reader knows what it missed.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;
use crate::tasks::model::TaskStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, Serialize, Deserialize)]
#[sqlx(type_name = "output_stream", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl FromStr for Stream {
    type Err = ApiError;

    fn from_str(s: &str) -> Result<Stream, ApiError> {
        match s {
            "stdout" => Ok(Stream::Stdout),
            "stderr" => Ok(Stream::Stderr),
            _ => Err(ApiError::BadRequest(format!("`stream` must be stdout or stderr, not {s:?}"))),
        }
    }
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// What became of an uploaded chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored (or already stored: a retry); the stream now ends at `next`.
    Stored { next: i64 },
    /// The chunk starts past the end of the stream without saying it skips: resend from
    /// `expected`.
    Gap { expected: i64 },
    /// The lease is not the current one, or the task is not running.
    NotCurrent,
}

/// A chunk from the agent: `data` starts at `offset` of `stream`. With `skip`, the bytes
/// between the stream's end and `offset` are dropped (a flood the agent did not send); only
/// allowed once the first half is complete.
pub struct Chunk<'a> {
    pub stream: Stream,
    pub offset: i64,
    pub data: &'a [u8],
    pub skip: bool,
}

/// Appends a chunk, idempotently by offset, fenced by the lease. One short transaction: the
/// task row is locked so that the stream's length and its chunks move together.
pub async fn append(
    pool: &PgPool,
    id: Uuid,
    lease: Uuid,
    chunk: Chunk<'_>,
    max_output_bytes: i64,
) -> sqlx::Result<Appended> {
    let head_limit = max_output_bytes / 2;
    let tail_limit = max_output_bytes - head_limit;
    let mut tx = pool.begin().await?;
    let total: Option<i64> = sqlx::query_scalar(match chunk.stream {
        Stream::Stdout => "SELECT stdout_bytes FROM tasks WHERE id = $1 AND lease = $2 AND status = 'in_progress' FOR UPDATE",
        Stream::Stderr => "SELECT stderr_bytes FROM tasks WHERE id = $1 AND lease = $2 AND status = 'in_progress' FOR UPDATE",
    })
    .bind(id)
    .bind(lease)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(total) = total else { return Ok(Appended::NotCurrent) };
    let end = chunk.offset + chunk.data.len() as i64;
    if end <= total {
        return Ok(Appended::Stored { next: total });
    }
    if chunk.offset > total && !(chunk.skip && total >= head_limit) {
        return Ok(Appended::Gap { expected: total });
    }
    // What is new: past what is stored (a retry may overlap it).
    let start = chunk.offset.max(total);
    let data = &chunk.data[(start - chunk.offset) as usize..];
    // The part that completes the first half is kept for good; the rest joins the window.
    let head_len = (head_limit - start).clamp(0, data.len() as i64) as usize;
    for (at, part) in [(start, &data[..head_len]), (start + head_len as i64, &data[head_len..])] {
        if !part.is_empty() {
            // A chunk left by an earlier attempt (uploaded as the reaper requeued it) is replaced.
            sqlx::query(
                "INSERT INTO task_output (task_id, stream, start, data) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (task_id, stream, start) DO UPDATE SET data = EXCLUDED.data",
            )
            .bind(id)
            .bind(chunk.stream)
            .bind(at)
            .bind(part)
            .execute(&mut *tx)
            .await?;
        }
    }
    sqlx::query(
        "DELETE FROM task_output
          WHERE task_id = $1 AND stream = $2 AND start >= $3
            AND start + length(data) <= $4",
    )
    .bind(id)
    .bind(chunk.stream)
    .bind(head_limit)
    .bind(end - tail_limit)
    .execute(&mut *tx)
    .await?;
    sqlx::query(match chunk.stream {
        Stream::Stdout => "UPDATE tasks SET stdout_bytes = $2 WHERE id = $1",
        Stream::Stderr => "UPDATE tasks SET stderr_bytes = $2 WHERE id = $1",
    })
    .bind(id)
    .bind(end)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Appended::Stored { next: end })
}

/// Bytes of a stream from an offset.
#[derive(Debug)]
pub struct Read {
    pub data: Vec<u8>,
    /// Where the next read starts.
    pub next: i64,
    /// Bytes between the requested offset and the first byte returned that are not kept.
    pub dropped: i64,
    /// The stream's length so far.
    pub total: i64,
    /// The task has ended and `next` is the end of the stream: nothing more will come.
    pub ended: bool,
}

/// Up to `max` bytes of `stream` from `offset`. `None` when the task does not exist.
pub async fn read(
    pool: &PgPool,
    id: Uuid,
    stream: Stream,
    offset: i64,
    max: usize,
) -> sqlx::Result<Option<Read>> {
    let task: Option<(TaskStatus, i64)> = sqlx::query_as(match stream {
        Stream::Stdout => "SELECT status, stdout_bytes FROM tasks WHERE id = $1",
        Stream::Stderr => "SELECT status, stderr_bytes FROM tasks WHERE id = $1",
    })
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some((status, total)) = task else { return Ok(None) };
    let chunks: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT start, data FROM task_output
          WHERE task_id = $1 AND stream = $2 AND start + length(data) > $3 AND start < $4
          ORDER BY start LIMIT 8",
    )
    .bind(id)
    .bind(stream)
    .bind(offset)
    .bind(total)
    .fetch_all(pool)
    .await?;
    let (mut cursor, mut data, mut dropped) = (offset.min(total), Vec::new(), 0);
    for (at, bytes) in chunks {
        if at + (bytes.len() as i64) <= cursor {
            continue; // overlaps what was already taken (a window edge)
        }
        if at > cursor {
            if !data.is_empty() {
                break; // the next read reports the drop
            }
            dropped += at - cursor;
            cursor = at;
        }
        let from = (cursor - at) as usize;
        let take = (bytes.len() - from).min(max - data.len());
        data.extend_from_slice(&bytes[from..from + take]);
        cursor += take as i64;
        if data.len() >= max {
            break;
        }
    }
    let terminal = !matches!(status, TaskStatus::Queued | TaskStatus::InProgress);
    Ok(Some(Read { data, next: cursor, dropped, total, ended: terminal && cursor >= total }))
}

/// A chunk of either stream, in arrival order.
#[derive(Debug, sqlx::FromRow)]
pub struct LogChunk {
    pub seq: i64,
    pub stream: Stream,
    /// The offset of the chunk's first byte in its stream.
    pub start: i64,
    pub data: Vec<u8>,
}

/// Chunks of both streams that arrived after `after` (a `seq`), oldest first, and whether the
/// task has ended (read before the chunks, so that none that arrive before the end are missed).
pub async fn log(
    pool: &PgPool,
    id: Uuid,
    after: i64,
) -> sqlx::Result<Option<(Vec<LogChunk>, bool)>> {
    let status: Option<TaskStatus> = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    let Some(status) = status else { return Ok(None) };
    let chunks = sqlx::query_as(
        "SELECT seq, stream, start, data FROM task_output
          WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT 16",
    )
    .bind(id)
    .bind(after)
    .fetch_all(pool)
    .await?;
    Ok(Some((chunks, !matches!(status, TaskStatus::Queued | TaskStatus::InProgress))))
}
