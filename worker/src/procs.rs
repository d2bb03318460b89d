//! The processes of a task, found through /proc: the guard's descendants, a run-as user's
//! processes, and whether a signal's sender is one of the agent's own commands. Shared by the
//! guard and the agent, which both make sure that nothing of a task outlives it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// One live process: its id, parent and process group.
#[derive(Clone, Copy, Debug)]
struct Entry {
    pid: libc::pid_t,
    ppid: libc::pid_t,
    pgid: libc::pid_t,
}

/// The ids of every process, as /proc lists them.
fn pids() -> impl Iterator<Item = libc::pid_t> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<libc::pid_t>().ok())
}

/// Every live process (zombies left out).
fn all() -> Vec<Entry> {
    pids().filter_map(read).collect()
}

fn read(pid: libc::pid_t) -> Option<Entry> {
    read_any(pid).filter(|(_, zombie)| !zombie).map(|(entry, _)| entry)
}

/// A process, zombie or not (and whether it is one).
fn read_any(pid: libc::pid_t) -> Option<(Entry, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state, ppid, pgrp.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let zombie = *fields.first()? == "Z";
    let entry =
        Entry { pid, ppid: fields.get(1)?.parse().ok()?, pgid: fields.get(2)?.parse().ok()? };
    Some((entry, zombie))
}

/// The real uid of `pid`, from its status: not the owner of /proc/<pid>, which a process can
/// turn to root by making itself undumpable.
fn real_uid(pid: libc::pid_t) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Live descendants of `root`, with their process group.
pub fn descendants_of(root: libc::pid_t) -> Vec<(libc::pid_t, libc::pid_t)> {
    descendants_except(root, &HashSet::new())
}

/// Live descendants of `root`, with their process group, leaving out the children of `root`
/// in `spared` and everything under them.
fn descendants_except(
    root: libc::pid_t,
    spared: &HashSet<libc::pid_t>,
) -> Vec<(libc::pid_t, libc::pid_t)> {
    let mut children: HashMap<libc::pid_t, Vec<Entry>> = HashMap::new();
    for entry in all() {
        children.entry(entry.ppid).or_default().push(entry);
    }
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for entry in children.get(&parent).into_iter().flatten() {
            if parent == root && spared.contains(&entry.pid) {
                continue;
            }
            found.push((entry.pid, entry.pgid));
            frontier.push(entry.pid);
        }
    }
    found
}

/// Whether `pid` descends from `ancestor`.
pub fn descends_from(pid: libc::pid_t, ancestor: libc::pid_t) -> bool {
    let mut current = pid;
    // A chain of parents is short; the bound only guards against a loop read mid-change.
    for _ in 0..4096 {
        // A zombie counts: a `kill` that has just exited still has its parent.
        match read_any(current).map(|(entry, _)| entry) {
            Some(entry) if entry.ppid == ancestor => return true,
            Some(entry) if entry.ppid > 1 => current = entry.ppid,
            _ => return false,
        }
    }
    false
}

/// What a sweep is after: this agent's descendants outside the live guards (what a guard that
/// died left behind: orphans come back to the agent, a subreaper), or every process of a user.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// The agent's descendants, but for the live guards in the set and theirs: the commands
    /// of the agent's other slots.
    Orphans(&'a HashSet<libc::pid_t>),
    User(u32),
}

impl Scope<'_> {
    fn members(self) -> Vec<libc::pid_t> {
        match self {
            Scope::Orphans(guards) => {
                // SAFETY: getpid cannot fail.
                let me = unsafe { libc::getpid() };
                descendants_except(me, guards).into_iter().map(|(p, _)| p).collect()
            }
            Scope::User(uid) => {
                all().into_iter().map(|e| e.pid).filter(|p| real_uid(*p) == Some(uid)).collect()
            }
        }
    }
}

/// SIGKILLs every process in `scope` and reaps those of them that are our children, until
/// none is left (a process may fork while it is being killed). Returns how many processes
/// were killed. Only the processes it killed are reaped: a guard of another slot is waited
/// for by its own slot, which must get its status.
pub fn sweep(scope: Scope<'_>) -> usize {
    let mut killed = HashSet::new();
    for round in 0..50 {
        reap_some(&killed);
        let members = scope.members();
        if members.is_empty() {
            if let Scope::Orphans(guards) = scope {
                reap_orphans(guards);
            }
            return killed.len();
        }
        for pid in &members {
            // SAFETY: kill only sends a signal.
            if unsafe { libc::kill(*pid, libc::SIGKILL) } == 0 {
                killed.insert(*pid);
            }
        }
        reap_some(&killed);
        std::thread::sleep(Duration::from_millis(if round < 10 { 2 } else { 20 }));
    }
    log::warn!("processes of a task survived 50 rounds of SIGKILL: {:?}", scope.members());
    killed.len()
}

/// Collects the zombies among this agent's children that are not the live `guards` (whose
/// slots wait for them): orphans of a dead guard that exited by themselves, or that its guard
/// had not reaped before it died. Called with the guards' registry held.
fn reap_orphans(guards: &HashSet<libc::pid_t>) {
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    for pid in pids().filter(|pid| !guards.contains(pid)) {
        if let Some((found, true)) = read_any(pid) {
            if found.ppid == me {
                let mut status = 0;
                // SAFETY: waitpid with WNOHANG on a zombie child of ours.
                unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            }
        }
    }
}

/// Collects the exit status of those of `pids` that are finished children of ours (killed
/// orphans, re-parented to us).
fn reap_some(pids: &HashSet<libc::pid_t>) {
    for &pid in pids {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG and a valid pointer; a pid that is not our child
        // yields ECHILD.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    }
}

/// Whether this process is a child subreaper (the agent is): orphans of its descendants come
/// back to it.
pub fn is_subreaper() -> bool {
    let mut flag: libc::c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes an int through the valid pointer.
    let read = unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut flag as *mut libc::c_int) };
    read == 0 && flag != 0
}

/// Collects the exit status of any finished child (orphans re-parented to us included).
pub fn reap() {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG and a valid pointer.
    while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
}

/// Whether this process has a child, finished or not.
pub fn has_children() -> bool {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG and a valid pointer; -1 with ECHILD means no children.
    unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) != -1 }
}
