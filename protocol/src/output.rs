//! Live output, and the one rule by which output is capped on both sides.
//!
//! A command's two streams are uploaded by the agent while it runs, in chunks at absolute
//! byte offsets (`POST /tasks/<id>/output?stream=stdout&offset=N`, the lease in `X-Lease`),
//! and read back raw by offset (`GET /tasks/<id>/output`), with the position in the headers
//! named here.
//!
//! Each stream keeps at most `max_output_bytes`: its first half, and a window of its last
//! half. The agent's buffers, the server's chunks and the task's text all follow
//! [`OutputCap`], so that they agree on what was dropped, to the byte.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One of a command's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
#[cfg_attr(
    feature = "sqlx",
    derive(sqlx::Type),
    sqlx(type_name = "output_stream", rename_all = "lowercase")
)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    /// The name used in query parameters, JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// 0 for stdout, 1 for stderr: an index into a pair of per-stream values.
    pub fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stream {
    type Err = String;

    fn from_str(s: &str) -> Result<Stream, String> {
        Stream::ALL
            .into_iter()
            .find(|stream| stream.as_str() == s)
            .ok_or_else(|| format!("`stream` must be stdout or stderr, not {s:?}"))
    }
}

/// Header names of the agent and output endpoints.
pub mod headers {
    /// The lease of an upload (its body is the raw bytes).
    pub const LEASE: &str = "X-Lease";
    /// The agent's name, on every agent request.
    pub const AGENT_NAME: &str = "X-Agent-Name";
    /// The agent's version, on every agent request (shown by `GET /agents`).
    pub const AGENT_VERSION: &str = "X-Agent-Version";
    /// A UUID the agent draws at start, on every agent request: once it has left, the server
    /// takes no late sighting of that run of the agent for a sign of life.
    pub const AGENT_INSTANCE: &str = "X-Agent-Instance";
    /// A submit's idempotency key: the same key (per owner, for 24 hours) with the same body
    /// answers with the task it first created.
    pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
    /// Where the next read starts.
    pub const NEXT_OFFSET: &str = "Taskexec-Next-Offset";
    /// Bytes between the requested offset and the first byte returned that are not kept.
    pub const DROPPED: &str = "Taskexec-Dropped";
    /// The stream's length so far.
    pub const TOTAL: &str = "Taskexec-Total";
    /// `true` when the task has ended and nothing more will come.
    pub const ENDED: &str = "Taskexec-Ended";
}

/// The answer to an upload: where the server's copy of the stream now ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutputAck {
    pub next_offset: u64,
}

/// The cap on one stream's output: its first half and its last half are kept, the middle is
/// dropped and replaced in the text by a marker line that counts the dropped bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputCap {
    limit: usize,
}

/// A stream's output as the task's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputText {
    pub text: String,
    /// Bytes that were not UTF-8, or NUL bytes (which PostgreSQL text cannot hold), became
    /// U+FFFD.
    pub lossy: bool,
    /// Bytes of the stream are missing from the text (the marker says how many).
    pub truncated: bool,
}

/// Room for the marker line beyond the limit, when a text already within it is shrunk again.
const MARKER_ROOM: usize = 256;

impl OutputCap {
    /// A cap of `limit` bytes per stream.
    pub fn new(limit: usize) -> OutputCap {
        OutputCap { limit }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The first half: offsets below this are kept for good.
    pub fn head_limit(&self) -> usize {
        self.limit / 2
    }

    /// The last half: the window of the latest bytes.
    pub fn tail_limit(&self) -> usize {
        self.limit - self.limit / 2
    }

    /// The line that stands for `dropped` bytes in a capped text.
    pub fn marker(dropped: u64) -> String {
        format!("\n[taskexec: {dropped} bytes of output dropped here]\n")
    }

    /// The text of a stream whose first bytes are `head` and last bytes `tail`, with `dropped`
    /// bytes between them that are not kept. When the bytes are contiguous and their text
    /// fits the limit, the text is all of them; otherwise (too long, or too long once
    /// converted, each invalid byte becoming three) as many raw bytes of each end as fit half
    /// the limit as text, and a marker counting the rest exactly.
    pub fn text(&self, head: &[u8], tail: &[u8], dropped: u64) -> OutputText {
        let total = (head.len() + tail.len()) as u64 + dropped;
        let all: Vec<u8>;
        let (head_source, tail_source) = if dropped == 0 {
            all = [head, tail].concat();
            let (text, lossy) = lossy(&all);
            if text.len() <= self.limit {
                return OutputText { text, lossy, truncated: false };
            }
            (&all[..], &all[..])
        } else {
            (head, tail)
        };
        let head_len = longest_prefix(head_source, self.head_limit());
        let tail_len = longest_suffix(tail_source, self.tail_limit())
            .min(tail_source.len().saturating_sub(if dropped == 0 { head_len } else { 0 }));
        let (head_text, head_lossy) = lossy(trim_incomplete_end(&head_source[..head_len]));
        let (tail_text, tail_lossy) =
            lossy(trim_partial_start(&tail_source[tail_source.len() - tail_len..]));
        let dropped = total - head_len as u64 - tail_len as u64;
        OutputText {
            text: format!("{head_text}{}{tail_text}", OutputCap::marker(dropped)),
            lossy: head_lossy || tail_lossy,
            truncated: true,
        }
    }

    /// `text` cut to about the limit, on character boundaries: its first and last halves with
    /// a marker between them. A text within the limit plus room for a marker is kept whole,
    /// so a text capped once is not cut again. The second value says whether it was cut.
    pub fn shrink(&self, text: &str) -> (String, bool) {
        if text.len() <= self.limit + MARKER_ROOM {
            return (text.to_owned(), false);
        }
        let mut head_end = self.head_limit();
        while !text.is_char_boundary(head_end) {
            head_end -= 1;
        }
        let mut tail_start = text.len() - self.head_limit();
        while !text.is_char_boundary(tail_start) {
            tail_start += 1;
        }
        let dropped = (tail_start - head_end) as u64;
        let marker = OutputCap::marker(dropped);
        (format!("{}{marker}{}", &text[..head_end], &text[tail_start..]), true)
    }
}

/// The most bytes from the start of `bytes` whose text (converted lossily) fits `budget`.
fn longest_prefix(bytes: &[u8], budget: usize) -> usize {
    let fits = |n: usize| lossy(trim_incomplete_end(&bytes[..n])).0.len() <= budget;
    largest(bytes.len(), fits)
}

/// The most bytes from the end of `bytes` whose text (converted lossily) fits `budget`.
fn longest_suffix(bytes: &[u8], budget: usize) -> usize {
    let fits = |n: usize| lossy(trim_partial_start(&bytes[bytes.len() - n..])).0.len() <= budget;
    largest(bytes.len(), fits)
}

/// The largest `n` in `0..=max` for which `fits` holds, `fits` being monotonic.
fn largest(max: usize, fits: impl Fn(usize) -> bool) -> usize {
    let (mut low, mut high) = (0, max);
    while low < high {
        let mid = low + (high - low).div_ceil(2);
        if fits(mid) {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    low
}

/// The bytes as text, and whether any had to be replaced.
fn lossy(bytes: &[u8]) -> (String, bool) {
    let text = String::from_utf8_lossy(bytes);
    let converted = matches!(text, std::borrow::Cow::Owned(_));
    if text.contains('\0') {
        (text.replace('\0', "\u{FFFD}"), true)
    } else {
        (text.into_owned(), converted)
    }
}

/// Drops a UTF-8 sequence cut off at the end, so the cut itself is not reported as lossy.
fn trim_incomplete_end(bytes: &[u8]) -> &[u8] {
    match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() => &bytes[..e.valid_up_to()],
        _ => bytes,
    }
}

/// Drops continuation bytes of a character whose start was cut off.
fn trim_partial_start(bytes: &[u8]) -> &[u8] {
    let skip = bytes.iter().take(3).take_while(|b| (**b & 0b1100_0000) == 0b1000_0000).count();
    &bytes[skip..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_within_the_cap_is_kept_whole() {
        let out = OutputCap::new(10).text(b"01234", b"56", 0);
        assert_eq!(out, OutputText { text: "0123456".into(), lossy: false, truncated: false });
    }

    #[test]
    fn a_flood_keeps_head_and_tail_with_a_marker() {
        let out = OutputCap::new(10).text(b"01234", b"fghij", 10);
        assert_eq!(out.text, "01234\n[taskexec: 10 bytes of output dropped here]\nfghij");
        assert!(!out.lossy && out.truncated);
    }

    #[test]
    fn binary_floods_fit_the_limit_as_text_and_count_the_drop_in_bytes() {
        let out = OutputCap::new(100).text(&[0xff; 50], &[0xff; 50], 900);
        assert!(out.lossy);
        // 50 bytes of text each side: 16 replacement characters of 3 bytes.
        let sixteen = "\u{FFFD}".repeat(16);
        assert!(out.text.starts_with(&sixteen) && out.text.ends_with(&sixteen));
        assert!(out.text.contains("[taskexec: 968 bytes of output dropped here]"), "{}", out.text);
        // No drop in the raw bytes, but too long once converted: cut all the same.
        let small = OutputCap::new(100).text(&[0xff; 50], &[0xff; 40], 0);
        assert!(small.text.contains("[taskexec: 58 bytes of output dropped here]"));
        assert!(small.truncated);
    }

    #[test]
    fn a_character_cut_by_the_cap_is_not_reported_as_lossy() {
        let bytes = "aaéé€€€€bbb".as_bytes();
        let out = OutputCap::new(8).text(&bytes[..4], &bytes[bytes.len() - 4..], 12);
        assert!(!out.lossy, "{}", out.text);
        assert!(out.text.starts_with("aa") && out.text.ends_with("bbb"), "{}", out.text);
    }

    #[test]
    fn shrinking_keeps_both_ends_on_character_boundaries() {
        let text = format!("{}{}", "é".repeat(300), "z".repeat(300));
        let (shrunk, cut) = OutputCap::new(202).shrink(&text);
        assert!(cut);
        assert!(shrunk.starts_with(&"é".repeat(50)) && shrunk.ends_with(&"z".repeat(101)));
        assert!(shrunk.contains("bytes of output dropped here"), "{shrunk}");
        assert_eq!(OutputCap::new(10).shrink("short"), ("short".to_owned(), false));
    }
}
