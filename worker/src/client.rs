//! The agent's side of the HTTP protocol. Timeouts are ordered: a pick may be held by the
//! server for `pick_wait`, so its read timeout is longer than that; other calls are short.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{Config, PICK_READ_MARGIN};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A finish carries up to two capped outputs; it must not hang on a stalled API.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Any other call, beyond what the server may hold it for.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// 409 for a chunk that starts past the end of its stream: resend from `expected`.
    #[error("the API has the stream up to offset {expected}")]
    OffsetGap { expected: u64 },
    /// 409 for a finish whose stream lengths the uploads do not reach yet.
    #[error("the API has {stdout} bytes of stdout and {stderr} of stderr so far")]
    OutputIncomplete { stdout: u64, stderr: u64 },
    /// Another 4xx: the request itself is wrong; retrying the same request cannot help.
    #[error("the API refused the request ({status}): {detail}")]
    Refused { status: u16, detail: String },
    /// The API answered something this agent cannot use.
    #[error("the API answered something unexpected: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// Whether the same request may succeed later (the API was unreachable or failed).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }

    /// Whether a report about the attempt is pointless from now on: the attempt is no longer
    /// ours, or the task does not exist.
    pub fn is_final(&self) -> bool {
        matches!(self, ClientError::Fenced(_) | ClientError::Refused { status: 404, .. })
    }
}

/// A task handed to this agent, with the terms of its lease.
#[derive(Debug, Clone, Deserialize)]
pub struct Assignment {
    pub id: Uuid,
    pub command: String,
    pub lease: Uuid,
    pub attempts: u32,
    /// Stop the command after this long.
    pub timeout_secs: u64,
    /// The lease lasts this long from each heartbeat.
    pub lease_secs: u64,
    /// Between SIGTERM and SIGKILL when the command must stop.
    pub kill_grace_secs: u64,
    /// The output the server keeps per stream (older servers do not say).
    pub max_output_bytes: Option<usize>,
}

impl Assignment {
    /// Checks the server's numbers before acting on them: the agent does not take them blindly.
    fn validate(self) -> Result<Assignment, ClientError> {
        let problem = if self.command.trim().is_empty() {
            Some("no command")
        } else if self.timeout_secs == 0 {
            Some("a zero timeout")
        } else if !(1..=24 * 3600).contains(&self.lease_secs) {
            Some("a lease outside 1 s to 24 h")
        } else if self.kill_grace_secs > 3600 {
            Some("a kill grace over an hour")
        } else {
            None
        };
        match problem {
            Some(problem) => {
                Err(ClientError::Unexpected(format!("task {} has {problem}", self.id)))
            }
            None => Ok(self),
        }
    }
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Deserialize)]
pub struct Heartbeat {
    /// A user asked to abort the task: stop the command and report.
    pub abort: bool,
    /// The length of the lease this heartbeat granted.
    pub lease_secs: u64,
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
    /// The command was stopped because an abort was requested.
    pub aborted: bool,
    /// The length of each stream as uploaded (the server checks its uploads add up to them);
    /// left out when the uploads were given up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<u64>,
    /// The stream was longer than the cap: its middle was dropped.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl Report {
    /// Halves the output kept of each stream (first and last quarters of what was there, with a
    /// marker), for an API whose body limit is smaller than this agent's output cap.
    pub fn shrink_output(&mut self) {
        for text in [&mut self.stdout, &mut self.stderr] {
            *text = crate::exec::shrink(text, text.len() / 2);
        }
    }
}

#[derive(Serialize)]
struct LeaseBody {
    lease: Uuid,
}

/// The API, at one or more addresses: after a failed call the next address is used, so agents
/// of a failed API process carry on with another.
pub struct Client {
    http: ureq::Agent,
    bases: Vec<String>,
    current: AtomicUsize,
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
            bases: config.api_urls.clone(),
            current: AtomicUsize::new(0),
            authorization: format!("Bearer {}", config.token),
            name: config.name.clone(),
            pick_wait: config.pick_wait,
        }
    }

    fn url(&self, path: &str) -> String {
        let base = &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()];
        format!("{base}{path}")
    }

    /// Moves on to the next address after a failure to reach the current one.
    fn fail_over(&self, error: ClientError) -> ClientError {
        if matches!(error, ClientError::Unavailable(_)) && self.bases.len() > 1 {
            self.current.fetch_add(1, Ordering::Relaxed);
        }
        error
    }

    /// Long-polls for a task: `None` when none arrived within the server's hold.
    pub fn pick(&self) -> Result<Option<Assignment>, ClientError> {
        self.try_pick().map_err(|e| self.fail_over(e))
    }

    fn try_pick(&self) -> Result<Option<Assignment>, ClientError> {
        let mut response = self
            .http
            .get(self.url("/tasks/pick"))
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
                assignment.validate().map(Some)
            }
            _ => Err(status_error(response)),
        }
    }

    /// Reports the end of the attempt. Ok also when the server had already recorded this very
    /// report (a retry after a lost response).
    pub fn finish(&self, id: Uuid, report: &Report) -> Result<(), ClientError> {
        self.post(&format!("/tasks/{id}/finish"), report, FINISH_TIMEOUT).map(|_| ())
    }

    /// Extends the lease; the server holds the call up to `hold` and answers at once when an
    /// abort is requested. The call gives up after `timeout`, or `hold` plus the usual margin
    /// if that is sooner.
    pub fn heartbeat(
        &self,
        id: Uuid,
        lease: Uuid,
        hold: Duration,
        timeout: Duration,
    ) -> Result<Heartbeat, ClientError> {
        let path = format!("/tasks/{id}/heartbeat?wait={}", hold.as_secs());
        let timeout = timeout.min(hold + CALL_TIMEOUT);
        let mut response = self.post(&path, &LeaseBody { lease }, timeout)?;
        response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_json()
            .map_err(|e| ClientError::Unexpected(format!("unreadable heartbeat answer: {e}")))
    }

    /// Uploads a chunk of `stream` that starts at `offset` (`skip`: the bytes before it that the
    /// server lacks are dropped). Returns where the server's copy of the stream now ends.
    pub fn upload(
        &self,
        id: Uuid,
        lease: Uuid,
        stream: &str,
        offset: u64,
        skip: bool,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        let response = self
            .http
            .post(self.url(&format!("/tasks/{id}/output")))
            .query("stream", stream)
            .query("offset", offset.to_string())
            .query("skip", skip.to_string())
            .header("Authorization", &self.authorization)
            .header("X-Agent-Name", &self.name)
            .header("X-Lease", lease.to_string())
            .content_type("application/octet-stream")
            .config()
            .timeout_global(Some(CALL_TIMEOUT))
            .build()
            .send(data)
            .map_err(|e| self.fail_over(transport(e)))?;
        let mut response = match response.status().as_u16() {
            200 => response,
            _ => return Err(self.fail_over(status_error(response))),
        };
        let answer: serde_json::Value = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_json()
            .map_err(|e| ClientError::Unexpected(format!("unreadable upload answer: {e}")))?;
        answer["next_offset"].as_u64().ok_or_else(|| {
            ClientError::Unexpected(format!("upload answer without next_offset: {answer}"))
        })
    }

    /// Hands the task back to the queue (the agent is draining).
    pub fn release(&self, id: Uuid, lease: Uuid) -> Result<(), ClientError> {
        self.post(&format!("/tasks/{id}/release"), &LeaseBody { lease }, CALL_TIMEOUT).map(|_| ())
    }

    /// A POST with the agent's credentials; Ok only for 200.
    fn post(
        &self,
        path: &str,
        body: &impl Serialize,
        timeout: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, ClientError> {
        let response = self
            .http
            .post(self.url(path))
            .header("Authorization", &self.authorization)
            .header("X-Agent-Name", &self.name)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .send_json(body)
            .map_err(|e| self.fail_over(transport(e)))?;
        match response.status().as_u16() {
            200 => Ok(response),
            _ => Err(self.fail_over(status_error(response))),
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
    let problem = response
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_json::<serde_json::Value>()
        .unwrap_or_default();
    let detail = problem["detail"].as_str().map_or_else(|| format!("HTTP {status}"), str::to_owned);
    match (status, problem["type"].as_str()) {
        (409, Some("/problems/offset-gap")) => match problem["expected_offset"].as_u64() {
            Some(expected) => return ClientError::OffsetGap { expected },
            None => {
                return ClientError::Unexpected(format!("offset gap without offset: {problem}"))
            }
        },
        (409, Some("/problems/output-incomplete")) => {
            match (problem["stdout_bytes"].as_u64(), problem["stderr_bytes"].as_u64()) {
                (Some(stdout), Some(stderr)) => {
                    return ClientError::OutputIncomplete { stdout, stderr }
                }
                _ => {
                    return ClientError::Unexpected(format!(
                        "incomplete without lengths: {problem}"
                    ))
                }
            }
        }
        _ => {}
    }
    match status {
        409 => ClientError::Fenced(detail),
        400..=499 => ClientError::Refused { status, detail },
        500..=599 => ClientError::Unavailable(format!("HTTP {status}: {detail}")),
        _ => ClientError::Unexpected(format!("HTTP {status}: {detail}")),
    }
}
