//! The agent's side of the HTTP protocol. Timeouts are ordered: a pick may be held by the
//! server for `pick_wait`, so its read timeout is longer than that; other calls are short.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{Config, PICK_READ_MARGIN};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A finish carries up to two capped outputs; it must not hang on a stalled API.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest pick response accepted: a command (64 KiB by default on the server) in JSON.
const MAX_PICK_BYTES: u64 = 4 << 20;

/// Why a call did not succeed, and so what the agent should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API could not be reached, timed out or answered 5xx: retry later.
    #[error("the API is unavailable: {0}")]
    Unavailable(String),
    /// 409: the lease is no longer current. Another attempt owns the task: drop this one.
    #[error("the API fenced this attempt off: {0}")]
    Fenced(String),
    /// Another 4xx: the request itself is wrong; retrying the same request cannot help.
    #[error("the API refused the request ({status}): {detail}")]
    Refused { status: u16, detail: String },
    /// The API answered something this agent cannot use.
    #[error("the API answered something unexpected: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }
}

/// A task handed to this agent.
#[derive(Debug, Clone, Deserialize)]
pub struct Assignment {
    pub id: Uuid,
    pub command: String,
    pub lease: Uuid,
    pub attempts: u32,
}

/// What the agent reports when a command has ended.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub lease: Uuid,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_lossy: bool,
    pub stderr_lossy: bool,
}

pub struct Client {
    http: ureq::Agent,
    base: String,
    authorization: String,
    name: String,
    pick_wait: Duration,
}

impl Client {
    pub fn new(config: &Config) -> Client {
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("taskexec-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client {
            http,
            base: config.api_url.clone(),
            authorization: format!("Bearer {}", config.token),
            name: config.name.clone(),
            pick_wait: config.pick_wait,
        }
    }

    /// Long-polls for a task: `None` when none arrived within the server's hold.
    pub fn pick(&self) -> Result<Option<Assignment>, ClientError> {
        let mut response = self
            .http
            .get(format!("{}/tasks/pick", self.base))
            .query("wait", self.pick_wait.as_secs().to_string())
            .header("Authorization", &self.authorization)
            .header("X-Agent-Name", &self.name)
            .config()
            .timeout_global(Some(self.pick_wait + PICK_READ_MARGIN))
            .build()
            .call()
            .map_err(transport)?;
        match response.status().as_u16() {
            204 => Ok(None),
            200 => {
                let assignment: Assignment = response
                    .body_mut()
                    .with_config()
                    .limit(MAX_PICK_BYTES)
                    .read_json()
                    .map_err(|e| ClientError::Unexpected(format!("unreadable pick: {e}")))?;
                if assignment.command.trim().is_empty() {
                    return Err(ClientError::Unexpected(format!(
                        "task {} has no command",
                        assignment.id
                    )));
                }
                Ok(Some(assignment))
            }
            _ => Err(status_error(response)),
        }
    }

    /// Reports the end of the attempt. Ok also when the server had already recorded this very
    /// report (a retry after a lost response).
    pub fn finish(&self, id: Uuid, report: &Report) -> Result<(), ClientError> {
        let response = self
            .http
            .post(format!("{}/tasks/{id}/finish", self.base))
            .header("Authorization", &self.authorization)
            .header("X-Agent-Name", &self.name)
            .config()
            .timeout_global(Some(FINISH_TIMEOUT))
            .build()
            .send_json(report)
            .map_err(transport)?;
        match response.status().as_u16() {
            200 => Ok(()),
            _ => Err(status_error(response)),
        }
    }
}

fn transport(error: ureq::Error) -> ClientError {
    ClientError::Unavailable(error.to_string())
}

/// Turns a non-success answer into the error that says what to do, with the problem's
/// `detail` when the server gave one.
fn status_error(mut response: ureq::http::Response<ureq::Body>) -> ClientError {
    let status = response.status().as_u16();
    let detail = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_json::<serde_json::Value>()
        .ok()
        .and_then(|problem| {
            problem
                .get("detail")
                .and_then(|d| d.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("HTTP {status}"));
    match status {
        409 => ClientError::Fenced(detail),
        400..=499 => ClientError::Refused { status, detail },
        500..=599 => ClientError::Unavailable(format!("HTTP {status}: {detail}")),
        _ => ClientError::Unexpected(format!("HTTP {status}: {detail}")),
    }
}
