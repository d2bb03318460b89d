//! What keeps a command away from its agent and from the tasks after it: the user it runs as
//! (`RUN_AS`), its resource limits (`TASK_MAX_*`), its environment (an allowlist) and its open
//! descriptors (0, 1 and 2 only). The agent resolves the settings at start and hands them to
//! the guard with each command, in one field; the guard applies them between fork and exec
//! of `sh`.

use std::ffi::CString;
use std::path::PathBuf;

use crate::Error;

/// The user commands run as (`RUN_AS`), resolved at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Its supplementary groups, its primary group included.
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

impl RunAs {
    /// Looks `user` (a name or a numeric uid) up in the user database. Root, or the agent's
    /// own user, is refused: commands would then reach the agent as before.
    pub fn resolve(user: &str) -> Result<RunAs, Error> {
        use nix::unistd::{Uid, User};
        let bad = |why: String| Error::Config(format!("RUN_AS={user:?} {why}"));
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        };
        let found = found
            .map_err(|e| bad(format!("cannot be looked up: {e}")))?
            .ok_or_else(|| bad("is not a user of this system".into()))?;
        if found.uid.is_root() {
            return Err(bad("is root: commands must run as an unprivileged user".into()));
        }
        // Every process of the user is killed after each task: not a user other services share.
        if found.name == "nobody" || found.gid.as_raw() == 0 {
            return Err(bad(
                "is shared (nobody) or in group root: give the agent a user of its own".into(),
            ));
        }
        // SAFETY: getuid cannot fail.
        if found.uid.as_raw() == unsafe { libc::getuid() } {
            return Err(bad("is the agent's own user: a command could reach the agent".into()));
        }
        let name = CString::new(found.name.clone()).map_err(|_| bad("has a NUL byte".into()))?;
        let groups = nix::unistd::getgrouplist(&name, found.gid)
            .map_err(|e| bad(format!("groups cannot be listed: {e}")))?;
        Ok(RunAs {
            name: found.name,
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
            groups: groups.into_iter().map(|g| g.as_raw()).collect(),
            home: found.dir,
        })
    }

    /// Where its commands start: its home if it is a folder, else `/`.
    pub fn workdir(&self) -> PathBuf {
        if self.home.is_dir() {
            self.home.clone()
        } else {
            PathBuf::from("/")
        }
    }
}

/// Limits set on each command with setrlimit (soft and hard alike, so it cannot raise them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// `TASK_MAX_PROCESSES`: RLIMIT_NPROC, the processes of the command's user; exact when
    /// that user is the agent's own `RUN_AS` user.
    pub processes: Option<u64>,
    /// `TASK_MAX_MEMORY`: RLIMIT_AS, the address space of each process, in bytes.
    pub memory: Option<u64>,
    /// `TASK_MAX_OPEN_FILES`: RLIMIT_NOFILE.
    pub open_files: Option<u64>,
    /// `TASK_MAX_FILE_SIZE`: RLIMIT_FSIZE, in bytes; a write past it gets SIGXFSZ.
    pub file_size: Option<u64>,
}

impl Limits {
    fn each(&self) -> [(&'static str, &'static str, Option<u64>); 4] {
        [
            ("nproc", "TASK_MAX_PROCESSES", self.processes),
            ("as", "TASK_MAX_MEMORY", self.memory),
            ("nofile", "TASK_MAX_OPEN_FILES", self.open_files),
            ("fsize", "TASK_MAX_FILE_SIZE", self.file_size),
        ]
    }

    /// The limits in force, in words, for an error: `TASK_MAX_PROCESSES=64, ...`.
    pub fn describe(&self) -> Option<String> {
        let set: Vec<String> = self
            .each()
            .into_iter()
            .filter_map(|(_, setting, value)| value.map(|v| format!("{setting}={v}")))
            .collect();
        (!set.is_empty()).then(|| set.join(", "))
    }
}

/// What the guard applies to `sh`, written as one field of numbers only:
/// `uid=N,gid=N,groups=N:N,nproc=N,as=N,nofile=N,fsize=N` (each part optional).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confinement {
    /// uid, gid and supplementary groups to drop to.
    pub identity: Option<(u32, u32, Vec<u32>)>,
    pub limits: Limits,
}

impl Confinement {
    pub fn new(run_as: Option<&RunAs>, limits: Limits) -> Confinement {
        Confinement { identity: run_as.map(|r| (r.uid, r.gid, r.groups.clone())), limits }
    }

    pub fn encode(&self) -> String {
        let mut parts = Vec::new();
        if let Some((uid, gid, groups)) = &self.identity {
            let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
            parts.extend([format!("uid={uid}"), format!("gid={gid}")]);
            parts.push(format!("groups={}", groups.join(":")));
        }
        for (key, _, value) in self.limits.each() {
            if let Some(value) = value {
                parts.push(format!("{key}={value}"));
            }
        }
        parts.join(",")
    }

    pub fn decode(text: &str) -> Option<Confinement> {
        let mut confinement = Confinement::default();
        let (mut uid, mut gid, mut groups) = (None, None, Vec::new());
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=')?;
            match key {
                "uid" => uid = Some(value.parse().ok()?),
                "gid" => gid = Some(value.parse().ok()?),
                "groups" => {
                    groups = value
                        .split(':')
                        .filter(|g| !g.is_empty())
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .ok()?
                }
                "nproc" => confinement.limits.processes = Some(value.parse().ok()?),
                "as" => confinement.limits.memory = Some(value.parse().ok()?),
                "nofile" => confinement.limits.open_files = Some(value.parse().ok()?),
                "fsize" => confinement.limits.file_size = Some(value.parse().ok()?),
                _ => return None,
            }
        }
        confinement.identity = match (uid, gid) {
            (Some(uid), Some(gid)) => Some((uid, gid, groups)),
            (None, None) => None,
            _ => return None,
        };
        Some(confinement)
    }

    /// Applies the limits, then drops to the user: in the child, between fork and exec.
    ///
    /// # Safety
    /// Only async-signal-safe calls: this runs in a forked child of a threaded process.
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        // Signal dispositions need nothing here: the guard reset the ignored ones at its start
        // (`guard::reset_signals`), and std clears the mask in the child.
        let limits = [
            (libc::RLIMIT_NPROC, self.limits.processes),
            (libc::RLIMIT_AS, self.limits.memory),
            (libc::RLIMIT_NOFILE, self.limits.open_files),
            (libc::RLIMIT_FSIZE, self.limits.file_size),
        ];
        for (resource, value) in limits {
            if let Some(value) = value {
                let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        if let Some((uid, gid, groups)) = &self.identity {
            // Groups first, then the gid, then the uid: after setuid nothing else may change.
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(*gid) != 0
                || libc::setuid(*uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // A non-root agent with CAP_SETUID keeps its capabilities across setuid (only
            // leaving uid 0 clears them): drop them all, ambient and inheritable included, and
            // let nothing exec'd gain new ones (setuid binaries, file capabilities).
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
            let header: [u32; 2] = [0x2008_0522, 0]; // _LINUX_CAPABILITY_VERSION_3, this process
            let none = [0u32; 6];
            if libc::syscall(libc::SYS_capset, header.as_ptr(), none.as_ptr()) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Make sure the drop cannot be undone.
            if libc::setuid(0) == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        Ok(())
    }
}

/// Marks every descriptor from 3 up close-on-exec, so that a command inherits only 0, 1 and 2
/// whatever the agent was started with (an init that leaves a root-only file open, say).
pub fn close_on_exec_from_3() {
    // SAFETY: close_range only changes descriptor flags of this process.
    let done = unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) == 0
    };
    if done {
        return;
    }
    // Before Linux 5.11: one by one, from the list of open descriptors.
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= 3)
        .collect();
    for fd in open {
        // SAFETY: fcntl on a descriptor number; a closed one yields EBADF, ignored.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Which of CAP_SETUID, CAP_SETGID and CAP_KILL the agent lacks (from its effective set).
pub fn missing_capabilities() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    // Bit numbers from linux/capability.h.
    [("CAP_SETUID", 7), ("CAP_SETGID", 6), ("CAP_KILL", 5)]
        .into_iter()
        .filter(|(_, bit)| effective & (1 << bit) == 0)
        .map(|(name, _)| name)
        .collect()
}

/// Names always kept from a command's environment, whatever `TASK_ENV_ALLOW` says.
const NEVER: [&str; 4] = ["AGENT_TOKEN", "AGENT_TOKEN_FILE", "ROCKET_AGENT_TOKEN", "DATABASE_URL"];

/// Whether a variable of the agent's reaches a command: `PATH`, `HOME`, `LANG`, `LC_*`, `TZ`
/// and what `allow` names (a name, or a `PREFIX*` pattern), never the agent's credentials.
pub fn is_passed(name: &str, allow: &[String]) -> bool {
    let matches = |pattern: &str| match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    };
    let base = ["PATH", "HOME", "LANG", "TZ"].contains(&name) || name.starts_with("LC_");
    !NEVER.contains(&name) && (base || allow.iter().any(|p| matches(p)))
}

/// The environment commands run with: the agent's variables that `is_passed` lets through;
/// with `RUN_AS`, that user's `HOME`, `USER` and `LOGNAME`.
pub fn command_env(
    vars: impl Iterator<Item = (String, String)>,
    allow: &[String],
    run_as: Option<&RunAs>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vars.filter(|(name, _)| is_passed(name, allow)).collect();
    if !env.iter().any(|(name, _)| name == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    if let Some(user) = run_as {
        env.retain(|(name, _)| !["HOME", "USER", "LOGNAME"].contains(&name.as_str()));
        env.push(("HOME".into(), user.home.to_string_lossy().into_owned()));
        env.push(("USER".into(), user.name.clone()));
        env.push(("LOGNAME".into(), user.name.clone()));
    }
    env
}

/// Whether a task's `env` may not set `name` unless the agent allows it (`TASK_ENV_OVERRIDE`):
/// the variables that decide which programs a command runs and what is loaded into them
/// (`PATH`, `LD_*`, the shell's `ENV`, `BASH_ENV` and `IFS`), and those that say whose the
/// command is (`HOME`, `USER`, `LOGNAME`, `SHELL`). The agent's operator chose them (or
/// `RUN_AS` did); a task that could replace them could run other binaries than the operator
/// installed, or preload a library into every process of the command.
pub fn is_protected(name: &str) -> bool {
    const PROTECTED: [&str; 8] =
        ["PATH", "HOME", "USER", "LOGNAME", "SHELL", "IFS", "ENV", "BASH_ENV"];
    PROTECTED.contains(&name) || name.starts_with("LD_")
}

/// Whether the dynamic loader reads `name` (`LD_*`, `GLIBC_TUNABLES`).
fn is_loader_variable(name: &str) -> bool {
    name.starts_with("LD_") || name == "GLIBC_TUNABLES"
}

/// A command's environment: the agent's (`base`, from `command_env`) with the task's `env`
/// added over it. A task that sets a protected variable the agent does not let it override
/// is refused, with the names, rather than run in an environment it did not ask for.
pub fn with_task_env(
    base: &[(String, String)],
    task: &std::collections::BTreeMap<String, String>,
    overridable: &[String],
) -> Result<Vec<(String, String)>, String> {
    // The dynamic loader's variables are never a task's to set, whatever the agent allows:
    // they would load a library of the task's choosing into every binary the operator
    // installed, `sh` first.
    let refused: Vec<&str> = task
        .keys()
        .filter(|name| {
            is_loader_variable(name) || (is_protected(name) && !overridable.contains(name))
        })
        .map(String::as_str)
        .collect();
    if !refused.is_empty() {
        return Err(format!(
            "the task sets {}, which this agent does not let a task override (TASK_ENV_OVERRIDE)",
            refused.join(", ")
        ));
    }
    let mut env: Vec<(String, String)> =
        base.iter().filter(|(name, _)| !task.contains_key(name)).cloned().collect();
    env.extend(task.iter().map(|(name, value)| (name.clone(), value.clone())));
    Ok(env)
}

/// A size such as `512M`, `2GiB` or `1048576` (bytes; K, M, G are powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// The one warning an agent without `RUN_AS` logs at start.
pub const SHARED_USER_WARNING: &str = "RUN_AS is not set: commands run as the agent's own user, \
    so a command can read files the agent can read (AGENT_TOKEN_FILE included), read the \
    environment of other processes of that user (the agent's parent's, in a container), and \
    signal or stop the agent's other processes. Set RUN_AS to a user of its own (the agent then \
    needs root, or CAP_SETUID, CAP_SETGID and CAP_KILL) to keep commands away from the agent";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_env_adds_to_the_agents_but_protected_names_need_the_agents_leave() {
        let base = vec![("PATH".to_owned(), "/usr/bin".to_owned())];
        let env = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let added = with_task_env(&base, &env(&[("MODE", "fast")]), &[]).unwrap();
        assert_eq!(added.len(), 2);
        let why = with_task_env(&base, &env(&[("PATH", "/tmp")]), &[]).unwrap_err();
        assert!(why.contains("PATH"), "{why}");
        let path = with_task_env(&base, &env(&[("PATH", "/tmp")]), &["PATH".to_owned()]).unwrap();
        assert_eq!(path, [("PATH".to_owned(), "/tmp".to_owned())]);
        // The loader's variables, never, even when the agent lists them.
        for name in ["LD_PRELOAD", "GLIBC_TUNABLES"] {
            let allowed = [name.to_owned()];
            assert!(with_task_env(&base, &env(&[(name, "x")]), &allowed).is_err(), "{name}");
        }
    }

    #[test]
    fn a_confinement_goes_through_its_field_unchanged() {
        let limits =
            Limits { processes: Some(64), memory: None, open_files: Some(256), file_size: Some(9) };
        for identity in [None, Some((1000, 1001, vec![1001, 27])), Some((5, 6, vec![]))] {
            let confinement = Confinement { identity, limits };
            assert_eq!(Confinement::decode(&confinement.encode()), Some(confinement));
        }
        assert_eq!(Confinement::decode(""), Some(Confinement::default()));
        for bad in ["uid=1", "uid=x,gid=1", "shell=1", "nproc"] {
            assert_eq!(Confinement::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_allowed_variables_reach_a_command() {
        let vars = [
            "PATH",
            "HOME",
            "LANG",
            "LC_ALL",
            "TZ",
            "DB_PASS",
            "APIKEY",
            "AWS_ACCESS_KEY_ID",
            "SENTRY_DSN",
            "REDIS_URL",
            "GITHUB_PAT",
            "AGENT_TOKEN",
            "CI_JOB",
            "BUILD_ID",
        ]
        .map(|name| (name.to_owned(), "v".to_owned()));
        let allow = ["CI_*".to_owned(), "BUILD_ID".to_owned(), "AGENT_*".to_owned()];
        let env = command_env(vars.into_iter(), &allow, None);
        let names: Vec<&str> = env.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "CI_JOB", "BUILD_ID"]);
    }

    #[test]
    fn run_as_sets_the_users_home() {
        let user = RunAs {
            name: "runner".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: "/home/runner".into(),
        };
        let vars = [("HOME".to_owned(), "/root".to_owned())];
        let env = command_env(vars.into_iter(), &[], Some(&user));
        assert!(env.contains(&("HOME".into(), "/home/runner".into())), "{env:?}");
        assert!(env.contains(&("USER".into(), "runner".into())), "{env:?}");
        assert!(env.iter().any(|(name, _)| name == "PATH"), "a default PATH: {env:?}");
    }

    #[test]
    fn root_cannot_be_the_run_as_user() {
        assert!(matches!(RunAs::resolve("root"), Err(Error::Config(m)) if m.contains("root")));
        assert!(matches!(RunAs::resolve("0"), Err(Error::Config(_))));
        assert!(RunAs::resolve("no-such-user-here").is_err());
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("x"), None);
    }
}
