//! A command's output as it is read: each stream into a buffer bounded by the output cap (its
//! first half and a ring of its latest bytes, as the server keeps it), and the order in which
//! the two streams were written, for the combined log.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Instant;

use taskexec_protocol::output::OutputText;
use taskexec_protocol::{OutputCap, Stream};

/// Reads `stream` of a command to its end on a thread, into a buffer bounded by `cap`, noting in
/// `runs` where it takes over from the other stream.
pub fn capture(
    mut pipe: os_pipe::PipeReader,
    cap: OutputCap,
    stream: Stream,
    runs: Arc<Mutex<Runs>>,
) -> Capture {
    let buffer = Arc::new(Mutex::new(Captured::new(cap)));
    let (closed, done) = mpsc::channel();
    let sink = buffer.clone();
    thread::spawn(move || {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let mut buffer = lock(&sink);
                    // The run is noted before its bytes are visible, so that an uploader that
                    // sees the bytes also sees where they start.
                    lock_runs(&runs).note(stream, buffer.total());
                    buffer.push(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = closed.send(());
    });
    Capture { buffer, done }
}

/// The order in which the two streams were read: a run begins wherever one stream follows
/// the other, at that stream's offset. The combined log is uploaded run by run.
#[derive(Debug, Default)]
pub struct Runs {
    last: Option<Stream>,
    runs: VecDeque<(Stream, u64)>,
}

/// Runs kept at most: a command that alternates its streams faster than they are uploaded loses
/// only the order of its oldest runs.
const MAX_RUNS: usize = 4096;

impl Runs {
    fn note(&mut self, stream: Stream, offset: u64) {
        if self.last != Some(stream) {
            self.last = Some(stream);
            if self.runs.len() == MAX_RUNS {
                self.runs.pop_front();
            }
            self.runs.push_back((stream, offset));
        }
    }

    /// The oldest run not yet uploaded: its stream, and where the same stream's next run
    /// starts (its end), if it has one yet.
    pub fn front(&self) -> Option<(Stream, Option<u64>)> {
        let &(stream, _) = self.runs.front()?;
        let end = self.runs.iter().skip(1).find(|(s, _)| *s == stream).map(|&(_, at)| at);
        Some((stream, end))
    }

    /// Done with the oldest run, if another follows it.
    pub fn advance(&mut self) -> bool {
        if self.runs.len() > 1 {
            self.runs.pop_front();
            true
        } else {
            false
        }
    }
}

pub fn lock_runs(runs: &Mutex<Runs>) -> std::sync::MutexGuard<'_, Runs> {
    runs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A stream being read: what has been read so far, and a signal when the pipe has closed.
pub struct Capture {
    buffer: Arc<Mutex<Captured>>,
    done: mpsc::Receiver<()>,
}

impl Capture {
    /// The live buffer, for the uploader.
    pub fn buffer(&self) -> Arc<Mutex<Captured>> {
        self.buffer.clone()
    }

    /// The output once the pipe has closed, or as it stands at `deadline` if a process outside
    /// the task still holds the pipe open (its later output is not captured).
    pub fn collect(self, deadline: Instant) -> Captured {
        let closed = self.done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        if closed.is_err() {
            log::warn!("a process outside the task still holds a stream open; its later output is not captured");
        }
        lock(&self.buffer).clone()
    }
}

pub fn lock(buffer: &Mutex<Captured>) -> std::sync::MutexGuard<'_, Captured> {
    buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A stream's output, bounded by the cap as the server keeps it: the first half, and a ring of
/// the latest bytes (the other half).
#[derive(Debug, Clone)]
pub struct Captured {
    cap: OutputCap,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    dropped: u64,
}

impl Captured {
    pub fn new(cap: OutputCap) -> Captured {
        Captured { cap, head: Vec::new(), tail: VecDeque::new(), dropped: 0 }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        let head_room = self.cap.head_limit().saturating_sub(self.head.len());
        let into_head = head_room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..into_head]);
        bytes = &bytes[into_head..];
        let tail_limit = self.cap.tail_limit();
        if bytes.len() >= tail_limit {
            let skip = bytes.len() - tail_limit;
            self.dropped += (self.tail.len() + skip) as u64;
            self.tail.clear();
            bytes = &bytes[skip..];
        }
        self.tail.extend(bytes);
        let excess = self.tail.len().saturating_sub(tail_limit);
        self.tail.drain(..excess);
        self.dropped += excess as u64;
    }

    /// Bytes the command wrote that are not kept.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes the command wrote, kept or not.
    pub fn total(&self) -> u64 {
        (self.head.len() + self.tail.len()) as u64 + self.dropped
    }

    /// The bytes from `offset` on, at most `max`, as far as they are still held: `(start,
    /// bytes)`, where a `start` past `offset` means the bytes between were dropped. `None`
    /// when there is nothing from `offset` on.
    pub fn read_from(&self, offset: u64, max: usize) -> Option<(u64, Vec<u8>)> {
        if offset >= self.total() {
            return None;
        }
        let head_len = self.head.len() as u64;
        if offset < head_len {
            let end = (offset + max as u64).min(head_len);
            return Some((offset, self.head[offset as usize..end as usize].to_vec()));
        }
        let tail_start = self.total() - self.tail.len() as u64;
        let start = offset.max(tail_start);
        let from = (start - tail_start) as usize;
        let len = (self.tail.len() - from).min(max);
        Some((start, self.tail.range(from..from + len).copied().collect()))
    }

    /// Whether `offset` lies in the first half (which is uploaded without pacing).
    pub fn in_head(&self, offset: u64) -> bool {
        offset < self.cap.head_limit() as u64
    }

    /// The output as the task's text, by the cap's rule (the server applies the same rule to
    /// the uploaded bytes and refuses a finish whose text differs).
    pub fn to_text(&self) -> OutputText {
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        self.cap.text(&self.head, &tail, self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_keeps_head_and_tail_and_is_read_back_by_offset() {
        let mut captured = Captured::new(OutputCap::new(10));
        for chunk in [&b"0123"[..], b"456789abcdef", b"ghij"] {
            captured.push(chunk);
        }
        assert_eq!(captured.dropped(), 10);
        assert_eq!(captured.total(), 20);
        let text = captured.to_text();
        assert_eq!(text.text, "01234\n[taskexec: 10 bytes of output dropped here]\nfghij");
        assert!(!text.lossy && text.truncated);
        // The uploader reads by offset: the head, then past the drop, the window.
        assert_eq!(captured.read_from(0, 3), Some((0, b"012".to_vec())));
        assert_eq!(captured.read_from(3, 99), Some((3, b"34".to_vec())));
        assert_eq!(captured.read_from(5, 99), Some((15, b"fghij".to_vec())));
        assert_eq!(captured.read_from(17, 99), Some((17, b"hij".to_vec())));
        assert_eq!(captured.read_from(20, 99), None);
    }

    #[test]
    fn a_character_cut_by_the_cap_is_not_reported_as_lossy() {
        let mut captured = Captured::new(OutputCap::new(8));
        captured.push("aaéé€€€€bbb".as_bytes());
        let text = captured.to_text();
        assert!(!text.lossy, "{}", text.text);
        assert!(text.text.starts_with("aa") && text.text.ends_with("bbb"), "{}", text.text);
    }
}
