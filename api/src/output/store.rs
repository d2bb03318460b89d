//! The SQL of live output. Each stream of a task keeps its first half (offsets below
//! `max_output_bytes / 2`) and a window of its latest bytes; the chunks in between are
//! deleted as the window moves. Offsets are absolute, so a reader knows what it missed.

use sqlx::PgPool;
use taskexec_protocol::output::OutputText;
use taskexec_protocol::{LeaseToken, OutputCap, Stream, TaskId, TaskStatus};

use crate::db::{DbError, Op};
use crate::tasks::lease::Lease;

/// What became of an uploaded chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored (or already stored: a retry); the stream now ends at `next`.
    Stored { next: u64 },
    /// The chunk starts past the end of the stream without saying it skips: resend from
    /// `expected`.
    Gap { expected: u64 },
    /// The lease is not the current one, or the task is not running.
    NotCurrent,
}

/// A chunk from the agent: `data` starts at `offset` of `stream`. With `skip`, the bytes
/// between the stream's end and `offset` are dropped (a flood the agent did not send); only
/// allowed once the first half is complete.
pub struct Chunk<'a> {
    pub stream: Stream,
    pub offset: u64,
    pub data: &'a [u8],
    pub skip: bool,
}

/// The cap of an attempt: the one its pick's terms gave the agent, or `default` (the server's
/// setting) for an attempt picked before the cap was recorded.
fn attempt_cap(recorded: Option<i32>, default: OutputCap) -> OutputCap {
    recorded.map_or(default, |cap| OutputCap::new(cap as usize))
}

/// Appends a chunk under `lease`, idempotently by offset, keeping the stream by the attempt's
/// cap. One short transaction: the task row is locked so that the stream's length and its
/// chunks move together.
pub async fn append(
    pool: &PgPool,
    lease: &Lease,
    chunk: Chunk<'_>,
    default_cap: OutputCap,
) -> Result<Appended, DbError> {
    const OP: &str = "append output";
    let mut tx = pool.begin().await.op(OP)?;
    let row = sqlx::query!(
        r#"SELECT CASE $3::output_stream WHEN 'stdout' THEN stdout_bytes ELSE stderr_bytes END
                  AS "total!", output_cap
             FROM tasks WHERE id = $1 AND lease = $2 AND status = 'in_progress' FOR UPDATE"#,
        lease.task as TaskId,
        lease.token as LeaseToken,
        chunk.stream as Stream,
    )
    .fetch_optional(&mut *tx)
    .await
    .op(OP)?;
    let Some(row) = row else { return Ok(Appended::NotCurrent) };
    let (total, cap) = (row.total, attempt_cap(row.output_cap, default_cap));
    let (head_limit, tail_limit) = (cap.head_limit() as i64, cap.tail_limit() as i64);
    let offset = chunk.offset as i64;
    let end = offset + chunk.data.len() as i64;
    if end <= total {
        return Ok(Appended::Stored { next: total as u64 });
    }
    if offset > total && !(chunk.skip && total >= head_limit) {
        return Ok(Appended::Gap { expected: total as u64 });
    }
    // What is new: past what is stored (a retry may overlap it).
    let start = offset.max(total);
    let data = &chunk.data[(start - offset) as usize..];
    // The part that completes the first half is kept for good; the rest joins the window.
    let head_len = (head_limit - start).clamp(0, data.len() as i64) as usize;
    for (at, part) in [(start, &data[..head_len]), (start + head_len as i64, &data[head_len..])] {
        if !part.is_empty() {
            // A chunk left by an earlier attempt (uploaded as the reaper requeued it) is replaced.
            sqlx::query!(
                "INSERT INTO task_output (task_id, stream, start, data) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (task_id, stream, start) DO UPDATE SET data = EXCLUDED.data",
                lease.task as TaskId,
                chunk.stream as Stream,
                at,
                part,
            )
            .execute(&mut *tx)
            .await
            .op(OP)?;
        }
    }
    sqlx::query!(
        "DELETE FROM task_output
          WHERE task_id = $1 AND stream = $2 AND start >= $3 AND start + length(data) <= $4",
        lease.task as TaskId,
        chunk.stream as Stream,
        head_limit,
        end - tail_limit,
    )
    .execute(&mut *tx)
    .await
    .op(OP)?;
    sqlx::query!(
        "UPDATE tasks
            SET stdout_bytes = CASE WHEN $2::output_stream = 'stdout' THEN $3 ELSE stdout_bytes END,
                stderr_bytes = CASE WHEN $2::output_stream = 'stderr' THEN $3 ELSE stderr_bytes END
          WHERE id = $1",
        lease.task as TaskId,
        chunk.stream as Stream,
        end,
    )
    .execute(&mut *tx)
    .await
    .op(OP)?;
    tx.commit().await.op(OP)?;
    Ok(Appended::Stored { next: end as u64 })
}

/// Bytes of a stream from an offset.
#[derive(Debug)]
pub struct Read {
    pub data: Vec<u8>,
    /// Where the next read starts.
    pub next: u64,
    /// Bytes between the requested offset and the first byte returned that are not kept.
    pub dropped: u64,
    /// The stream's length so far.
    pub total: u64,
    /// The task has ended and `next` is the end of the stream: nothing more will come.
    pub ended: bool,
}

/// Up to `max` bytes of `stream` from `offset`. `None` when the task does not exist or is not
/// in `scope` (an owner, for a submitter).
pub async fn read(
    pool: &PgPool,
    id: TaskId,
    scope: Option<&str>,
    stream: Stream,
    offset: u64,
    max: usize,
) -> Result<Option<Read>, DbError> {
    let task = sqlx::query!(
        r#"SELECT status AS "status: TaskStatus",
                  CASE $2::output_stream WHEN 'stdout' THEN stdout_bytes ELSE stderr_bytes END
                      AS "total!"
             FROM tasks WHERE id = $1 AND ($3::text IS NULL OR owner = $3)"#,
        id as TaskId,
        stream as Stream,
        scope,
    )
    .fetch_optional(pool)
    .await
    .op("read a stream's length")?;
    let Some(task) = task else { return Ok(None) };
    let total = task.total as u64;
    let chunks = sqlx::query!(
        "SELECT start, data FROM task_output
          WHERE task_id = $1 AND stream = $2 AND start + length(data) > $3 AND start < $4
          ORDER BY start LIMIT 8",
        id as TaskId,
        stream as Stream,
        offset as i64,
        total as i64,
    )
    .fetch_all(pool)
    .await
    .op("read output")?;
    let (mut cursor, mut data, mut dropped) = (offset.min(total), Vec::new(), 0);
    for chunk in chunks {
        let (at, bytes) = (chunk.start as u64, chunk.data);
        if at + (bytes.len() as u64) <= cursor {
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
        cursor += take as u64;
        if data.len() >= max {
            break;
        }
    }
    let ended = task.status.is_terminal() && cursor >= total;
    Ok(Some(Read { data, next: cursor, dropped, total, ended }))
}

/// What an attempt has uploaded, as a finish needs it: each stream's length, the cap the
/// attempt is kept by, and each stream's chunks up to the length the finish states.
#[derive(Debug)]
pub struct Uploads {
    pub lengths: [u64; 2],
    pub cap: OutputCap,
    chunks: [Vec<(u64, Vec<u8>)>; 2],
}

/// The uploads of the attempt `lease` holds, with each stream's chunks below `stated` (the
/// lengths its finish states), in one statement; `None` when the attempt is not the current,
/// running one.
pub async fn uploads(
    pool: &PgPool,
    lease: &Lease,
    stated: [u64; 2],
    default_cap: OutputCap,
) -> Result<Option<Uploads>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT t.stdout_bytes, t.stderr_bytes, t.output_cap,
                  o.stream AS "stream?: Stream", o.start AS "start?", o.data AS "data?"
             FROM tasks t
             LEFT JOIN task_output o
                    ON o.task_id = t.id
                   AND o.start < CASE o.stream WHEN 'stdout' THEN $3::bigint ELSE $4::bigint END
            WHERE t.id = $1 AND t.lease = $2 AND t.status = 'in_progress'
            ORDER BY o.start"#,
        lease.task as TaskId,
        lease.token as LeaseToken,
        i64::try_from(stated[0]).unwrap_or(i64::MAX),
        i64::try_from(stated[1]).unwrap_or(i64::MAX),
    )
    .fetch_all(pool)
    .await
    .op("read an attempt's uploads")?;
    let Some(first) = rows.first() else { return Ok(None) };
    let mut uploads = Uploads {
        lengths: [first.stdout_bytes, first.stderr_bytes].map(|n| n.max(0) as u64),
        cap: attempt_cap(first.output_cap, default_cap),
        chunks: [Vec::new(), Vec::new()],
    };
    for row in rows {
        if let (Some(stream), Some(start), Some(data)) = (row.stream, row.start, row.data) {
            uploads.chunks[stream.index()].push((start as u64, data));
        }
    }
    Ok(Some(uploads))
}

impl Uploads {
    /// The text of `stream` as uploaded, `length` bytes long (at most what was read): its first
    /// half and its last bytes, by the cap's rule, as the agent's buffers keep them. Bytes of
    /// the last half that the agent skipped (its uploads stopped partway through a flood) count
    /// as dropped, as `/output` reports them. `None` when the stream does not reach `length`,
    /// or its first half has a gap (an upload may skip only past the first half).
    pub fn text(&self, stream: Stream, length: u64) -> Option<OutputText> {
        let cap = self.cap;
        let head_end = length.min(cap.head_limit() as u64);
        let tail_start = length.saturating_sub(cap.tail_limit() as u64).max(head_end);
        let mut head = Vec::new();
        // The present bytes of [tail_start, length) that run without a gap to the last one.
        let (mut tail, mut tail_from) = (Vec::new(), tail_start);
        for (start, data) in &self.chunks[stream.index()] {
            let (start, end) = (*start, *start + data.len() as u64);
            let (lo, hi) = (start.max(head.len() as u64), end.min(head_end));
            if lo < hi {
                if lo != head.len() as u64 {
                    return None;
                }
                head.extend_from_slice(&data[(lo - start) as usize..(hi - start) as usize]);
            }
            let (lo, hi) = (start.max(tail_start), end.min(length));
            if lo < hi {
                let tail_end = tail_from + tail.len() as u64;
                if lo > tail_end {
                    (tail, tail_from) = (Vec::new(), lo);
                }
                let lo = lo.max(tail_from + tail.len() as u64);
                if lo < hi {
                    tail.extend_from_slice(&data[(lo - start) as usize..(hi - start) as usize]);
                }
            }
        }
        let reaches = if length > head_end { tail_from + tail.len() as u64 } else { head_end };
        if head.len() as u64 != head_end || reaches != length {
            return None;
        }
        Some(cap.text(&head, &tail, tail_from - head_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uploads(chunks: &[(u64, &[u8])]) -> Uploads {
        let total = chunks.iter().map(|(at, data)| at + data.len() as u64).max().unwrap_or(0);
        Uploads {
            lengths: [total, 0],
            cap: OutputCap::new(10),
            chunks: [chunks.iter().map(|(at, data)| (*at, data.to_vec())).collect(), Vec::new()],
        }
    }

    #[test]
    fn the_text_of_the_uploads_follows_the_cap_rule() {
        let whole = uploads(&[(0, b"01234"), (5, b"567")]);
        assert_eq!(whole.text(Stream::Stdout, 8).unwrap().text, "01234567");
        // A flood: the head, then the window of the last five bytes.
        let flood = uploads(&[(0, b"01234"), (12, b"cdefghij")]);
        let text = flood.text(Stream::Stdout, 20).unwrap();
        assert_eq!(text.text, "01234\n[taskexec: 10 bytes of output dropped here]\nfghij");
        assert!(text.truncated);
    }

    #[test]
    fn bytes_the_agent_skipped_in_the_last_half_count_as_dropped() {
        // The window whole, in two chunks; then with a gap the agent skipped.
        let partial = uploads(&[(0, b"01234"), (15, b"fgh"), (18, b"ij")]);
        let text = partial.text(Stream::Stdout, 20).unwrap().text;
        assert_eq!(text, "01234\n[taskexec: 10 bytes of output dropped here]\nfghij");
        let gapped = uploads(&[(0, b"01234"), (15, b"fg"), (18, b"ij")]);
        let text = gapped.text(Stream::Stdout, 20).unwrap().text;
        assert!(text.starts_with("01234\n[taskexec: 13 bytes") && text.ends_with("ij"), "{text}");
    }

    #[test]
    fn a_gap_in_the_first_half_or_a_short_stream_has_no_text() {
        assert_eq!(uploads(&[(0, b"01"), (3, b"34")]).text(Stream::Stdout, 5), None);
        assert_eq!(uploads(&[(0, b"0123")]).text(Stream::Stdout, 5), None);
    }
}

/// A chunk of either stream, in arrival order.
#[derive(Debug)]
pub struct LogChunk {
    pub seq: i64,
    pub stream: Stream,
    /// The offset of the chunk's first byte in its stream.
    pub start: u64,
    pub data: Vec<u8>,
}

/// How a task stands, for the end of its log.
#[derive(Debug, Clone)]
pub struct Standing {
    pub status: TaskStatus,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
}

/// The most chunks one read of the log returns.
pub const LOG_CHUNKS: usize = 16;

/// Chunks of both streams that arrived after `after` (a `seq`), oldest first (at most
/// `LOG_CHUNKS`), and how the
/// task stands (read before the chunks, so that none that arrive before its end are missed).
/// `None` when the task does not exist or is not in `scope`.
pub async fn log(
    pool: &PgPool,
    id: TaskId,
    scope: Option<&str>,
    after: i64,
) -> Result<Option<(Vec<LogChunk>, Standing)>, DbError> {
    let standing = sqlx::query_as!(
        Standing,
        r#"SELECT status AS "status: TaskStatus", exit_code, error FROM tasks
            WHERE id = $1 AND ($2::text IS NULL OR owner = $2)"#,
        id as TaskId,
        scope,
    )
    .fetch_optional(pool)
    .await
    .op("read a task's standing")?;
    let Some(standing) = standing else { return Ok(None) };
    let chunks = sqlx::query!(
        r#"SELECT seq, stream AS "stream: Stream", start, data FROM task_output
            WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"#,
        id as TaskId,
        after,
        LOG_CHUNKS as i64,
    )
    .fetch_all(pool)
    .await
    .op("read a task's log")?;
    let chunks = chunks
        .into_iter()
        .map(|c| LogChunk { seq: c.seq, stream: c.stream, start: c.start as u64, data: c.data })
        .collect();
    Ok(Some((chunks, standing)))
}
