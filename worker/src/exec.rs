//! Running one command: `sh -c`, forked by its slot's guard (or through duct, without one), in
//! its own process group, with stdout and stderr captured separately into bounded buffers and
//! a clean environment.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use taskexec_protocol::{OutputCap, Stream};

use crate::capture::{capture, Capture, Captured, Runs};
use crate::guard::{self, wire};
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
    /// Processes of the task that the agent had to kill after its guard was lost: killed, or
    /// beaten by a fork bomb (a sound guard kills them all before it reports the exit).
    pub survivors: usize,
    /// Whether the command's guard was lost while it ran: then its exit is the guard's.
    pub guard_lost: bool,
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
    /// The slot's guard, which runs the command and kills all that is left of it when it
    /// ends or the agent dies (see `guard`). `None` runs `sh -c` directly.
    pub guard: Option<&'a Arc<GuardSlot>>,
    /// The user, limits and folder the guard runs the command with.
    pub confinement: &'a Confinement,
    pub workdir: Option<&'a Path>,
}

/// The agent's live guards, by pid (a count, should a pid be reused before its old guard's
/// entry is gone): a sweep after one slot's guard died must spare the other slots' commands.
/// Held while a guard is spawned, so that a sweep never sees a guard it does not know of.
/// An entry goes once its guard has been waited for.
static GUARDS: Mutex<Option<HashMap<libc::pid_t, usize>>> = Mutex::new(None);

fn guards() -> std::sync::MutexGuard<'static, Option<HashMap<libc::pid_t, usize>>> {
    GUARDS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A slot's guard: started for the slot's first command, kept while it lives, started again
/// after it died.
pub struct GuardSlot {
    /// This binary.
    binary: PathBuf,
    /// The guard's own environment: the slot's, without the task's variables or the token.
    env: Vec<(String, String)>,
    idle: Mutex<Option<Guard>>,
}

/// A guard process and the agent's end of its socket.
struct Guard {
    pid: libc::pid_t,
    /// Whether the guard has not been waited for yet, held while it is signalled or waited
    /// for: a pid is never signalled once it may have been reused.
    unwaited: Arc<Mutex<bool>>,
    socket: Arc<UnixStream>,
}

impl GuardSlot {
    pub fn new(binary: PathBuf, env: Vec<(String, String)>) -> GuardSlot {
        GuardSlot { binary, env, idle: Mutex::new(None) }
    }

    fn take(&self) -> Option<Guard> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }

    fn put_back(&self, guard: Guard) {
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // One command at a time per slot, so none is there; should one be (a caller of the
        // library running two at once), it goes rather than being dropped unwaited.
        if let Some(other) = idle.replace(guard) {
            other.end();
        }
    }

    /// Starts a guard, registered as live before anyone can see it.
    fn spawn(&self) -> std::io::Result<Guard> {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_write_timeout(Some(GUARD_ANSWER))?;
        let mut command = std::process::Command::new(&self.binary);
        command
            .arg(guard::ARG)
            .arg(std::process::id().to_string())
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .current_dir("/")
            // Not in the agent's group: a terminal's Ctrl-C is for the agent, which drains.
            .process_group(0);
        let mut live = guards();
        let child = command.spawn()?;
        let pid = child.id() as libc::pid_t;
        *live.get_or_insert_with(HashMap::new).entry(pid).or_default() += 1;
        Ok(Guard { pid, unwaited: Arc::new(Mutex::new(true)), socket: Arc::new(ours) })
    }
}

impl Drop for GuardSlot {
    /// An idle guard has no command: it goes, and is waited for.
    fn drop(&mut self) {
        if let Some(guard) = self.take() {
            guard.end();
        }
    }
}

impl Guard {
    /// Asks the guard to run the framed `Run` request; the pid of its `sh` once it runs.
    fn run(
        &self,
        run: &[u8],
        stdout: &os_pipe::PipeWriter,
        stderr: &os_pipe::PipeWriter,
    ) -> Result<libc::pid_t, GuardFailure> {
        let fds = [stdout.as_raw_fd(), stderr.as_raw_fd()];
        wire::send(&self.socket, run, &fds).map_err(GuardFailure::Unreachable)?;
        // A guard that does not answer (stopped by a command of the same user, say) is lost,
        // not waited for: the slot would hang before any timeout of the task applies.
        let answer = self
            .socket
            .set_read_timeout(Some(GUARD_ANSWER))
            .and_then(|()| wire::receive::<wire::Reply>(&self.socket));
        let answer = answer.and_then(|answer| {
            self.socket.set_read_timeout(None)?;
            Ok(answer)
        });
        match answer {
            Ok(Some((wire::Reply::Started { pid }, _))) => Ok(pid),
            Ok(Some((wire::Reply::NotStarted { why }, _))) => Err(GuardFailure::Refused(why)),
            Ok(Some((other, _))) => Err(GuardFailure::Lost(std::io::Error::other(format!(
                "the guard answered {other:?}"
            )))),
            Ok(None) => Err(GuardFailure::Lost(std::io::ErrorKind::UnexpectedEof.into())),
            Err(e) => Err(GuardFailure::Lost(e)),
        }
    }

    /// Sends `request` about the running command (within `GUARD_ANSWER`); a guard that has
    /// gone is noticed by whoever waits for its reply.
    fn tell(&self, request: &wire::Request) {
        if let Ok(frame) = wire::frame(request) {
            let _ = wire::send(&self.socket, &frame, &[]);
        }
    }

    /// SIGKILL to the guard, unless it has been waited for already.
    fn kill(&self) {
        let unwaited = self.unwaited.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *unwaited {
            // SAFETY: kill only sends a signal, to our own child, not waited for yet.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    /// Kills the guard (if it is not dead already) and waits for it; how it ended.
    fn end(&self) -> Exit {
        let mut unwaited = self.unwaited.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !*unwaited {
            return Exit::NotStarted("the guard had ended".into());
        }
        // SAFETY: kill only sends a signal, to our own child, not waited for yet.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let mut status = 0;
        let waited = loop {
            // SAFETY: waitpid on our own child with a valid pointer.
            let waited = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if waited != -1
                || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                break waited;
            }
        };
        *unwaited = false;
        forget_guard(self.pid);
        if waited != self.pid {
            return Exit::NotStarted("the guard could not be waited for".into());
        }
        exit_of(Ok(std::process::ExitStatus::from_raw(status)))
    }

    /// Another handle on the same guard, for the thread that waits for its reply.
    fn share(&self) -> Guard {
        Guard { pid: self.pid, unwaited: self.unwaited.clone(), socket: self.socket.clone() }
    }
}

/// How long a guard may take to take a request, or to answer that it started a command.
const GUARD_ANSWER: Duration = Duration::from_secs(10);

enum GuardFailure {
    /// The request did not go through: the guard never got it (an idle guard that died).
    Unreachable(std::io::Error),
    /// The guard could not start `sh` (a folder the command's user cannot enter, say).
    Refused(String),
    /// The guard got the request but did not answer as it should: it may have started `sh`.
    Lost(std::io::Error),
}

/// Kills this agent's descendants outside its live guards (what a lost guard left behind):
/// how many. Only in a subreaper, where they come back to: elsewhere (the bench) the
/// process's descendants are its own business.
fn sweep_orphans() -> usize {
    if !procs::is_subreaper() {
        return 0;
    }
    let live = guards();
    let spared = live.as_ref().map(|g| g.keys().copied().collect()).unwrap_or_default();
    procs::sweep(Scope::Orphans(&spared))
}

/// A command that has been started: its process group and its output, still being read.
pub struct Running {
    /// Without a guard: `sh` itself, started through duct.
    handle: Option<Arc<duct::Handle>>,
    /// The slot's guard, which forked `sh`, and whether it has been lost during the command
    /// (killed, or unable to kill everything): then the agent sweeps, and the slot starts a
    /// new guard for its next command.
    guard: Option<(Arc<GuardSlot>, Guard)>,
    lost: Arc<AtomicBool>,
    group: Option<u32>,
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
    let (handle, guard, group) = match spec.guard {
        Some(slot) => {
            let request = wire::frame(&wire::Request::Run(wire::Run {
                command: spec.command.to_owned(),
                env: spec.env.to_vec(),
                workdir: spec.workdir.map(PathBuf::from),
                confinement: spec.confinement.encode(),
            }))?;
            // An idle guard may have died since its last command: then once more with a new
            // one. Only a request that never reached the guard is sent again; a guard lost
            // after it may have started `sh`, which must neither run twice nor be left.
            let mut kept = slot.take();
            let (guard, pid) = loop {
                let (guard, fresh) = match kept.take() {
                    Some(guard) => (guard, false),
                    None => (slot.spawn()?, true),
                };
                match guard.run(&request, &stdout_writer, &stderr_writer) {
                    Ok(pid) => break (guard, pid),
                    Err(GuardFailure::Refused(why)) => {
                        slot.put_back(guard);
                        return Err(std::io::Error::other(why));
                    }
                    Err(GuardFailure::Unreachable(e)) => {
                        guard.end();
                        if fresh {
                            return Err(std::io::Error::other(format!("the guard failed: {e}")));
                        }
                    }
                    Err(GuardFailure::Lost(e)) => {
                        guard.end();
                        let left = sweep_orphans();
                        return Err(std::io::Error::other(format!(
                            "the guard ended before it confirmed the start ({e}); {left} \
                             processes it left were killed by the agent"
                        )));
                    }
                }
            };
            (None, Some((slot.clone(), guard)), Some(pid as u32))
        }
        None => {
            let handle = duct::cmd(guard::SH, ["-c", spec.command]);
            let handle = match spec.workdir {
                Some(dir) => handle.dir(dir),
                None => handle,
            };
            let handle = handle
                .stdin_null()
                .stdout_file(stdout_writer.try_clone()?)
                .stderr_file(stderr_writer.try_clone()?)
                .full_env(spec.env.iter().cloned())
                .unchecked()
                .before_spawn(|child| {
                    child.process_group(0);
                    Ok(())
                })
                .start()?;
            let group = handle.pids().first().copied();
            (Some(Arc::new(handle)), None, group)
        }
    };
    // Our copies of the write ends: drop them, or the pipes never close.
    drop((stdout_writer, stderr_writer));
    let runs = Arc::new(Mutex::new(Runs::default()));
    Ok(Running {
        handle,
        guard,
        lost: Arc::new(AtomicBool::new(false)),
        group,
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
        match (&self.handle, &self.guard) {
            (Some(handle), _) => {
                let handle = handle.clone();
                thread::spawn(move || exited(exit_of(handle.wait().map(|output| output.status))));
            }
            (None, Some((_, guard))) => {
                let (guard, lost) = (guard.share(), self.lost.clone());
                thread::spawn(move || {
                    let exit = match wire::receive::<wire::Reply>(&guard.socket) {
                        Ok(Some((wire::Reply::Exited { code, signal, clean }, _))) => {
                            if !clean {
                                // It exits, leaving what it could not kill to the sweep.
                                lost.store(true, Ordering::SeqCst);
                                guard.end();
                            }
                            match (code, signal) {
                                (Some(code), _) => Exit::Code(code),
                                (None, Some(signal)) => Exit::Signal(signal),
                                (None, None) => {
                                    Exit::NotStarted("the guard could not wait for sh".into())
                                }
                            }
                        }
                        // The guard is gone (killed with its command, say): how it ended
                        // stands for how the command did.
                        _ => {
                            lost.store(true, Ordering::SeqCst);
                            guard.end()
                        }
                    };
                    exited(exit);
                });
            }
            (None, None) => exited(Exit::NotStarted("nothing was started".into())),
        }
    }

    /// The live buffers of stdout and stderr, and the order they were written in, for the
    /// uploader.
    pub fn buffers(&self) -> ([Arc<Mutex<Captured>>; 2], Arc<Mutex<Runs>>) {
        ([self.stdout.buffer(), self.stderr.buffer()], self.runs.clone())
    }

    /// The command's process group (the id of its leader, `sh`).
    pub fn group(&self) -> Option<u32> {
        self.group
    }

    /// Asks the command to stop: SIGTERM to its process group, and through the guard to its
    /// descendants that left the group.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
        if let Some((_, guard)) = &self.guard {
            guard.tell(&wire::Request::Term);
        }
    }

    /// Has the guard kill every process of the command, in its group or not. False without a
    /// guard, which leaves only `kill`.
    pub fn kill_all(&self) -> bool {
        match &self.guard {
            Some((_, guard)) => {
                guard.tell(&wire::Request::Kill);
                true
            }
            None => false,
        }
    }

    /// SIGKILL to the command's process group and to its guard, should the guard not have
    /// done its work: the agent sweeps what is left.
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
        if let Some((_, guard)) = &self.guard {
            // Lost from now on, even if it reported a clean exit meanwhile: a guard killed
            // here must not go back to its slot.
            self.lost.store(true, Ordering::SeqCst);
            guard.kill();
        }
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(group) = self.group {
            kill_group(group, signal);
        }
    }

    /// After the command has exited: kills whatever it left running (the guard has already
    /// done so unless it was lost), and collects the output. A guard that is still sound goes
    /// back to its slot.
    pub fn finish(self, exit: Exit) -> Execution {
        let (mut survivors, mut guard_lost) = (0, false);
        match self.guard {
            None => self.signal(libc::SIGKILL),
            Some((slot, guard)) => {
                guard_lost = self.lost.load(Ordering::SeqCst);
                if guard_lost {
                    // The guard died (killed by its command, say), gave up killing a fork
                    // bomb, or was killed by a stop: what it left came back to the agent, a
                    // subreaper. (Waited for already, unless a stop killed it after its
                    // report: `end` does nothing twice.)
                    guard.end();
                    survivors = sweep_orphans();
                } else {
                    slot.put_back(guard);
                }
                if let Some(uid) = self.run_as {
                    // Processes of the user that no task of this agent started (a daemon that
                    // slipped out some other way): not this task's doing, but they must go too.
                    let strays = procs::sweep(Scope::User(uid));
                    if strays > 0 {
                        log::warn!(
                            "killed {strays} other processes of the run-as user (uid {uid})"
                        );
                    }
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
            guard_lost,
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
            guard_lost: false,
        }
    }
}

/// Runs the command to its end. Descendants still alive when the shell exits are killed with
/// their process group, so nothing of the task outlives it.
pub fn run(spec: &Spec<'_>) -> Execution {
    match start(spec) {
        Ok(running) => {
            let (exited, exit) = std::sync::mpsc::channel();
            running.on_exit(move |exit| {
                let _ = exited.send(exit);
            });
            let exit = exit.recv().unwrap_or_else(|_| Exit::NotStarted("no exit seen".into()));
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
