//! Settings: the shipped `Rocket.toml` as defaults, then the container environment variables,
//! then `ROCKET_*` variables. Every setting is documented in `Rocket.toml`.

use rocket::fairing::AdHoc;
use rocket::figment::providers::{Env, Format, Serialized, Toml};
use rocket::figment::{Figment, Profile};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use taskexec_protocol::logline::LogFormat;

/// The defaults, compiled in so that the binary needs no file to run.
const DEFAULTS: &str = include_str!("../../Rocket.toml");

/// What `taskexec-api --help` says about the settings.
pub const SETTINGS_HELP: &str = "\
Settings (environment variables; every other setting is in Rocket.toml, with its default and
unit, and can be overridden with ROCKET_<KEY>, e.g. ROCKET_LEASE_SECS=60):
  AGENT_TOKEN          the agents' shared bearer token, at least 16 characters (required),
                       or AGENT_TOKEN_FILE naming a file that holds it
  ADMIN_TOKEN          an admin's bearer token for bootstrapping (optional), at least 16
                       characters, or ADMIN_TOKEN_FILE
  DATABASE_URL         postgres://user:password@host:port/database, or in parts:
  DB_USER, DB_PASSWORD, DB_HOST, DB_PORT, DB_NAME
                       [default: postgres://postgres@localhost:5432/postgres]
  LISTEN_DATABASE_URL  where the LISTEN connection goes, if not to DATABASE_URL (which may
                       then go through PgBouncer in transaction mode) [default: DATABASE_URL]
  SERVER_PORT          listen port [default: 3500]
  LOG_LEVEL            error, warn, info, debug or trace [default: info]
  LOG_FORMAT           text, or json for one JSON object per line [default: text]
  ROCKET_CONFIG        the settings file [default: Rocket.toml; built-in defaults without it]

SIGTERM or SIGINT: parked picks answer 204 at once, requests in flight get a short grace,
then the server exits 0.

Tokens (on the same database settings, without a running server):
  taskexec-api token create --name NAME --role ROLE [--expires 90d] [--agent-name NAME]
  taskexec-api token list
  taskexec-api token revoke ID";

/// The shortest shared token (`AGENT_TOKEN`, `ADMIN_TOKEN`) accepted.
const MIN_SHARED_TOKEN: usize = 16;

/// Where the pool's URL lives in the figment (rocket_db_pools reads it there).
pub const DATABASE_URL_KEY: &str = "databases.taskexec.url";
/// Where the LISTEN connection goes, when not to the pool's URL (`LISTEN_DATABASE_URL`): the
/// pool may go through a PgBouncer in transaction mode, which cannot carry a LISTEN; this must
/// reach PostgreSQL itself.
pub const LISTEN_URL_KEY: &str = "listen_url";

/// The application's own settings (Rocket's, such as `port`, live in `rocket::Config`).
#[derive(Debug, Clone, Deserialize)]
pub struct AppConfig {
    /// Log level: error, warn, info, debug or trace.
    pub logging: log::LevelFilter,
    /// Log lines as `text` (the default) or `json` (`LOG_FORMAT`).
    #[serde(default)]
    pub log_format: LogFormat,
    /// The bearer token agents must present; checked at ignite, so never empty at run time.
    /// A secret: its `Debug` prints no value, and it is read only through `agent_token()`.
    #[serde(default)]
    pub agent_token: Option<SecretString>,
    /// An admin's bearer token for bootstrapping a deployment (`ADMIN_TOKEN`); optional.
    #[serde(default)]
    pub admin_token: Option<SecretString>,
    /// Why a `*_TOKEN_FILE` could not be read: the check refuses to start with it.
    #[serde(default)]
    pub unreadable_token_file: Option<String>,
    /// The most tasks one owner may have queued; a submission beyond gets 429.
    pub max_queued_per_owner: u64,
    /// Largest accepted command, in bytes.
    pub max_command_bytes: usize,
    /// Page size of `GET /tasks` without `limit`, and the largest `limit`.
    pub list_limit_default: u32,
    pub list_limit_max: u32,
    /// Seconds a pick is held without `wait`, and the most it is held.
    pub pick_wait_default_secs: u64,
    pub pick_wait_max_secs: u64,
    /// Waits and follows one token may hold at once (429 past it), and this process (503).
    pub max_waits_per_token: usize,
    pub max_waits: usize,
    /// Seconds a followed log may go without sending anything before it ends.
    pub follow_idle_secs: u64,
    /// Seconds a connection may take to send a request's head, and may wait idle for its next
    /// one (enforced by the patched Rocket, `vendor/rocket`).
    pub header_read_timeout: u64,
    /// Connections served at once; past it, a new one gets 503 (`connections.rs` keeps it below
    /// the descriptor limit).
    pub max_client_connections: u64,
    /// Seconds between two counts of the queue for `GET /metrics`, for all API processes.
    pub metrics_refresh_secs: u64,
    /// Seconds of silence after which the LISTEN connection must answer a query (within as
    /// many seconds) or be replaced.
    pub listen_probe_secs: u64,
    /// Seconds between rescans of the queue while picks are parked.
    pub dispatch_rescan_secs: u64,
    /// Seconds a pick's lease lasts; heartbeats extend it by as much.
    pub lease_secs: u32,
    /// The lease a pick grants until the agent's first heartbeat, in seconds.
    pub pick_confirm_secs: u32,
    /// Seconds between reaper runs.
    pub reaper_interval_secs: u64,
    /// Picks a task may get before an expired lease fails it.
    pub max_attempts: u32,
    /// Days an ended task is kept (with its output) before retention deletes it; 0 keeps
    /// every task.
    pub retention_days: u32,
    /// A task's timeout without `timeout_secs`, and the largest `timeout_secs`.
    pub default_timeout_secs: u32,
    pub max_timeout_secs: u32,
    /// Seconds between SIGTERM and SIGKILL when an agent stops a command.
    pub kill_grace_secs: u32,
    /// The most output kept per stream, in bytes (first and last halves).
    pub max_output_bytes: u32,
}

impl AppConfig {
    /// The token, which `stage()` has checked is present.
    pub fn agent_token(&self) -> &str {
        self.agent_token.as_ref().map_or("", |token| token.expose_secret())
    }

    /// The bootstrap admin token, when one is set.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_ref().map(|token| token.expose_secret())
    }

    /// The longest a heartbeat is held: a third of the lease, so that an agent that heartbeats
    /// again as soon as one returns extends its lease well before it runs out.
    pub fn heartbeat_hold_secs(&self) -> u32 {
        self.lease_secs / 3
    }

    /// Checks that the timeouts are ordered: every agent-facing wait fits in the lease, and
    /// the defaults fit in the limits.
    fn check(&self) -> Result<(), String> {
        if let Some(why) = &self.unreadable_token_file {
            return Err(why.clone());
        }
        let trimmed = |token: &str| token.trim() == token;
        let rules = [
            (!self.agent_token().trim().is_empty(), "AGENT_TOKEN is not set: agents could not authenticate, so the server refuses to start. Set AGENT_TOKEN (or AGENT_TOKEN_FILE) to a long random secret."),
            (self.agent_token().len() >= MIN_SHARED_TOKEN, "AGENT_TOKEN must be at least 16 characters long"),
            (self.admin_token().map_or(true, |t| t.len() >= MIN_SHARED_TOKEN), "ADMIN_TOKEN must be at least 16 characters long"),
            (self.admin_token().map_or(true, |t| t != self.agent_token()), "ADMIN_TOKEN must differ from AGENT_TOKEN"),
            // A presented token is trimmed, so one with spaces around it could never match.
            (trimmed(self.agent_token()) && self.admin_token().map_or(true, trimmed),
             "AGENT_TOKEN and ADMIN_TOKEN must not begin or end with whitespace"),
            (self.max_queued_per_owner >= 1, "max_queued_per_owner must be at least 1"),
            (self.lease_secs >= 3, "lease_secs must be at least 3 (heartbeats come every third of it)"),
            (
                self.kill_grace_secs + 2 <= self.lease_secs.min(self.pick_confirm_secs),
                "kill_grace_secs must be at least 2 s below lease_secs and pick_confirm_secs: \
                 an agent that cannot reach the API stops its command before its lease runs out",
            ),
            (self.pick_confirm_secs >= 1, "pick_confirm_secs must be at least 1"),
            (
                (1024..=1 << 30).contains(&self.max_output_bytes),
                "max_output_bytes must be from 1024 (1 KiB) to 1073741824 (1 GiB)",
            ),
            (self.reaper_interval_secs >= 1, "reaper_interval_secs must be at least 1"),
            (self.max_attempts >= 1, "max_attempts must be at least 1"),
            (self.default_timeout_secs >= 1 && self.default_timeout_secs <= self.max_timeout_secs,
             "default_timeout_secs must be between 1 and max_timeout_secs"),
            (self.pick_wait_default_secs <= self.pick_wait_max_secs,
             "pick_wait_default_secs must not exceed pick_wait_max_secs"),
            (1 <= self.max_waits_per_token && self.max_waits_per_token <= self.max_waits,
             "max_waits_per_token must be from 1 to max_waits"),
            ((1..=3600).contains(&self.header_read_timeout),
             "header_read_timeout must be from 1 to 3600 seconds"),
            (self.max_client_connections >= 1, "max_client_connections must be at least 1"),
            (self.follow_idle_secs >= 1, "follow_idle_secs must be at least 1"),
            (self.listen_probe_secs >= 1, "listen_probe_secs must be at least 1"),
            (self.metrics_refresh_secs >= 1, "metrics_refresh_secs must be at least 1"),
            (self.retention_days <= 36_500, "retention_days must be at most 36500 (0 keeps every task)"),
        ];
        match rules.iter().find(|(ok, _)| !ok) {
            Some((_, message)) => Err((*message).to_owned()),
            None => Ok(()),
        }
    }
}

/// The figment the server runs with: built-in defaults < `Rocket.toml` (or `ROCKET_CONFIG`)
/// < container variables < `ROCKET_*` variables.
pub fn figment() -> Figment {
    let profile = Profile::from_env_or("ROCKET_PROFILE", rocket::Config::DEFAULT_PROFILE);
    Figment::from(rocket::Config::default())
        .merge(Toml::string(DEFAULTS).nested())
        .merge(Toml::file(Env::var_or("ROCKET_CONFIG", "Rocket.toml")).nested())
        .merge(container_env(|name| std::env::var(name).ok()))
        .merge(Env::prefixed("ROCKET_").ignore(&["PROFILE"]).global())
        .select(profile)
}

/// The variables of the original container setup, mapped onto figment keys.
/// `DATABASE_URL` wins over the `DB_*` parts.
fn container_env(var: impl Fn(&str) -> Option<String>) -> Figment {
    let mut env = Figment::new();
    if let Some(port) = var("SERVER_PORT") {
        // A number, or the string itself so that extraction reports what was wrong with it.
        env = match port.parse::<u16>() {
            Ok(port) => env.merge(Serialized::global("port", port)),
            Err(_) => env.merge(Serialized::global("port", port)),
        };
    }
    if let Some(level) = var("LOG_LEVEL") {
        env = env.merge(Serialized::global("logging", level));
    }
    if let Some(format) = var("LOG_FORMAT") {
        env = env.merge(Serialized::global("log_format", format));
    }
    for (key, name) in [("agent_token", "AGENT_TOKEN"), ("admin_token", "ADMIN_TOKEN")] {
        match (var(name), var(&format!("{name}_FILE"))) {
            (Some(token), _) => env = env.merge(Serialized::global(key, token)),
            // The file form suits Docker and Kubernetes secrets. An unreadable file stops the
            // server at the check (logging is not up yet while the figment is built).
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(token) => env = env.merge(Serialized::global(key, token.trim().to_owned())),
                Err(e) => {
                    let why = format!("{name}_FILE={path:?} cannot be read: {e}");
                    env = env.merge(Serialized::global("unreadable_token_file", why));
                }
            },
            (None, None) => {}
        }
    }
    let url = var("DATABASE_URL").or_else(|| database_url_from_parts(&var));
    if let Some(url) = url {
        env = env.merge(Serialized::global(DATABASE_URL_KEY, url));
    }
    if let Some(url) = var("LISTEN_DATABASE_URL").filter(|url| !url.is_empty()) {
        env = env.merge(Serialized::global(LISTEN_URL_KEY, url));
    }
    env
}

/// Builds a URL from `DB_USER`, `DB_PASSWORD`, `DB_HOST`, `DB_PORT` and `DB_NAME` when any of
/// them is set; the unset ones take the PostgreSQL defaults.
fn database_url_from_parts(var: &impl Fn(&str) -> Option<String>) -> Option<String> {
    let parts = ["DB_USER", "DB_PASSWORD", "DB_HOST", "DB_PORT", "DB_NAME"].map(var);
    if parts.iter().all(Option::is_none) {
        return None;
    }
    let [user, password, host, port, name] = parts;
    let encode = |s: &str| percent_encoding::utf8_percent_encode(s, USERINFO).to_string();
    let user = encode(user.as_deref().unwrap_or("postgres"));
    let password = password.map(|p| format!(":{}", encode(&p))).unwrap_or_default();
    let host = host.unwrap_or_else(|| "localhost".into());
    let port = port.unwrap_or_else(|| "5432".into());
    let name = encode(name.as_deref().unwrap_or("postgres"));
    Some(format!("postgres://{user}{password}@{host}:{port}/{name}"))
}

/// Characters that must be escaped in a URL's user, password or path segment.
const USERINFO: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Settings whose values are secrets: an error about one never quotes its value.
const SECRET_KEYS: [&str; 3] = ["agent_token", "admin_token", "url"];

/// A configuration error in words, without the value when the setting is a secret (figment's
/// own text quotes it: a numeric `ROCKET_AGENT_TOKEN` was printed in full).
fn describe(error: &rocket::figment::Error) -> String {
    let key = error.path.join(".");
    if error.path.last().is_some_and(|last| SECRET_KEYS.contains(&last.as_str())) {
        return format!(
            "{key}: not a valid value (not shown: it is a secret). A token must be a string: \
             set AGENT_TOKEN or ADMIN_TOKEN, or quote a number in ROCKET_*: '\"123...\"'"
        );
    }
    error.to_string()
}

/// Reads `AppConfig` at ignite; refuses to start without an agent token or with timeouts out
/// of order.
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Configuration", |rocket| async move {
        let config: AppConfig = match rocket.figment().extract() {
            Ok(config) => config,
            Err(e) => {
                for error in e {
                    log::error!("invalid configuration: {}", describe(&error));
                }
                return Err(rocket);
            }
        };
        if let Err(message) = config.check() {
            log::error!("{message}");
            return Err(rocket);
        }
        Ok(rocket.manage(config))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_invalid_secret_is_not_quoted_in_the_error() {
        let figment = rocket::figment::Figment::from(
            rocket::figment::providers::Serialized::global("agent_token", 12345678901234567890u64),
        );
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Tokens {
            agent_token: String,
        }
        let error = figment.extract::<Tokens>().unwrap_err();
        let text = super::describe(&error);
        assert!(error.to_string().contains("12345678901234567890"), "figment's own text quotes it");
        assert!(!text.contains("12345678901234567890"), "{text}");
        assert!(text.contains("agent_token"), "{text}");
    }

    use super::*;
    use std::collections::HashMap;

    fn url_from(vars: &[(&str, &str)]) -> Option<String> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env = container_env(|name| vars.get(name).cloned());
        env.extract_inner::<String>(DATABASE_URL_KEY).ok()
    }

    #[test]
    fn database_url_is_built_from_parts_with_the_password_escaped() {
        let url = url_from(&[("DB_USER", "app"), ("DB_PASSWORD", "p@ss:w/rd"), ("DB_HOST", "db")]);
        assert_eq!(url.as_deref(), Some("postgres://app:p%40ss%3Aw%2Frd@db:5432/postgres"));
    }

    #[test]
    fn database_url_wins_over_the_parts() {
        let url = url_from(&[("DATABASE_URL", "postgres://x@y/z"), ("DB_HOST", "db")]);
        assert_eq!(url.as_deref(), Some("postgres://x@y/z"));
    }

    #[test]
    fn no_database_variables_leave_the_file_setting_alone() {
        assert_eq!(url_from(&[("SERVER_PORT", "1")]), None);
    }

    #[test]
    fn the_shipped_defaults_parse_and_carry_no_token() {
        let config: AppConfig = Figment::from(rocket::Config::default())
            .merge(Toml::string(DEFAULTS).nested())
            .select(rocket::Config::DEFAULT_PROFILE)
            .extract()
            .expect("Rocket.toml parses into AppConfig");
        assert!(config.agent_token.is_none());
        assert!(config.pick_wait_default_secs < config.pick_wait_max_secs);
    }

    fn checked(vars: &[(&str, &str)]) -> Result<(), String> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let config: AppConfig = Figment::from(rocket::Config::default())
            .merge(Toml::string(DEFAULTS).nested())
            .merge(container_env(|name| vars.get(name).cloned()))
            .select(rocket::Config::DEFAULT_PROFILE)
            .extract()
            .expect("the settings parse");
        config.check()
    }

    #[test]
    fn an_unreadable_token_file_stops_the_server_and_names_the_file() {
        let agent = ("AGENT_TOKEN", "agent-token-0123456789");
        let missing = ("ADMIN_TOKEN_FILE", "/nonexistent/admin-token");
        let why = checked(&[agent, missing]).unwrap_err();
        assert!(
            why.contains("ADMIN_TOKEN_FILE") && why.contains("/nonexistent/admin-token"),
            "{why}"
        );
        assert_eq!(checked(&[agent]), Ok(()));
    }

    #[test]
    fn a_shared_token_with_spaces_around_it_is_refused() {
        let why = checked(&[("AGENT_TOKEN", "agent-token-0123456789\n")]).unwrap_err();
        assert!(why.contains("whitespace"), "{why}");
    }
}
