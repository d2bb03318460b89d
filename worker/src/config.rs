//! The agent's settings, all from the environment.

use std::env;
use std::time::Duration;

use secrecy::SecretString;
use taskexec_protocol::logline::LogFormat;

use crate::isolation::{parse_size, Limits, RunAs};
use crate::Error;

#[derive(Clone, Debug)]
pub struct Config {
    /// Base URLs of the API: `BACKEND_API_URL` (several, comma-separated, are tried in turn
    /// when one fails), or `http://BACKEND_API_HOST:BACKEND_API_PORT` (defaults localhost and
    /// 3500).
    pub api_urls: Vec<String>,
    /// `AGENT_TOKEN`, or the contents of the file `AGENT_TOKEN_FILE` names (for Docker
    /// secrets); required. Never logged, never passed to a command.
    pub token: SecretString,
    /// `AGENT_NAME`, default the host name. Sent as `X-Agent-Name` and recorded on the task.
    pub name: String,
    /// `POLL_INTERVAL` (default 5s): the pause, with jitter, after the API could not be
    /// reached, and the upper bound of the retry backoff of a finish.
    pub poll_interval: Duration,
    /// `PICK_WAIT` (default 25s): how long the server may hold a pick. The HTTP read timeout
    /// of a pick is this plus `PICK_READ_MARGIN`, so the agent never gives up first. Zero:
    /// no long poll, a pick every `POLL_INTERVAL`.
    pub pick_wait: Duration,
    /// `DRAIN_TIMEOUT` (default 30s): after SIGTERM, how long the running task may go on before
    /// it is stopped and handed back to the queue.
    pub drain_timeout: Duration,
    /// `LOG_LEVEL` (default info).
    pub log_level: log::LevelFilter,
    /// `LOG_FORMAT`: text (default) or json lines.
    pub log_format: LogFormat,
    /// `BACKEND_API_CA_FILE`: PEM certificates trusted besides the system's roots, for an API
    /// behind a private CA (read at start, so that a wrong path stops the agent at once).
    pub ca_certs: Option<Vec<u8>>,
    /// `CONCURRENCY` (default 1, at most 64): how many commands the agent runs at once, each
    /// in a slot of its own with its own lease, heartbeats, output and drain.
    pub concurrency: usize,
    /// `RUN_AS`, by slot: the user (name or uid) a slot's commands run as, and whose every
    /// process is killed when its task ends; a user of this agent's own. With more than one
    /// slot it names one user per slot (`taskexec-run-{slot}`), so that the commands of two
    /// slots cannot reach each other. Empty: the agent's own user.
    pub run_as: Vec<RunAs>,
    /// `TASK_ENV_ALLOW`: the agent's variables passed to commands besides `PATH`, `HOME`,
    /// `LANG`, `LC_*` and `TZ`: comma-separated names or `PREFIX_*` patterns.
    pub env_allow: Vec<String>,
    /// `TASK_MAX_PROCESSES`, `TASK_MAX_MEMORY`, `TASK_MAX_OPEN_FILES`, `TASK_MAX_FILE_SIZE`.
    pub limits: Limits,
    /// `AGENT_TAGS`, comma-separated: the agent takes only tasks whose tags are all among
    /// these (untagged tasks always).
    pub tags: Vec<String>,
    /// `TASK_ENV_OVERRIDE`: the protected variables (`PATH`, `HOME`, `LD_*`, ...; see
    /// `isolation::is_protected`) that a task's `env` may set on this agent all the same.
    pub env_override: Vec<String>,
}

/// Beyond the server's hold, how long a pick may take: the server answers at most 5 s after
/// its hold when its database is slow, and the network gets the rest.
pub const PICK_READ_MARGIN: Duration = Duration::from_secs(15);

impl Config {
    pub fn from_env() -> Result<Config, Error> {
        Config::from_lookup(|name| env::var(name).ok().filter(|v| !v.is_empty()))
    }

    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Config, Error> {
        let api_urls: Vec<String> = match var("BACKEND_API_URL") {
            Some(urls) => urls
                .split(',')
                .map(|url| url.trim().trim_end_matches('/').to_owned())
                .filter(|url| !url.is_empty())
                .collect(),
            None => {
                let host = var("BACKEND_API_HOST").unwrap_or_else(|| "localhost".into());
                let port = var("BACKEND_API_PORT").unwrap_or_else(|| "3500".into());
                vec![format!("http://{host}:{port}")]
            }
        };
        if api_urls.is_empty() {
            return Err(Error::Config("BACKEND_API_URL holds no URL".into()));
        }
        let token =
            match (var("AGENT_TOKEN"), var("AGENT_TOKEN_FILE")) {
                (Some(token), _) => SecretString::from(token),
                (None, Some(path)) => std::fs::read_to_string(&path)
                    .map(|token| SecretString::from(token.trim()))
                    .map_err(|e| Error::Config(format!("AGENT_TOKEN_FILE={path:?}: {e}")))?,
                (None, None) => return Err(Error::Config(
                    "AGENT_TOKEN (or AGENT_TOKEN_FILE) is not set: the API would refuse every pick"
                        .into(),
                )),
            };
        let name = var("AGENT_NAME").unwrap_or_else(host_name);
        let concurrency = concurrency(&var)?;
        let ca_certs = match var("BACKEND_API_CA_FILE") {
            Some(path) => Some(ca_file(&path)?),
            None => None,
        };
        Ok(Config {
            api_urls,
            token,
            name,
            poll_interval: duration(&var, "POLL_INTERVAL", "5s")?,
            pick_wait: pick_wait(&var)?,
            drain_timeout: duration(&var, "DRAIN_TIMEOUT", "30s")?,
            log_level: match var("LOG_LEVEL") {
                Some(level) => level.parse().map_err(|_| {
                    Error::Config(format!(
                        "LOG_LEVEL={level:?}: expected error, warn, info, debug or trace"
                    ))
                })?,
                None => log::LevelFilter::Info,
            },
            log_format: match var("LOG_FORMAT") {
                Some(format) => format.parse().map_err(Error::Config)?,
                None => LogFormat::Text,
            },
            ca_certs,
            concurrency,
            run_as: run_as(&var, concurrency)?,
            env_allow: list(&var, "TASK_ENV_ALLOW"),
            tags: tags(&var)?,
            env_override: list(&var, "TASK_ENV_OVERRIDE"),
            limits: Limits {
                processes: limit(&var, "TASK_MAX_PROCESSES", 1, |t| t.trim().parse().ok())?,
                memory: limit(&var, "TASK_MAX_MEMORY", 16 << 20, parse_size)?,
                open_files: limit(&var, "TASK_MAX_OPEN_FILES", 16, |t| t.trim().parse().ok())?,
                file_size: limit(&var, "TASK_MAX_FILE_SIZE", 1, parse_size)?,
            },
        })
    }
}

/// A comma-separated list; empty items left out.
fn list(var: &impl Fn(&str) -> Option<String>, name: &str) -> Vec<String> {
    var(name)
        .map(|list| {
            list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect()
        })
        .unwrap_or_default()
}

/// `AGENT_TAGS`, sorted and without repeats; a tag the API would refuse stops the agent at
/// start.
fn tags(var: &impl Fn(&str) -> Option<String>) -> Result<Vec<String>, Error> {
    let mut tags = list(var, "AGENT_TAGS");
    if let Some(bad) = tags.iter().find(|tag| !taskexec_protocol::is_tag(tag)) {
        return Err(Error::Config(format!(
            "AGENT_TAGS: {bad:?} is not a tag (1 to 64 of a-z, 0-9, `_`, `.`, `-`, starting \
             with a letter or digit)"
        )));
    }
    tags.sort();
    tags.dedup();
    if tags.len() > 64 {
        return Err(Error::Config("AGENT_TAGS: at most 64 tags".into()));
    }
    Ok(tags)
}

/// `CONCURRENCY`: 1 to `MAX_PICK` slots.
fn concurrency(var: &impl Fn(&str) -> Option<String>) -> Result<usize, Error> {
    let Some(text) = var("CONCURRENCY") else { return Ok(1) };
    let max = taskexec_protocol::MAX_PICK;
    text.trim().parse().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
        Error::Config(format!("CONCURRENCY={text:?} must be a whole number from 1 to {max}"))
    })
}

/// `RUN_AS`, one user per slot: `{slot}` in it stands for the slot's number (from 0). Every
/// process of a slot's user is killed when its task ends, so two slots may not share one.
fn run_as(var: &impl Fn(&str) -> Option<String>, concurrency: usize) -> Result<Vec<RunAs>, Error> {
    let Some(pattern) = var("RUN_AS") else { return Ok(Vec::new()) };
    let pattern = pattern.trim();
    if concurrency > 1 && !pattern.contains("{slot}") {
        return Err(Error::Config(format!(
            "RUN_AS={pattern:?} must name a user per slot when CONCURRENCY is {concurrency}, \
             such as taskexec-run-{{slot}} ({{slot}} is 0 to {}): every process of a slot's \
             user is killed when its task ends",
            concurrency - 1
        )));
    }
    let users = (0..concurrency)
        .map(|slot| RunAs::resolve(&pattern.replace("{slot}", &slot.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut uids: Vec<u32> = users.iter().map(|u| u.uid).collect();
    uids.sort_unstable();
    uids.dedup();
    if uids.len() < users.len() {
        return Err(Error::Config(format!("RUN_AS={pattern:?} gives two slots the same user")));
    }
    Ok(users)
}

/// A `TASK_MAX_*` limit: unset is none; below `least` (a shell could not even start) or
/// unreadable is an error.
fn limit(
    var: &impl Fn(&str) -> Option<String>,
    name: &str,
    least: u64,
    parse: impl Fn(&str) -> Option<u64>,
) -> Result<Option<u64>, Error> {
    let Some(text) = var(name) else { return Ok(None) };
    match parse(&text) {
        Some(value) if value >= least => Ok(Some(value)),
        _ => Err(Error::Config(format!(
            "{name}={text:?} must be a number of at least {least} (sizes take K, M or G)"
        ))),
    }
}

/// A duration such as `5s`, `500ms` or `1m 30s` (humantime).
fn duration(
    var: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: &str,
) -> Result<Duration, Error> {
    let text = var(name).unwrap_or_else(|| default.into());
    humantime::parse_duration(&text).map_err(|e| {
        Error::Config(format!("{name}={text:?} is not a duration like 5s or 500ms: {e}"))
    })
}

/// `PICK_WAIT`: whole seconds up to an hour, and not above the API's `pick_wait_max_secs` (60
/// by default). Zero turns the long poll off: the agent then polls every `POLL_INTERVAL`, as
/// the original design did (the benchmark's reference).
fn pick_wait(var: &impl Fn(&str) -> Option<String>) -> Result<Duration, Error> {
    let wait = duration(var, "PICK_WAIT", "25s")?;
    if wait.subsec_nanos() != 0 || wait.as_secs() > 3600 {
        return Err(Error::Config(format!("PICK_WAIT={wait:?} must be whole seconds up to 1 h")));
    }
    Ok(wait)
}

fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    match String::from_utf8_lossy(&buffer[..end]).trim() {
        name if ok && !name.is_empty() => name.to_owned(),
        _ => "taskexec-worker".into(),
    }
}

/// The PEM certificates of `BACKEND_API_CA_FILE`: a file without one (empty, DER, a key) is
/// refused, rather than quietly trusting the system's roots alone.
fn ca_file(path: &str) -> Result<Vec<u8>, Error> {
    let bad = |why: String| Error::Config(format!("BACKEND_API_CA_FILE={path:?} {why}"));
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
    let mut certificates = 0;
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(_)) => certificates += 1,
            Ok(_) => {}
            Err(e) => return Err(bad(format!("is not valid PEM: {e}"))),
        }
    }
    if certificates == 0 {
        return Err(bad("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, Error> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn host_and_port_make_the_url_unless_a_url_is_given() {
        let c =
            config(&[("AGENT_TOKEN", "t"), ("BACKEND_API_HOST", "api"), ("BACKEND_API_PORT", "1")]);
        assert_eq!(c.unwrap().api_urls, ["http://api:1"]);
        let c = config(&[
            ("AGENT_TOKEN", "t"),
            ("BACKEND_API_URL", "http://x:2/"),
            ("BACKEND_API_HOST", "api"),
        ]);
        assert_eq!(c.unwrap().api_urls, ["http://x:2"]);
        let c = config(&[("AGENT_TOKEN", "t"), ("BACKEND_API_URL", "http://a:1, http://b:2/")]);
        assert_eq!(c.unwrap().api_urls, ["http://a:1", "http://b:2"]);
    }

    #[test]
    fn poll_interval_takes_human_durations() {
        let c = config(&[("AGENT_TOKEN", "t"), ("POLL_INTERVAL", "500ms")]).unwrap();
        assert_eq!(c.poll_interval, Duration::from_millis(500));
        assert_eq!(config(&[("AGENT_TOKEN", "t")]).unwrap().poll_interval, Duration::from_secs(5));
        assert!(config(&[("AGENT_TOKEN", "t"), ("POLL_INTERVAL", "soon")]).is_err());
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let path = std::env::temp_dir().join(format!("taskexec-ca-{}", std::process::id()));
        for (content, why) in [("", "no PEM certificate"), ("-----BEGIN PRIVATE KEY-----\n", "PEM")]
        {
            std::fs::write(&path, content).unwrap();
            let c =
                config(&[("AGENT_TOKEN", "t"), ("BACKEND_API_CA_FILE", path.to_str().unwrap())]);
            match c {
                Err(Error::Config(message)) => assert!(message.contains(why), "{message}"),
                other => panic!("{content:?} taken: {:?}", other.map(|_| ())),
            }
        }
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn limits_and_the_allowlist_are_read() {
        let c = config(&[
            ("AGENT_TOKEN", "t"),
            ("TASK_MAX_PROCESSES", "64"),
            ("TASK_MAX_MEMORY", "1G"),
            ("TASK_ENV_ALLOW", "CI_*, BUILD_ID,"),
        ])
        .unwrap();
        assert_eq!(c.limits.processes, Some(64));
        assert_eq!(c.limits.memory, Some(1 << 30));
        assert_eq!(c.limits.open_files, None);
        assert_eq!(c.env_allow, ["CI_*", "BUILD_ID"]);
        for (name, bad) in
            [("TASK_MAX_PROCESSES", "0"), ("TASK_MAX_MEMORY", "1K"), ("RUN_AS", "root")]
        {
            assert!(config(&[("AGENT_TOKEN", "t"), (name, bad)]).is_err(), "{name}={bad}");
        }
    }

    #[test]
    fn concurrency_is_one_to_sixty_four_and_needs_a_run_as_user_per_slot() {
        assert_eq!(config(&[("AGENT_TOKEN", "t")]).unwrap().concurrency, 1);
        assert_eq!(config(&[("AGENT_TOKEN", "t"), ("CONCURRENCY", "8")]).unwrap().concurrency, 8);
        for bad in ["0", "65", "two", "-1"] {
            assert!(config(&[("AGENT_TOKEN", "t"), ("CONCURRENCY", bad)]).is_err(), "{bad}");
        }
        // One user for two slots: cleaning up after one task would kill the other's command.
        let shared = config(&[("AGENT_TOKEN", "t"), ("CONCURRENCY", "2"), ("RUN_AS", "daemon")]);
        assert!(matches!(shared, Err(Error::Config(m)) if m.contains("{slot}")));
    }

    #[test]
    fn a_token_is_required() {
        assert!(matches!(config(&[]), Err(Error::Config(_))));
    }

    #[test]
    fn the_token_can_come_from_a_file() {
        let path = std::env::temp_dir().join(format!("taskexec-token-{}", std::process::id()));
        std::fs::write(&path, "from-file\n").unwrap();
        let c = config(&[("AGENT_TOKEN_FILE", path.to_str().unwrap())]).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(secrecy::ExposeSecret::expose_secret(&c.token), "from-file");
    }

    #[test]
    fn pick_wait_must_be_whole_seconds_within_reason() {
        for bad in ["500ms", "2h", "1500ms"] {
            assert!(config(&[("AGENT_TOKEN", "t"), ("PICK_WAIT", bad)]).is_err(), "{bad}");
        }
        let c = config(&[("AGENT_TOKEN", "t"), ("PICK_WAIT", "1m")]).unwrap();
        assert_eq!(c.pick_wait, Duration::from_secs(60));
    }
}
