//! Running one command: `sh -c` through duct (under the guard), in its own process group, with
//! stdout and stderr captured separately into bounded buffers and a clean environment.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It ran to an exit code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// It could not be started.
    NotStarted(String),
}

/// The command's end and output.
#[derive(Debug)]
pub struct Execution {
    pub exit: Exit,
    pub stdout: Captured,
    pub stderr: Captured,
}

/// How long to wait for the output pipes to close once the command has exited and its process
/// group has been killed. Only a descendant that left the group can hold them open longer.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Variable names that are never passed to a command: the agent's own credentials and
/// anything named like a secret.
const SECRET_MARKERS: [&str; 7] =
    ["TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE_KEY", "API_KEY"];

pub fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    name == "DATABASE_URL" || SECRET_MARKERS.iter().any(|marker| name.contains(marker))
}

/// The agent's environment without its secrets: what a command runs with.
pub fn command_env() -> Vec<(String, String)> {
    std::env::vars().filter(|(name, _)| !is_secret(name)).collect()
}

/// What to run and how.
pub struct Spec<'a> {
    pub command: &'a str,
    pub env: &'a [(String, String)],
    /// The most of each stream kept: first and last halves beyond it.
    pub max_output_bytes: usize,
    /// This binary, to run the command under a guard that kills the command's process group
    /// if the agent dies (see `guard`). `None` runs `sh -c` directly.
    pub guard: Option<&'a Path>,
}

/// A command that has been started: its process group and its output, still being read.
pub struct Running {
    handle: Arc<duct::Handle>,
    group: Option<u32>,
    /// The group is led by the guard, which can also kill descendants that left the group.
    guarded: bool,
    stdout: Capture,
    stderr: Capture,
    runs: Arc<Mutex<Runs>>,
}

/// Starts the command in a process group of its own, stdin closed, stdout and stderr read
/// into bounded buffers on their own threads.
///
/// # Errors
/// When the pipes or the process cannot be created.
pub fn start(spec: &Spec<'_>) -> std::io::Result<Running> {
    let (stdout_reader, stdout_writer) = os_pipe::pipe()?;
    let (stderr_reader, stderr_writer) = os_pipe::pipe()?;
    let expression = match spec.guard {
        Some(guard) => {
            let agent = std::process::id().to_string();
            duct::cmd(guard, [OsStr::new(crate::guard::ARG), agent.as_ref(), spec.command.as_ref()])
        }
        None => duct::cmd("sh", ["-c", spec.command]),
    };
    let expression = expression
        .stdin_null()
        .stdout_file(stdout_writer)
        .stderr_file(stderr_writer)
        .full_env(spec.env.iter().cloned())
        .unchecked()
        .before_spawn(|child| {
            // Its own process group, so the whole tree can be signalled at once.
            child.process_group(0);
            Ok(())
        });
    let handle = expression.start();
    // The expression holds our copies of the write ends: drop them, or the pipes never close.
    drop(expression);
    let handle = handle?;
    let group = handle.pids().first().copied();
    let runs = Arc::new(Mutex::new(Runs::default()));
    Ok(Running {
        handle: Arc::new(handle),
        group,
        guarded: spec.guard.is_some(),
        stdout: capture(stdout_reader, spec.max_output_bytes, 0, runs.clone()),
        stderr: capture(stderr_reader, spec.max_output_bytes, 1, runs.clone()),
        runs,
    })
}

impl Running {
    /// Calls `exited` on another thread once the command has exited.
    pub fn on_exit(&self, exited: impl FnOnce(Exit) + Send + 'static) {
        let handle = self.handle.clone();
        thread::spawn(move || exited(exit_of(handle.wait().map(|output| output.status))));
    }

    /// The live buffers of stdout and stderr, and the order they were written in, for the
    /// uploader.
    pub fn buffers(&self) -> ([Arc<Mutex<Captured>>; 2], Arc<Mutex<Runs>>) {
        ([self.stdout.buffer(), self.stderr.buffer()], self.runs.clone())
    }

    /// The command's process group (the id of its leader, the guard).
    pub fn group(&self) -> Option<u32> {
        self.group
    }

    /// Sends `signal` to the command's whole process group (the guard passes SIGTERM on to
    /// descendants that left the group).
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(group) = self.group {
            kill_group(group, signal);
        }
    }

    /// Whether the command runs under the guard, which kills all its descendants on SIGUSR1
    /// (then exits) and whatever is left when `sh` exits.
    pub fn is_guarded(&self) -> bool {
        self.guarded
    }

    /// After the command has exited: kills whatever it left running (the guard has already
    /// done so), and collects the output.
    pub fn finish(self, exit: Exit) -> Execution {
        if !self.guarded {
            self.signal(libc::SIGKILL);
        }
        let deadline = Instant::now() + DRAIN_GRACE;
        Execution {
            exit,
            stdout: self.stdout.collect(deadline),
            stderr: self.stderr.collect(deadline),
        }
    }
}

impl Execution {
    /// A command that could not be started.
    pub fn not_started(why: String, max_output_bytes: usize) -> Execution {
        Execution {
            exit: Exit::NotStarted(why),
            stdout: Captured::new(max_output_bytes),
            stderr: Captured::new(max_output_bytes),
        }
    }
}

/// Runs the command to its end. Descendants still alive when the shell exits are killed with
/// their process group, so nothing of the task outlives it.
pub fn run(spec: &Spec<'_>) -> Execution {
    match start(spec) {
        Ok(running) => {
            let exit = exit_of(running.handle.wait().map(|output| output.status));
            running.finish(exit)
        }
        Err(e) => Execution::not_started(
            format!("could not start the command: {e}"),
            spec.max_output_bytes,
        ),
    }
}

fn exit_of(status: std::io::Result<std::process::ExitStatus>) -> Exit {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::NotStarted(format!("unexpected wait status {status}")),
        },
        Err(e) => Exit::NotStarted(format!("could not wait for the command: {e}")),
    }
}

/// Sends `signal` to the process group led by `leader`. A group that has already gone is not
/// an error.
pub fn kill_group(leader: u32, signal: libc::c_int) {
    let Ok(leader) = libc::pid_t::try_from(leader) else {
        return;
    };
    // SAFETY: killpg only sends a signal; an invalid group yields ESRCH, which we ignore.
    unsafe {
        libc::killpg(leader, signal);
    }
}

/// Reads a pipe to its end on a thread, keeping at most `limit` bytes.
/// Reads stream number `stream` (0 stdout, 1 stderr) of a command on a thread, noting in
/// `runs` where it takes over from the other stream.
fn capture(
    mut pipe: os_pipe::PipeReader,
    limit: usize,
    stream: usize,
    runs: Arc<Mutex<Runs>>,
) -> Capture {
    let buffer = Arc::new(Mutex::new(Captured::new(limit)));
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
    last: Option<usize>,
    runs: std::collections::VecDeque<(usize, u64)>,
}

/// Runs kept at most: a command that alternates its streams faster than they are uploaded loses
/// only the order of its oldest runs.
const MAX_RUNS: usize = 4096;

impl Runs {
    fn note(&mut self, stream: usize, offset: u64) {
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
    pub fn front(&self) -> Option<(usize, Option<u64>)> {
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
struct Capture {
    buffer: Arc<Mutex<Captured>>,
    done: mpsc::Receiver<()>,
}

impl Capture {
    /// The live buffer, for the uploader.
    fn buffer(&self) -> Arc<Mutex<Captured>> {
        self.buffer.clone()
    }

    /// The output once the pipe has closed, or as it stands at `deadline` if a descendant
    /// that left the process group still holds the pipe open.
    fn collect(self, deadline: Instant) -> Captured {
        let closed = self.done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        let mut captured = lock(&self.buffer).clone();
        captured.open = closed.is_err();
        captured
    }
}

fn lock(buffer: &Mutex<Captured>) -> std::sync::MutexGuard<'_, Captured> {
    buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A stream's output, bounded as the server keeps it: the first half of the limit, and a ring
/// of the latest bytes (the other half).
#[derive(Debug, Clone)]
pub struct Captured {
    limit: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    dropped: u64,
    /// The pipe was still open when the output was collected: later output is not here.
    open: bool,
}

impl Captured {
    pub fn new(limit: usize) -> Captured {
        Captured { limit, head: Vec::new(), tail: Default::default(), dropped: 0, open: false }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        let head_room = (self.limit / 2).saturating_sub(self.head.len());
        let into_head = head_room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..into_head]);
        bytes = &bytes[into_head..];
        let tail_limit = self.limit - self.limit / 2;
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
    pub fn from_offset(&self, offset: u64, max: usize) -> Option<(u64, Vec<u8>)> {
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
        offset < (self.limit / 2) as u64
    }

    /// The output as text for the report, and whether it had to be converted lossily (it was
    /// not UTF-8, or it held NUL bytes, which the database cannot store). When bytes were
    /// dropped, a marker line between head and tail says how many.
    pub fn to_text(&self) -> (String, bool) {
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        let contiguous = self.dropped == 0;
        let mut all = Vec::new();
        if contiguous {
            all = self.head.clone();
            all.extend_from_slice(&tail);
            let (text, lossy) = lossy(&all);
            if text.len() <= self.limit {
                return (self.note_open(text), lossy);
            }
        }
        // Too long, or too long once converted (each invalid byte becomes three): keep as many
        // raw bytes of each end as fit half the limit as text, and count the rest exactly.
        let (head_source, tail_source) =
            if contiguous { (&all, &all) } else { (&self.head, &tail) };
        let head_len = longest_prefix(head_source, self.limit / 2);
        let tail_len = longest_suffix(tail_source, self.limit - self.limit / 2);
        let (head, head_lossy) = lossy(trim_incomplete_end(&head_source[..head_len]));
        let (tail, tail_lossy) =
            lossy(trim_partial_start(&tail_source[tail_source.len() - tail_len..]));
        let dropped = self.total() - head_len as u64 - tail_len as u64;
        let marker = format!("\n[taskexec: {dropped} bytes of output dropped here]\n");
        (self.note_open(format!("{head}{marker}{tail}")), head_lossy || tail_lossy)
    }

    fn note_open(&self, mut text: String) -> String {
        if self.open {
            text.push_str("\n[taskexec: a process outside the task still held this stream open; later output is not captured]\n");
        }
        text
    }
}

/// `text` cut to about `max_bytes`: its first and last halves, on character boundaries, with a
/// marker between them.
pub fn shrink(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut head_end = max_bytes / 2;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let mut tail_start = text.len() - max_bytes / 2;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    let dropped = tail_start - head_end;
    format!(
        "{}\n[taskexec: {dropped} bytes of output dropped here]\n{}",
        &text[..head_end],
        &text[tail_start..]
    )
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
        let mid = low + (high - low + 1) / 2;
        if fits(mid) {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    low
}

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

/// Why a command that did not run to an exit code failed, in words.
pub fn describe(exit: &Exit) -> Option<String> {
    match exit {
        Exit::Code(_) => None,
        Exit::Signal(signal) => {
            Some(format!("killed by signal {signal} ({})", signal_name(*signal)))
        }
        Exit::NotStarted(why) => Some(why.clone()),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(command: &str, limit: usize) -> Execution {
        let env = command_env();
        super::run(&Spec { command, env: &env, max_output_bytes: limit, guard: None })
    }

    #[test]
    fn exit_codes_and_streams_are_kept_apart() {
        let run = run("echo out; echo err >&2; exit 3", 1024);
        assert_eq!(run.exit, Exit::Code(3));
        assert_eq!(run.stdout.to_text(), ("out\n".to_owned(), false));
        assert_eq!(run.stderr.to_text(), ("err\n".to_owned(), false));
    }

    #[test]
    fn a_signal_is_reported_as_a_signal() {
        let run = run("kill -9 $$", 1024);
        assert_eq!(run.exit, Exit::Signal(libc::SIGKILL));
        assert_eq!(describe(&run.exit).unwrap(), "killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn binary_output_is_converted_lossily_and_flagged() {
        let run = run(r"printf 'a\000b\377c'", 1024);
        let (text, lossy) = run.stdout.to_text();
        assert_eq!(text, "a\u{FFFD}b\u{FFFD}c");
        assert!(lossy);
    }

    #[test]
    fn a_flood_keeps_head_and_tail_with_a_marker() {
        let mut captured = Captured::new(10);
        for chunk in [&b"0123"[..], b"456789abcdef", b"ghij"] {
            captured.push(chunk);
        }
        assert_eq!(captured.dropped(), 10);
        assert_eq!(captured.total(), 20);
        let (text, lossy) = captured.to_text();
        assert_eq!(text, "01234\n[taskexec: 10 bytes of output dropped here]\nfghij");
        assert!(!lossy);
        // The uploader reads by offset: the head, then past the drop, the window.
        assert_eq!(captured.from_offset(0, 3), Some((0, b"012".to_vec())));
        assert_eq!(captured.from_offset(3, 99), Some((3, b"34".to_vec())));
        assert_eq!(captured.from_offset(5, 99), Some((15, b"fghij".to_vec())));
        assert_eq!(captured.from_offset(17, 99), Some((17, b"hij".to_vec())));
        assert_eq!(captured.from_offset(20, 99), None);
    }

    #[test]
    fn binary_floods_fit_the_limit_as_text_and_count_the_drop_in_bytes() {
        let mut captured = Captured::new(100);
        captured.push(&[0xff; 1000]);
        let (text, lossy) = captured.to_text();
        assert!(lossy);
        // 50 bytes of text each side: 16 replacement characters of 3 bytes.
        assert!(text.starts_with(&"\u{FFFD}".repeat(16)) && text.ends_with(&"\u{FFFD}".repeat(16)));
        assert!(text.contains("[taskexec: 968 bytes of output dropped here]"), "{text}");
        // No drop in the raw bytes, but too long once converted: cut all the same.
        let mut small = Captured::new(100);
        small.push(&[0xff; 90]);
        assert!(small.to_text().0.contains("[taskexec: 58 bytes of output dropped here]"));
    }

    #[test]
    fn a_character_cut_by_the_cap_is_not_reported_as_lossy() {
        let mut captured = Captured::new(8);
        captured.push("aaéé€€€€bbb".as_bytes());
        let (text, lossy) = captured.to_text();
        assert!(!lossy, "{text}");
        assert!(text.starts_with("aa") && text.ends_with("bbb"), "{text}");
    }

    #[test]
    fn shrinking_keeps_both_ends_on_character_boundaries() {
        let text = format!("{}{}", "é".repeat(100), "z".repeat(100));
        let shrunk = shrink(&text, 101);
        assert!(
            shrunk.starts_with(&"é".repeat(25)) && shrunk.ends_with(&"z".repeat(50)),
            "{shrunk}"
        );
        assert!(shrunk.contains("bytes of output dropped here"));
        assert_eq!(shrink("short", 10), "short");
    }

    #[test]
    fn secrets_are_not_passed_to_commands() {
        for name in [
            "AGENT_TOKEN",
            "ROCKET_AGENT_TOKEN",
            "DB_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "DATABASE_URL",
        ] {
            assert!(is_secret(name), "{name}");
        }
        for name in ["PATH", "HOME", "LANG", "POLL_INTERVAL"] {
            assert!(!is_secret(name), "{name}");
        }
    }

    #[test]
    fn background_children_do_not_outlive_the_command() {
        let started = std::time::Instant::now();
        let run = run("sleep 30 & echo started", 1024);
        assert_eq!(run.exit, Exit::Code(0));
        assert_eq!(run.stdout.to_text().0, "started\n");
        assert!(started.elapsed() < Duration::from_secs(10), "the pipe was held by sleep");
    }
}
