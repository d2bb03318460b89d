//! Running one command: `sh -c` through duct, in its own process group, with stdout and
//! stderr captured separately into bounded buffers and a clean environment.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

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
const SECRET_MARKERS: [&str; 7] = [
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "PRIVATE_KEY",
    "API_KEY",
];

pub fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    name == "DATABASE_URL" || SECRET_MARKERS.iter().any(|marker| name.contains(marker))
}

/// The agent's environment without its secrets: what a command runs with.
pub fn command_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(name, _)| !is_secret(name))
        .collect()
}

/// Runs `command` with `sh -c` and waits for it. Output beyond `max_output_bytes` per stream
/// keeps its first and last halves. Descendants still alive when the shell exits are killed
/// with their process group, so nothing of the task outlives it.
pub fn run(command: &str, env: &[(String, String)], max_output_bytes: usize) -> Execution {
    match start(command, env, max_output_bytes) {
        Ok(execution) => execution,
        Err(e) => Execution {
            exit: Exit::NotStarted(format!("could not start sh: {e}")),
            stdout: Captured::new(max_output_bytes),
            stderr: Captured::new(max_output_bytes),
        },
    }
}

fn start(
    command: &str,
    env: &[(String, String)],
    max_output_bytes: usize,
) -> std::io::Result<Execution> {
    let (stdout_reader, stdout_writer) = os_pipe::pipe()?;
    let (stderr_reader, stderr_writer) = os_pipe::pipe()?;
    let expression = duct::cmd("sh", ["-c", command])
        .stdin_null()
        .stdout_file(stdout_writer)
        .stderr_file(stderr_writer)
        .full_env(env.iter().cloned())
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
    let stdout = capture(stdout_reader, max_output_bytes);
    let stderr = capture(stderr_reader, max_output_bytes);
    let status = handle.wait().map(|output| output.status);
    let group = handle.pids().first().copied();
    if let Some(group) = group {
        kill_group(group, libc::SIGKILL);
    }
    let exit = match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::NotStarted(format!("unexpected wait status {status}")),
        },
        Err(e) => Exit::NotStarted(format!("could not wait for the command: {e}")),
    };
    Ok(Execution {
        exit,
        stdout: stdout
            .recv_timeout(DRAIN_GRACE)
            .unwrap_or_else(|_| Captured::new(max_output_bytes)),
        stderr: stderr
            .recv_timeout(DRAIN_GRACE)
            .unwrap_or_else(|_| Captured::new(max_output_bytes)),
    })
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
fn capture(mut pipe: os_pipe::PipeReader, limit: usize) -> mpsc::Receiver<Captured> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let mut captured = Captured::new(limit);
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => captured.push(&buffer[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = sender.send(captured);
    });
    receiver
}

/// A stream's output, bounded: the first half of the limit, and a ring of the last half.
#[derive(Debug)]
pub struct Captured {
    limit: usize,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    dropped: u64,
}

impl Captured {
    pub fn new(limit: usize) -> Captured {
        Captured {
            limit,
            head: Vec::new(),
            tail: Default::default(),
            dropped: 0,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        let head_room = (self.limit - self.limit / 2).saturating_sub(self.head.len());
        let into_head = head_room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..into_head]);
        bytes = &bytes[into_head..];
        let tail_limit = self.limit / 2;
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

    /// The output as text for the report, and whether it had to be converted lossily (it was
    /// not UTF-8, or it held NUL bytes, which the database cannot store). When bytes were
    /// dropped, a marker line between head and tail says how many.
    pub fn to_text(&self) -> (String, bool) {
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        if self.dropped == 0 {
            let mut all = self.head.clone();
            all.extend_from_slice(&tail);
            return lossy(&all);
        }
        let (head, head_lossy) = lossy(trim_incomplete_end(&self.head));
        let (tail, tail_lossy) = lossy(trim_partial_start(&tail));
        let marker = format!(
            "\n[taskexec: {} bytes of output dropped here]\n",
            self.dropped
        );
        (format!("{head}{marker}{tail}"), head_lossy || tail_lossy)
    }
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
    let skip = bytes
        .iter()
        .take(3)
        .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
        .count();
    &bytes[skip..]
}

/// Why a command that did not run to an exit code failed, in words.
pub fn describe(exit: &Exit) -> Option<String> {
    match exit {
        Exit::Code(_) => None,
        Exit::Signal(signal) => Some(format!(
            "killed by signal {signal} ({})",
            signal_name(*signal)
        )),
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

    #[test]
    fn exit_codes_and_streams_are_kept_apart() {
        let run = run("echo out; echo err >&2; exit 3", &command_env(), 1024);
        assert_eq!(run.exit, Exit::Code(3));
        assert_eq!(run.stdout.to_text(), ("out\n".to_owned(), false));
        assert_eq!(run.stderr.to_text(), ("err\n".to_owned(), false));
    }

    #[test]
    fn a_signal_is_reported_as_a_signal() {
        let run = run("kill -9 $$", &command_env(), 1024);
        assert_eq!(run.exit, Exit::Signal(libc::SIGKILL));
        assert_eq!(describe(&run.exit).unwrap(), "killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn binary_output_is_converted_lossily_and_flagged() {
        let run = run(r"printf 'a\000b\377c'", &command_env(), 1024);
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
        let (text, lossy) = captured.to_text();
        assert_eq!(
            text,
            "01234\n[taskexec: 10 bytes of output dropped here]\nfghij"
        );
        assert!(!lossy);
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
        let run = run("sleep 30 & echo started", &command_env(), 1024);
        assert_eq!(run.exit, Exit::Code(0));
        assert_eq!(run.stdout.to_text().0, "started\n");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the pipe was held by sleep"
        );
    }
}
