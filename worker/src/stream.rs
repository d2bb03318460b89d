//! Live output: what the command prints is uploaded while it runs, in chunks of at most 64 KiB
//! at absolute offsets, at least every `TICK` when there is something new. Chunks follow the
//! order in which the two streams were read (their runs), so the combined log keeps it. The
//! first half of each stream goes up as fast as it comes; past it (a flood), at most `CHUNK`
//! bytes of each stream per `PACE`, in as many runs as they take (a command that interleaves
//! its streams makes a run of every line), skipping what the agent's ring has already dropped,
//! and the rest at the end. The
//! server keeps each stream by the same rule as the agent's buffers, so they agree on offsets.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use taskexec_protocol::Stream;

use crate::capture::{lock, lock_runs, Captured, Runs};
use crate::client::{Attempt, ClientError};

/// The largest chunk (the server's `output` limit, by default): halved on a 413.
const CHUNK: usize = 64 * 1024;
/// How often the uploader looks for new output.
pub const TICK: Duration = Duration::from_millis(250);
/// Past a stream's first half, at most `CHUNK` bytes of it per this long while the command runs.
const PACE: Duration = Duration::from_millis(500);
/// Past the first halves, at most this many uploads per look (a run of one line each, at worst).
const MAX_PACED_UPLOADS: usize = 32;
/// Answers that move nothing forward, in a row, before the uploads are given up.
const MAX_STALLS: u32 = 3;

pub struct Streamer {
    attempt: Attempt,
    buffers: [Arc<Mutex<Captured>>; 2],
    runs: Arc<Mutex<Runs>>,
    /// Where the server's copy of each stream ends.
    sent: [u64; 2],
    /// Past the first half: when the stream's current `PACE` window began, and the bytes
    /// uploaded in it.
    paced: [(Instant, usize); 2],
    chunk: usize,
    stalls: u32,
    /// The server refused the uploads for good: the finish then states no lengths.
    gone: bool,
}

impl Streamer {
    pub fn new(
        attempt: Attempt,
        (buffers, runs): ([Arc<Mutex<Captured>>; 2], Arc<Mutex<Runs>>),
    ) -> Streamer {
        Streamer {
            attempt,
            buffers,
            runs,
            sent: [0, 0],
            paced: [(Instant::now(), 0); 2],
            chunk: CHUNK,
            stalls: 0,
            gone: false,
        }
    }

    /// Uploads what is due, run by run: with `until` (the final flush), everything up to those
    /// lengths; else all of the first halves and `CHUNK` bytes per `PACE` beyond them.
    ///
    /// # Errors
    /// A retryable error (the API is unreachable); what was sent stays sent.
    pub fn send_due(&mut self, until: Option<[u64; 2]>) -> Result<(), ClientError> {
        let mut paced_uploads = 0;
        while !self.gone {
            let Some((stream, run_end)) = lock_runs(&self.runs).front() else { return Ok(()) };
            // Read the buffer before the runs again: a run is noted before its bytes show.
            let (total, in_head) = {
                let buffer = lock(&self.buffers[stream.index()]);
                (buffer.total(), buffer.in_head(self.sent[stream.index()]))
            };
            let run_end = run_end.or_else(|| lock_runs(&self.runs).front().and_then(|f| f.1));
            let mut end = run_end.unwrap_or(total).min(total);
            if let Some(until) = until {
                end = end.min(until[stream.index()]);
            }
            if self.sent[stream.index()] >= end {
                // Done with this run. If another follows, this stream's next bytes come with a
                // run of their own, so moving on loses nothing.
                if lock_runs(&self.runs).advance() {
                    continue;
                }
                return Ok(());
            }
            let paced = until.is_none() && !in_head;
            if paced {
                let (window, used) = &mut self.paced[stream.index()];
                if window.elapsed() >= PACE {
                    (*window, *used) = (Instant::now(), 0);
                }
                if *used >= CHUNK || paced_uploads >= MAX_PACED_UPLOADS {
                    return Ok(());
                }
            }
            let Some((start, mut bytes)) = lock(&self.buffers[stream.index()])
                .read_from(self.sent[stream.index()], self.chunk)
            else {
                return Ok(());
            };
            if start >= end {
                // The rest of this run was dropped (a flood): the next run says so by skipping.
                if lock_runs(&self.runs).advance() {
                    continue;
                }
                return Ok(());
            }
            bytes.truncate((end - start) as usize);
            self.upload(stream, start, &bytes)?;
            if paced {
                self.paced[stream.index()].1 += bytes.len();
                paced_uploads += 1;
            }
        }
        Ok(())
    }

    fn upload(&mut self, stream: Stream, start: u64, bytes: &[u8]) -> Result<(), ClientError> {
        let skip = start > self.sent[stream.index()];
        let before = self.sent[stream.index()];
        match self.attempt.upload(stream, start, skip, bytes) {
            Ok(end) => self.sent[stream.index()] = end,
            Err(ClientError::OffsetGap { expected }) => self.sent[stream.index()] = expected,
            Err(ClientError::Refused { status: 413, .. }) if self.chunk > 1024 => self.chunk /= 2,
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => self.give_up(&e),
        }
        self.stalls = if self.sent[stream.index()] > before { 0 } else { self.stalls + 1 };
        if self.stalls >= MAX_STALLS && !self.gone {
            self.give_up(&"the API takes no more of it");
        }
        Ok(())
    }

    fn give_up(&mut self, why: &dyn std::fmt::Display) {
        log::warn!("task {}: live output no longer uploaded: {why}", self.attempt.task);
        self.gone = true;
    }

    /// Whether the uploads went on to the end; once given up, the finish states what the
    /// server has (`sent`) and lets it make the text from that.
    pub fn uploaded(&self) -> bool {
        !self.gone
    }

    /// Where the server's copy of each stream ends, as far as this agent knows.
    pub fn sent(&self) -> [u64; 2] {
        self.sent
    }

    /// Starts again from where the server says its copies end.
    pub fn rewind(&mut self, stdout: u64, stderr: u64) {
        if self.sent == [stdout, stderr] && !self.gone {
            self.give_up(&"the finish and the uploads disagree on the lengths");
        }
        self.sent = [stdout, stderr];
    }

    /// Uploads in the background every `TICK` until the returned sender is dropped (which
    /// wakes it at once); the thread returns the streamer for the final flush.
    pub fn spawn(mut self) -> (mpsc::Sender<()>, thread::JoinHandle<Streamer>) {
        let (stop, stopped) = mpsc::channel::<()>();
        let uploader = thread::spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                if let Err(e) = self.send_due(None) {
                    log::warn!("task {}: output upload failed, will retry: {e}", self.attempt.task);
                }
            }
            self
        });
        (stop, uploader)
    }
}
