//! Live output: what the command prints is uploaded while it runs, in chunks of at most 64 KiB
//! at absolute offsets, at least every `TICK` when there is something new. The first half of
//! each stream goes up as fast as it comes; past it (a flood), each stream sends one chunk per
//! `PACE`, skipping what the ring has already dropped, and the rest at the end. The server
//! keeps each stream by the same rule as the agent's buffers, so they agree on offsets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::client::{Assignment, Client, ClientError};
use crate::exec::Captured;

/// The largest chunk (the server's `output` limit).
const CHUNK: usize = 64 * 1024;
/// How often the uploader looks for new output.
pub const TICK: Duration = Duration::from_millis(250);
/// Past a stream's first half, at most one chunk of it per this long while the command runs.
const PACE: Duration = Duration::from_millis(500);

pub struct Streamer {
    client: Arc<Client>,
    id: Uuid,
    lease: Uuid,
    uploads: [Upload; 2],
    /// The server refused an upload for good (another attempt owns the task): stop trying.
    gone: bool,
}

struct Upload {
    name: &'static str,
    buffer: Arc<Mutex<Captured>>,
    /// Where the server's copy of the stream ends.
    sent: u64,
    last_paced: Option<Instant>,
}

impl Streamer {
    pub fn new(
        client: Arc<Client>,
        assignment: &Assignment,
        buffers: [Arc<Mutex<Captured>>; 2],
    ) -> Streamer {
        let [stdout, stderr] = buffers;
        let upload = |name, buffer| Upload { name, buffer, sent: 0, last_paced: None };
        Streamer {
            client,
            id: assignment.id,
            lease: assignment.lease,
            uploads: [upload("stdout", stdout), upload("stderr", stderr)],
            gone: false,
        }
    }

    /// Uploads what is due: everything with `flush`, else all of the first halves and one
    /// chunk per stream per `PACE` beyond them. The stream whose oldest unsent byte is older
    /// goes first, so that the combined log keeps the order of the output.
    ///
    /// # Errors
    /// A retryable error (the API is unreachable); what was sent stays sent.
    pub fn send_due(&mut self, flush: bool) -> Result<(), ClientError> {
        let mut order = [0, 1];
        order.sort_by_key(|&i| lock(&self.uploads[i].buffer).pending_since);
        for i in order {
            while !self.gone {
                let upload = &mut self.uploads[i];
                let next = {
                    let mut buffer = lock(&upload.buffer);
                    let next = buffer.from_offset(upload.sent, CHUNK);
                    if next.is_none() {
                        buffer.pending_since = None;
                    }
                    next.map(|(start, bytes)| (start, bytes, buffer.in_head(start)))
                };
                let Some((start, bytes, in_head)) = next else { break };
                if !flush && !in_head {
                    if upload.last_paced.is_some_and(|at| at.elapsed() < PACE) {
                        break;
                    }
                    upload.last_paced = Some(Instant::now());
                }
                let skip = start > upload.sent;
                match self.client.upload(self.id, self.lease, upload.name, start, skip, &bytes) {
                    Ok(end) => upload.sent = end,
                    Err(ClientError::OffsetGap { expected }) => upload.sent = expected,
                    Err(e) if e.is_retryable() => return Err(e),
                    Err(e) => {
                        log::warn!("task {}: output no longer uploaded: {e}", self.id);
                        self.gone = true;
                    }
                }
                if !flush && !in_head {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Starts again from where the server says its copies end.
    pub fn rewind(&mut self, stdout: u64, stderr: u64) {
        self.uploads[0].sent = stdout;
        self.uploads[1].sent = stderr;
    }

    /// Uploads in the background every `TICK` until `running` is cleared; returns the
    /// streamer for the final flush.
    pub fn spawn(mut self, running: Arc<AtomicBool>) -> thread::JoinHandle<Streamer> {
        thread::spawn(move || {
            while running.load(Ordering::Acquire) {
                if let Err(e) = self.send_due(false) {
                    log::warn!("task {}: output upload failed, will retry: {e}", self.id);
                }
                thread::sleep(TICK);
            }
            self
        })
    }
}

fn lock(buffer: &Mutex<Captured>) -> std::sync::MutexGuard<'_, Captured> {
    buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
