//! The guard: a process per slot between the agent and the slot's commands, started once and
//! kept for every task of the slot, so that a task costs one exec (`sh`), not two. It makes
//! sure that no process of a task outlives it:
//!
//! - It forks each command as `sh -c` in a process group of its own, with the user, limits,
//!   folder, environment and descriptors the agent asks for (see `wire`).
//! - It is a child subreaper: descendants orphaned by their parent's exit (`cmd &`, or
//!   `setsid cmd &`, which also leaves the process group) are re-parented to the guard rather
//!   than to init, so it can find them all by walking /proc.
//! - When `sh` exits, the guard kills what is left before it reports the exit; `Kill` kills
//!   everything now; `Term` passes SIGTERM on to descendants that left the group (the agent
//!   signals the group itself).
//! - When the agent dies, even by SIGKILL, the kernel sends the guard SIGHUP (a parent-death
//!   signal) and its socket closes; either way the guard kills every descendant and exits. A
//!   parent-death signal on `sh` alone would not do: it is not inherited by the command's own
//!   children.
//! - It runs as the agent's user (root, with `RUN_AS`), and only `sh` drops to the command's
//!   user, limits and descriptors (see `isolation`): with `RUN_AS`, a command cannot signal its
//!   guard (without it, a command that kills its guard is reported, and the agent kills what
//!   it left and starts another guard for the slot). It is not dumpable, so that a command of
//!   the same user cannot read an earlier command's environment out of its memory either.
//!
//! The guard is this same binary, started as `taskexec-worker __guard <agent pid>`, with its
//! end of the socket as stdin.

pub mod wire;

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::isolation::{close_on_exec_from_3, Confinement};
use crate::procs::{descendants_of, has_children, reap};
use wire::{Reply, Request};

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

/// The shell, by its path: not looked up in the command's `PATH` (a failed exec for each
/// folder before it, on every task), and not one a task's `PATH` could put elsewhere.
pub const SH: &str = "/bin/sh";

/// The first argument that turns the binary into a guard.
pub const ARG: &str = "__guard";

/// Runs the guard when the arguments ask for it; `None` otherwise.
pub fn run_if_requested() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [flag, agent] if flag == ARG => Some(run(agent)),
        _ => None,
    }
}

fn run(agent: &OsString) -> ExitCode {
    let agent: libc::pid_t = agent.to_str().and_then(|s| s.parse().ok()).unwrap_or(-1);
    // Whatever this process inherited beyond 0, 1 and 2 stays out of the commands, and so do
    // ignored signals (nohup, Python) and the operator's terminal.
    close_on_exec_from_3();
    reset_signals();
    leave_terminal();
    // Caught, not ignored: a caught signal is back to its default in `sh`, an ignored one
    // would stay ignored there. The group's SIGINT from a terminal, or a command's SIGTERM,
    // must not end the guard of the tasks to come. Caught before the parent-death signal is
    // armed: it also comes when the agent's thread that started the guard ends.
    let Ok(mut signals) = Signals::new([SIGHUP, SIGTERM, SIGINT, SIGQUIT]) else {
        return ExitCode::from(125);
    };
    // SAFETY: prctl with these options only changes attributes of this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, SIGHUP as libc::c_ulong, 0, 0, 0);
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    // The agent may have died before the parent-death signal was armed.
    if !agent_alive(agent) {
        return ExitCode::from(125);
    }
    std::thread::spawn(move || {
        for signal in signals.forever() {
            // HUP from anyone but the kernel's parent-death notice is the command's own
            // business: only act when the agent is really gone.
            if signal == SIGHUP && !agent_alive(agent) {
                kill_descendants();
                quit();
            }
        }
    });
    // SAFETY: the agent starts the guard with its end of the socket as stdin, and nothing
    // else in this process uses descriptor 0.
    let socket = UnixStream::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(0) });
    let Ok(replies) = socket.try_clone() else {
        return ExitCode::from(125);
    };
    let replies = Arc::new(Mutex::new(replies));
    // The running command's `sh`, which leads its process group.
    let mut command = None;
    loop {
        let request = match wire::receive::<Request>(&socket) {
            Ok(Some(request)) => request,
            // The agent has gone (or garbled its side): nothing of ours may outlive it.
            Ok(None) | Err(_) => {
                kill_descendants();
                return ExitCode::SUCCESS;
            }
        };
        match request {
            (Request::Run(run), fds) => {
                let said = match start(run, fds) {
                    Ok((child, limited)) => {
                        let pid = child.id() as libc::pid_t;
                        command = Some(pid);
                        // `Started` goes before anything can report the exit of a short
                        // command (`sh` keeps its status until it is waited for).
                        let said = say(&replies, &Reply::Started { pid });
                        let replies = replies.clone();
                        std::thread::spawn(move || await_exit(child, limited, &replies));
                        said
                    }
                    Err(why) => say(&replies, &Reply::NotStarted { why }),
                };
                if said.is_err() {
                    kill_descendants();
                    return ExitCode::SUCCESS;
                }
            }
            (Request::Term, _) => signal_strays(libc::SIGTERM, command),
            (Request::Kill, _) => {
                for (pid, _) in descendants_of(me()) {
                    // SAFETY: kill only sends a signal. Reaping is left to `await_exit`, which
                    // must get `sh`'s own status.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

fn say(replies: &Mutex<UnixStream>, reply: &Reply) -> std::io::Result<()> {
    let socket = replies.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    wire::send(&socket, &wire::frame(reply)?, &[])
}

/// Forks `sh -c` for `run`, its stdout and stderr the two descriptors that came with it.
/// Returns the child and, when it runs under limits, a copy of its stderr and the limits (to
/// name them should it fail).
fn start(run: wire::Run, fds: Vec<OwnedFd>) -> Result<(std::process::Child, Limited), String> {
    let Some(confinement) = Confinement::decode(&run.confinement) else {
        return Err("the guard's confinement is malformed".into());
    };
    let [stdout, stderr]: [OwnedFd; 2] = fds
        .try_into()
        .map_err(|fds: Vec<OwnedFd>| format!("the guard got {} descriptors, not 2", fds.len()))?;
    let limited = match confinement.limits.describe() {
        Some(limits) => Some((File::from(stderr.try_clone().map_err(|e| e.to_string())?), limits)),
        None => None,
    };
    let mut sh = Command::new(SH);
    sh.arg("-c")
        .arg(&run.command)
        .env_clear()
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        // Its own process group, so the whole tree can be signalled at once.
        .process_group(0);
    if let Some(dir) = &run.workdir {
        sh.current_dir(dir);
    }
    if confinement != Confinement::default() {
        let applied = confinement.clone();
        // std enters the folder as the agent's user. Once dropped to the command's user,
        // enter it again by its path: a folder that user could not reach (under a folder
        // closed to it) fails the start instead of being handed to the command open.
        let workdir = match (&confinement.identity, &run.workdir) {
            (Some(_), Some(dir)) => std::ffi::CString::new(dir.as_os_str().as_bytes()).ok(),
            _ => None,
        };
        // SAFETY: `apply` makes only async-signal-safe calls (signal, setrlimit, setgroups,
        // setgid, setuid, prctl, capset), and chdir is one too.
        unsafe {
            sh.pre_exec(move || {
                applied.apply()?;
                if let Some(dir) = &workdir {
                    if libc::chdir(dir.as_ptr()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
    }
    let child = sh.spawn().map_err(|e| format!("could not start sh: {e}"))?;
    Ok((child, limited))
}

/// The command's stderr and its limits, in words, when it has any.
type Limited = Option<(File, String)>;

/// Waits for `sh`, kills whatever it left, and reports. A guard that could not kill it all
/// exits after its report: the agent sweeps what is left, and starts a new guard.
fn await_exit(mut child: std::process::Child, limited: Limited, replies: &Mutex<UnixStream>) {
    let status = child.wait();
    let clean = kill_descendants();
    let reply = match status {
        Ok(status) => {
            if let (false, Some((stderr, limits))) = (status.success(), &limited) {
                // An error from a limit ("Resource temporarily unavailable", "Cannot allocate
                // memory") does not say which setting it was: this line does.
                let _ = writeln!(&*stderr, "taskexec: the command ran with the limits {limits}");
            }
            Reply::Exited { code: status.code(), signal: status.signal(), clean }
        }
        Err(_) => Reply::Exited { code: None, signal: None, clean },
    };
    // The command's output ends here: the agent waits for the pipes to close.
    drop(limited);
    if say(replies, &reply).is_err() || !clean {
        quit();
    }
}

/// Ends the guard from any of its threads (`exit` is not safe to call from two at once, and
/// there is nothing to flush).
fn quit() -> ! {
    // SAFETY: _exit ends the process at once; no other precondition.
    unsafe { libc::_exit(125) }
}

fn me() -> libc::pid_t {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

fn agent_alive(agent: libc::pid_t) -> bool {
    // SAFETY: getppid cannot fail.
    unsafe { libc::getppid() == agent }
}

/// SIGKILLs every descendant and reaps them, until none is left (a descendant may fork while
/// it is being killed). False when some were still there after the last round.
fn kill_descendants() -> bool {
    for _ in 0..20 {
        reap();
        // Every live descendant has a live ancestor among our children (orphans are re-parented
        // to us), so no child at all means nothing to kill, and no walk through /proc.
        if !has_children() {
            return true;
        }
        let descendants = descendants_of(me());
        if descendants.is_empty() {
            reap();
            return true;
        }
        for (pid, _) in descendants {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        reap();
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Passes `signal` on to descendants outside the process group of the command `sh` leads.
fn signal_strays(signal: libc::c_int, command: Option<libc::pid_t>) {
    for (pid, pgid) in descendants_of(me()) {
        if Some(pgid) != command {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// Sets every signal the guard inherited as ignored back to its default, before the guard's
/// own handlers go in: `sh` and the command start with default signals (an exec keeps ignored
/// ones), whatever the agent's parent ignored.
fn reset_signals() {
    // SIGPIPE stays: Rust ignores it in this process, and std gives children the default.
    for signal in 1..libc::SIGRTMAX() {
        if ![libc::SIGKILL, libc::SIGSTOP, libc::SIGPIPE].contains(&signal) {
            // SAFETY: signal() with SIG_DFL only changes this process's dispositions.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
}

/// Gives up the controlling terminal the agent may have (started by hand in a shell), so that
/// a command cannot open `/dev/tty` and type into the operator's shell. Without one, nothing.
fn leave_terminal() {
    // SAFETY: open of a constant path, an ioctl without argument on the descriptor, and its close.
    unsafe {
        let tty = libc::open(c"/dev/tty".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if tty >= 0 {
            libc::ioctl(tty, libc::TIOCNOTTY);
            libc::close(tty);
        }
    }
}
