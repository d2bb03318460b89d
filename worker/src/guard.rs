//! The guard: the leader of a task's process group, between the agent and `sh -c`. When the
//! agent dies, even by SIGKILL, the kernel sends the guard SIGHUP (a parent-death signal) and
//! the guard kills the whole group, so no command outlives its agent and a requeued task never
//! runs twice on one host. A per-process parent-death signal on `sh` alone would not do: it is
//! not inherited by the command's own children.
//!
//! The guard is this same binary, started as `taskexec-worker __guard <agent pid> <command>`.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

/// The first argument that turns the binary into a guard.
pub const ARG: &str = "__guard";

/// Runs the guard when the arguments ask for it; `None` otherwise.
pub fn run_if_requested() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [flag, agent, command] if flag == ARG => Some(run(agent, command)),
        _ => None,
    }
}

fn run(agent: &OsString, command: &OsString) -> ExitCode {
    let agent: libc::pid_t = agent.to_str().and_then(|s| s.parse().ok()).unwrap_or(-1);
    // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number has no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, SIGHUP as libc::c_ulong, 0, 0, 0);
    }
    // The agent may have died before the request above took effect.
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } != agent {
        return ExitCode::from(125);
    }
    // TERM, INT and QUIT sent to the group are meant for the command: the guard only notes
    // them (handlers, unlike ignored signals, are reset for `sh` at exec). HUP means the agent
    // is gone.
    let Ok(mut signals) = Signals::new([SIGHUP, SIGTERM, SIGINT, SIGQUIT]) else {
        return ExitCode::from(125);
    };
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal == SIGHUP {
                kill_own_group();
            }
        }
    });
    let status = match Command::new("sh").arg("-c").arg(command).status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("taskexec: could not start sh: {e}");
            return ExitCode::from(127);
        }
    };
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => {
            // End the way the command ended, so the agent reports the same signal.
            let _ = signal_hook::low_level::emulate_default_handler(signal);
            ExitCode::from(128 + signal as u8)
        }
        (None, None) => ExitCode::from(125),
    }
}

fn kill_own_group() {
    // SAFETY: signals our own process group, this process included.
    unsafe {
        libc::kill(0, libc::SIGKILL);
    }
}
