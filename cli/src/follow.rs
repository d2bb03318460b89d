//! A task's output copied here by byte offset, raw, from `GET /tasks/<id>/output`: what `run`
//! and `logs` print. Each stream is copied by a thread of its own, long-polling its stream, so
//! that neither waits on the other and each reaches its own file descriptor as soon as the
//! agent has uploaded it, byte for byte.

use std::io::{ErrorKind, Write};
use std::time::Duration;

use taskexec_protocol::{Stream, TaskId};

use crate::client::{retrying, Client, OutputRead, LONG_POLL};
use crate::progress::Spinner;
use crate::Error;

/// How far to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Until the task has ended: waiting for output as it comes (`run`, `logs -f`).
    Ended,
    /// Until what the API has now has been copied (`logs`).
    CaughtUp,
}

/// How a copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// All of it, as far as [`Until`] asked.
    Whole,
    /// The reader of `out` has gone (`| head`): a local command would have died of SIGPIPE.
    ReaderGone,
}

/// Copies `stream` of task `id` to `out`, from its start. Notes about the copy (bytes the
/// output cap dropped, a new attempt starting the stream over) go to stderr, after clearing
/// `spinner`, which the first output clears too. A reader of `out` that has gone ends the copy,
/// for the caller to decide what that means.
///
/// # Errors
///
/// What the API answered, once retries of transient failures are spent; `Unexpected` when its
/// offsets do not add up; `Io` when `out` cannot be written.
pub fn copy(
    client: &Client,
    id: TaskId,
    stream: Stream,
    out: &mut dyn Write,
    until: Until,
    spinner: &Spinner,
) -> Result<Copied, Error> {
    let wait = match until {
        Until::Ended => LONG_POLL,
        Until::CaughtUp => Duration::ZERO,
    };
    let mut offset = 0;
    loop {
        let read = retrying(|| client.output(id, stream, offset, wait))?;
        if read.next_offset < offset {
            // The stream is shorter than what was read of it: the agent was lost, the task
            // was queued again, and a new attempt writes the stream from its start.
            note(spinner, &format!("task {id} started again; its {stream} follows anew"));
            offset = 0;
            continue;
        }
        check_offsets(offset, &read)?;
        if read.dropped > 0 {
            let dropped = read.dropped;
            note(spinner, &format!("{dropped} bytes of {stream} dropped here by the output cap"));
        }
        if !read.data.is_empty() {
            spinner.clear();
            match out.write_all(&read.data).and_then(|()| out.flush()) {
                Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(Copied::ReaderGone),
                Err(e) => return Err(Error::io(format!("write the task's {stream}"), e)),
                Ok(()) => {}
            }
        }
        let caught_up = read.data.is_empty() && read.dropped == 0;
        offset = read.next_offset;
        if read.ended || (until == Until::CaughtUp && caught_up) {
            return Ok(Copied::Whole);
        }
    }
}

/// A read from `offset` must end where its bytes do: past the bytes the cap dropped and those
/// it holds (the API's `next = offset + dropped + data.len()`). Anything else would have the
/// copy print the same bytes again, or skip some, for ever.
fn check_offsets(offset: u64, read: &OutputRead) -> Result<(), Error> {
    let expected =
        offset.checked_add(read.dropped).and_then(|at| at.checked_add(read.data.len() as u64));
    if expected == Some(read.next_offset) {
        return Ok(());
    }
    Err(Error::Unexpected(format!(
        "an output read from offset {offset} of {} bytes, {} dropped, says the next starts at {}",
        read.data.len(),
        read.dropped,
        read.next_offset
    )))
}

/// Where a stream goes when both are copied: each to its own.
pub fn own_sink(stream: Stream) -> Box<dyn Write + Send> {
    match stream {
        Stream::Stdout => Box::new(std::io::stdout()),
        Stream::Stderr => Box::new(std::io::stderr()),
    }
}

fn note(spinner: &Spinner, text: &str) {
    spinner.clear();
    eprintln!("taskexec: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(data: &[u8], dropped: u64, next_offset: u64) -> OutputRead {
        OutputRead { data: data.to_vec(), next_offset, dropped, ended: false }
    }

    #[test]
    fn the_next_offset_must_follow_the_dropped_bytes_and_the_data() {
        assert!(check_offsets(10, &read(b"abc", 0, 13)).is_ok());
        assert!(check_offsets(10, &read(b"abc", 5, 18)).is_ok());
        assert!(check_offsets(10, &read(b"", 0, 10)).is_ok(), "nothing new yet");
        assert!(check_offsets(10, &read(b"abc", 0, 10)).is_err(), "the same bytes again");
        assert!(check_offsets(10, &read(b"abc", 0, 20)).is_err(), "bytes skipped unsaid");
        assert!(check_offsets(10, &read(b"abc", u64::MAX, 0)).is_err());
    }
}
