//! Running one command: `sh -c` through duct (under the guard), in its own process group, with
//! stdout and stderr captured separately into bounded buffers and a clean environment.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use taskexec_protocol::{OutputCap, Stream};

use crate::capture::{capture, Capture, Captured, Runs};
use crate::guard;
use crate::isolation::Confinement;
use crate::procs::{self, Scope};

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
    /// When the command started, if it did.
    pub started: Option<Instant>,
    /// Processes of the task that the agent had to kill after the guard had exited: the guard
    /// was killed (a guard that exits kills them all first).
    pub survivors: usize,
}

/// How long to wait for the output pipes to close once the command has exited and its process
/// group has been killed. Only a descendant that left the group can hold them open longer.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What to run and how.
pub struct Spec<'a> {
    pub command: &'a str,
    pub env: &'a [(String, String)],
    /// The most of each stream kept: first and last halves beyond it.
    pub cap: OutputCap,
    /// This binary, to run the command under a guard that kills the command's process group
    /// if the agent dies (see `guard`). `None` runs `sh -c` directly.
    pub guard: Option<&'a Path>,
    /// The user, limits and folder the guard runs the command with.
    pub confinement: &'a Confinement,
    pub workdir: Option<&'a Path>,
}

/// The agent's live guards, by pid (a count, should a pid be reused before its old guard's
/// entry is gone): a sweep after one slot's guard died must spare the other slots' commands.
/// Held while a guard is spawned, so that a sweep never sees a guard it does not know of.
static GUARDS: Mutex<Option<HashMap<libc::pid_t, usize>>> = Mutex::new(None);

fn guards() -> std::sync::MutexGuard<'static, Option<HashMap<libc::pid_t, usize>>> {
    GUARDS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A command that has been started: its process group and its output, still being read.
pub struct Running {
    handle: Arc<duct::Handle>,
    group: Option<u32>,
    /// The group is led by the guard, which can also kill descendants that left the group.
    guarded: bool,
    /// Whether to look for processes of the task once the guard has exited: the agent's
    /// descendants (it is a subreaper, so orphans of a dead guard come back to it), and every
    /// process of the run-as user.
    sweep: bool,
    run_as: Option<u32>,
    stdout: Capture,
    stderr: Capture,
    runs: Arc<Mutex<Runs>>,
    started: Instant,
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
            let confinement = spec.confinement.encode();
            let args: [&OsStr; 4] = [
                crate::guard::ARG.as_ref(),
                agent.as_ref(),
                confinement.as_ref(),
                spec.command.as_ref(),
            ];
            duct::cmd(guard, args)
        }
        None => duct::cmd("sh", ["-c", spec.command]),
    };
    let expression = match spec.workdir {
        Some(dir) => expression.dir(dir),
        None => expression,
    };
    let expression = expression
        .stdin_null()
        .stdout_file(stdout_writer)
        .stderr_file(stderr_writer)
        .full_env(spec.env.iter().cloned())
        .unchecked()
        .before_spawn(|child| {
            // Its own process group, so the whole tree can be signalled at once. (The guard
            // gives up the agent's controlling terminal itself: a `setsid` here would need a
            // pre_exec hook, which costs the agent posix_spawn's fast path on every task.)
            child.process_group(0);
            Ok(())
        });
    let mut live = guards();
    let handle = expression.start();
    // The expression holds our copies of the write ends: drop them, or the pipes never close.
    drop(expression);
    let handle = handle?;
    let group = handle.pids().first().copied();
    if let (Some(pid), Some(_)) = (group, spec.guard) {
        *live.get_or_insert_with(HashMap::new).entry(pid as libc::pid_t).or_default() += 1;
    }
    drop(live);
    let runs = Arc::new(Mutex::new(Runs::default()));
    Ok(Running {
        handle: Arc::new(handle),
        group,
        guarded: spec.guard.is_some(),
        sweep: spec.guard.is_some(),
        run_as: spec.confinement.identity.as_ref().map(|(uid, _, _)| *uid),
        stdout: capture(stdout_reader, spec.cap, Stream::Stdout, runs.clone()),
        stderr: capture(stderr_reader, spec.cap, Stream::Stderr, runs.clone()),
        runs,
        started: Instant::now(),
    })
}

impl Running {
    /// Calls `exited` on another thread once the command has exited.
    pub fn on_exit(&self, exited: impl FnOnce(Exit) + Send + 'static) {
        let handle = self.handle.clone();
        let guard = self.group.filter(|_| self.guarded);
        thread::spawn(move || {
            let exit = exit_of(handle.wait().map(|output| output.status));
            if let Some(pid) = guard {
                forget_guard(pid as libc::pid_t);
            }
            exited(exit);
        });
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
    /// done so unless it was killed itself), and collects the output.
    pub fn finish(self, exit: Exit) -> Execution {
        if !self.guarded {
            self.signal(libc::SIGKILL);
        }
        let mut survivors = 0;
        if self.sweep {
            // A guard that exits with a code has killed all of its descendants first; one
            // that died of a signal may have been killed before it could, and one told to
            // kill everything (a command that ignored SIGTERM) gives up after a bound.
            let guard_clean = matches!(exit, Exit::Code(code) if code != i32::from(guard::KILLED));
            if !guard_clean {
                let live = guards();
                let spared = live.as_ref().map(|g| g.keys().copied().collect()).unwrap_or_default();
                survivors = procs::sweep(Scope::Orphans(&spared));
            }
            if let Some(uid) = self.run_as {
                // Processes of the user that no task of this agent started (a daemon that
                // slipped out some other way): not this task's doing, but they must go too.
                let strays = procs::sweep(Scope::User(uid));
                if strays > 0 {
                    log::warn!("killed {strays} other processes of the run-as user (uid {uid})");
                }
            }
        }
        let deadline = Instant::now() + DRAIN_GRACE;
        Execution {
            exit,
            stdout: self.stdout.collect(deadline),
            stderr: self.stderr.collect(deadline),
            started: Some(self.started),
            survivors,
        }
    }
}

/// A guard has been waited for: its pid no longer stands for a live guard.
fn forget_guard(pid: libc::pid_t) {
    let mut live = guards();
    if let Some(live) = live.as_mut() {
        if let Some(count) = live.get_mut(&pid) {
            *count -= 1;
            if *count == 0 {
                live.remove(&pid);
            }
        }
    }
}

impl Execution {
    /// A command that could not be started.
    pub fn not_started(why: String, cap: OutputCap) -> Execution {
        Execution {
            exit: Exit::NotStarted(why),
            stdout: Captured::new(cap),
            stderr: Captured::new(cap),
            started: None,
            survivors: 0,
        }
    }
}

/// Runs the command to its end. Descendants still alive when the shell exits are killed with
/// their process group, so nothing of the task outlives it.
pub fn run(spec: &Spec<'_>) -> Execution {
    match start(spec) {
        Ok(running) => {
            let exit = exit_of(running.handle.wait().map(|output| output.status));
            if let Some(pid) = running.group.filter(|_| running.guarded) {
                forget_guard(pid as libc::pid_t);
            }
            running.finish(exit)
        }
        Err(e) => Execution::not_started(format!("could not start the command: {e}"), spec.cap),
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
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ: a file grew past TASK_MAX_FILE_SIZE",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(command: &str) -> Execution {
        let env = crate::isolation::command_env(std::env::vars(), &[], None);
        super::run(&Spec {
            command,
            env: &env,
            cap: OutputCap::new(1024),
            guard: None,
            confinement: &Confinement::default(),
            workdir: None,
        })
    }

    #[test]
    fn exit_codes_and_streams_are_kept_apart() {
        let run = run("echo out; echo err >&2; exit 3");
        assert_eq!(run.exit, Exit::Code(3));
        assert_eq!(run.stdout.to_text().text, "out\n");
        assert_eq!(run.stderr.to_text().text, "err\n");
    }

    #[test]
    fn a_signal_is_reported_as_a_signal() {
        let run = run("kill -9 $$");
        assert_eq!(run.exit, Exit::Signal(libc::SIGKILL));
        assert_eq!(describe(&run.exit).unwrap(), "killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn binary_output_is_converted_lossily_and_flagged() {
        let text = run(r"printf 'a\000b\377c'").stdout.to_text();
        assert_eq!(text.text, "a\u{FFFD}b\u{FFFD}c");
        assert!(text.lossy);
    }

    #[test]
    fn background_children_do_not_outlive_the_command() {
        let started = std::time::Instant::now();
        let run = run("sleep 30 & echo started");
        assert_eq!(run.exit, Exit::Code(0));
        assert_eq!(run.stdout.to_text().text, "started\n");
        assert!(started.elapsed() < Duration::from_secs(10), "the pipe was held by sleep");
    }
}
