//! The guard: the leader of a task's process group, between the agent and `sh -c`. It makes
//! sure that no process of the task outlives it:
//!
//! - When the agent dies, even by SIGKILL, the kernel sends the guard SIGHUP (a parent-death
//!   signal) and the guard kills every descendant. A parent-death signal on `sh` alone would
//!   not do: it is not inherited by the command's own children.
//! - It is a child subreaper: descendants orphaned by their parent's exit (`cmd &`, or
//!   `setsid cmd &`, which also leaves the process group) are re-parented to the guard rather
//!   than to init, so it can find them all by walking /proc.
//! - When `sh` exits, the guard kills what is left; SIGUSR1 (which the agent sends to the
//!   group after the kill grace) kills everything now; SIGTERM (which the agent sends to the
//!   group first) is passed on to descendants that left the group.
//!
//! - It runs as the agent's user (root, with `RUN_AS`), and only `sh` drops to the command's
//!   user, limits and descriptors (see `isolation`): a command cannot signal its guard.
//!
//! The guard is this same binary, started as
//! `taskexec-worker __guard <agent pid> <confinement> <command>`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::isolation::{close_on_exec_from_3, Confinement};
use crate::procs::{descendants_of, has_children, reap};

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

/// The first argument that turns the binary into a guard.
pub const ARG: &str = "__guard";

/// Runs the guard when the arguments ask for it; `None` otherwise.
pub fn run_if_requested() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [flag, agent, confinement, command] if flag == ARG => {
            Some(run(agent, confinement, command))
        }
        _ => None,
    }
}

fn run(agent: &OsString, confinement: &OsString, command: &OsString) -> ExitCode {
    let agent: libc::pid_t = agent.to_str().and_then(|s| s.parse().ok()).unwrap_or(-1);
    let Some(confinement) = confinement.to_str().and_then(Confinement::decode) else {
        eprintln!("taskexec: the guard's confinement argument is malformed");
        return ExitCode::from(125);
    };
    // Whatever this process inherited beyond 0, 1 and 2 stays out of the command, and so do
    // ignored signals (nohup, Python) and the operator's terminal.
    close_on_exec_from_3();
    reset_signals();
    leave_terminal();
    // SAFETY: prctl with these options only changes attributes of this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, SIGHUP as libc::c_ulong, 0, 0, 0);
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    // The agent may have died before the parent-death signal was armed.
    if !agent_alive(agent) {
        return ExitCode::from(125);
    }
    let Ok(mut signals) = Signals::new([SIGHUP, SIGTERM, SIGINT, SIGQUIT, SIGUSR1]) else {
        return ExitCode::from(125);
    };
    std::thread::spawn(move || {
        for signal in signals.forever() {
            match signal {
                // HUP from anyone but the kernel's parent-death notice is the command's own
                // business: only act when the agent is really gone.
                SIGHUP if agent_alive(agent) => {}
                SIGHUP | SIGUSR1 => {
                    kill_descendants();
                    std::process::exit(KILLED.into());
                }
                // The group already got it; descendants that left the group did not.
                _ => signal_strays(signal),
            }
        }
    });
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(command);
    // Without a user or limits to apply, no hook: std then starts `sh` with posix_spawn, which
    // costs less than a fork on every task.
    if confinement != Confinement::default() {
        let applied = confinement.clone();
        // The agent started this guard in the command's directory, as the agent's user. Once
        // dropped to the command's user, enter it again by its path: a directory that user
        // could not reach (under a folder closed to it) fails the start instead of being
        // handed to the command open.
        let workdir = match &confinement.identity {
            Some(_) => std::env::current_dir()
                .ok()
                .and_then(|dir| std::ffi::CString::new(dir.into_os_string().into_vec()).ok()),
            None => None,
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
    let status = match sh.status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("taskexec: could not start sh: {e}");
            return ExitCode::from(127);
        }
    };
    kill_descendants();
    if !status.success() {
        if let Some(limits) = confinement.limits.describe() {
            // An error from a limit ("Resource temporarily unavailable", "Cannot allocate
            // memory") does not say which setting it was: this line does.
            eprintln!("taskexec: the command ran with the limits {limits}");
        }
    }
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => {
            // End the way the command ended, so the agent reports the same signal, without
            // leaving a core dump of the guard behind.
            let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: setrlimit with a valid pointer; affects only this process.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            let _ = signal_hook::low_level::emulate_default_handler(signal);
            ExitCode::from(128 + signal as u8)
        }
        (None, None) => ExitCode::from(125),
    }
}

/// The guard's exit code when told to kill everything (128 + SIGKILL, as a shell reports it).
/// Its clean-up gives up after a bound (a fork bomb outrunning it), so the agent sweeps after
/// this exit too.
pub const KILLED: u8 = 137;

fn agent_alive(agent: libc::pid_t) -> bool {
    // SAFETY: getppid cannot fail.
    unsafe { libc::getppid() == agent }
}

/// SIGKILLs every descendant and reaps them, until none is left (a descendant may fork while
/// it is being killed).
fn kill_descendants() {
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    for _ in 0..20 {
        reap();
        // Every live descendant has a live ancestor among our children (orphans are re-parented
        // to us), so no child at all means nothing to kill, and no walk through /proc.
        if !has_children() {
            return;
        }
        let descendants = descendants_of(me);
        if descendants.is_empty() {
            return;
        }
        for (pid, _) in descendants {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        reap();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Passes `signal` on to descendants outside the guard's process group.
fn signal_strays(signal: libc::c_int) {
    // SAFETY: getpid and getpgrp cannot fail.
    let (me, group) = unsafe { (libc::getpid(), libc::getpgrp()) };
    for (pid, pgid) in descendants_of(me) {
        if pgid != group {
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
