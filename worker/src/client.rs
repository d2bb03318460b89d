//! The agent's side of the HTTP protocol (the types are `taskexec-protocol`'s). Timeouts are
//! ordered: a pick may be held by the server for `pick_wait`, so its read timeout is longer
//! than that; other calls are short.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use taskexec_protocol::output::headers;
use taskexec_protocol::{
    is_env_name, Assignment, FinishReport, HeartbeatReply, LeaseBody, LeaseToken, OutputAck,
    Problem, ProblemType, ReleaseBody, Stream, TaskId,
};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::config::{Config, PICK_READ_MARGIN};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A finish carries up to two capped outputs; it must not hang on a stalled API.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Any other call, beyond what the server may hold it for.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The farewell on exit.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest pick response accepted: a command (64 KiB by default on the server) in JSON.
const MAX_PICK_BYTES: u64 = 4 << 20;
/// The largest answer to any other call.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

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
    Refused { status: u16, kind: Option<ProblemType>, detail: String },
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
    /// ours, the task does not exist, or the API will never take this report.
    pub fn is_final(&self) -> bool {
        match self {
            ClientError::Fenced(_) => true,
            ClientError::Refused { kind, .. } => matches!(
                kind,
                Some(
                    ProblemType::NotFound
                        | ProblemType::ReportConflict
                        | ProblemType::OutputMismatch
                )
            ),
            _ => false,
        }
    }

    fn is_too_large(&self) -> bool {
        matches!(self, ClientError::Refused { status: 413, .. })
    }

    /// The finish's text is not the API's text of the uploaded output.
    pub fn is_output_mismatch(&self) -> bool {
        matches!(self, ClientError::Refused { kind: Some(ProblemType::OutputMismatch), .. })
    }
}

/// Checks the server's numbers before acting on them: the agent does not take them blindly.
fn validate(assignment: Assignment, tags: &[String]) -> Result<Assignment, ClientError> {
    let (task, terms) = (&assignment.task, &assignment.terms);
    let options = &task.options;
    let problem = if task.command.trim().is_empty() {
        Some("no command")
    } else if !options.tags.iter().all(|tag| tags.contains(tag)) {
        Some("a tag this agent does not have")
    } else if !options.env.iter().all(|(name, value)| is_env_name(name) && !value.contains('\0')) {
        Some("an environment variable that cannot be set")
    } else if options.cwd.as_deref().is_some_and(|cwd| !cwd.starts_with('/') || cwd.contains('\0'))
    {
        Some("a working directory that is not an absolute path")
    } else if task.timeout_secs <= 0 {
        Some("a timeout that is not positive")
    } else if !(1..=24 * 3600).contains(&terms.lease_secs) {
        Some("a lease outside 1 s to 24 h")
    } else if terms.kill_grace_secs > 3600 {
        Some("a kill grace over an hour")
    } else if !(1024..=1 << 30).contains(&terms.max_output_bytes) {
        Some("an output cap outside 1 KiB to 1 GiB")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ClientError::Unexpected(format!("task {} has {problem}", task.id))),
        None => Ok(assignment),
    }
}

/// The API, at one or more addresses: after a failed call the next address is used, so agents
/// of a failed API process carry on with another.
pub struct Client {
    http: ureq::Agent,
    bases: Vec<String>,
    current: AtomicUsize,
    authorization: SecretString,
    name: String,
    /// Drawn at start, sent on every request: this run of the agent, for the registry.
    instance: String,
    pick_wait: Duration,
    /// `AGENT_TAGS`: a task goes to this agent only if these include all of its tags.
    tags: Vec<String>,
    /// Picks name `max` (an agent of several slots), and the answer is a list.
    listed: bool,
}

impl Client {
    pub fn new(config: &Config) -> Client {
        // Each slot keeps a heartbeat, uploads and a finish going: enough idle connections
        // that none of them connects afresh for every call.
        let idle = 4 * config.concurrency + 2;
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_idle_connections(idle)
            .max_idle_connections_per_host(idle)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("taskexec-worker/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls(config.ca_certs.as_deref()))
            .build()
            .into();
        let authorization = format!("Bearer {}", config.token.expose_secret()).into();
        Client {
            http,
            bases: config.api_urls.clone(),
            current: AtomicUsize::new(0),
            authorization,
            name: config.name.clone(),
            instance: uuid::Uuid::new_v4().to_string(),
            pick_wait: config.pick_wait,
            tags: config.tags.clone(),
            listed: config.concurrency > 1,
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

    /// Long-polls for up to `max` tasks (at least one): none when none arrived within the
    /// server's hold. An agent of one slot asks as agents before `max` did, so that it works
    /// with any API.
    pub fn pick(&self, max: usize) -> Result<Vec<Assignment>, ClientError> {
        self.try_pick(max).map_err(|e| self.fail_over(e))
    }

    fn try_pick(&self, max: usize) -> Result<Vec<Assignment>, ClientError> {
        let max = max.clamp(1, taskexec_protocol::MAX_PICK);
        let mut request = self
            .identified(self.http.get(self.url("/tasks/pick")))
            .query("wait", self.pick_wait.as_secs().to_string())
            .query("tags", self.tags.join(","));
        if self.listed {
            request = request.query("max", max.to_string());
        }
        let mut response = request
            .config()
            .timeout_global(Some(self.pick_wait + PICK_READ_MARGIN))
            .build()
            .call()
            .map_err(transport)?;
        match response.status().as_u16() {
            204 => Ok(Vec::new()),
            200 => {
                let body = response.body_mut().with_config().limit(MAX_PICK_BYTES * max as u64);
                let unreadable = |e| ClientError::Unexpected(format!("unreadable pick: {e}"));
                let assignments = if self.listed {
                    body.read_json::<Vec<Assignment>>().map_err(unreadable)?
                } else {
                    vec![body.read_json::<Assignment>().map_err(unreadable)?]
                };
                self.check_picked(assignments, max)
            }
            _ => Err(status_error(response)),
        }
    }

    /// The picked assignments this agent can run: no more than it asked for, each task once,
    /// each valid. One that is not is left alone (its lease runs out and the server queues it
    /// again), with a warning; the others run.
    fn check_picked(
        &self,
        assignments: Vec<Assignment>,
        max: usize,
    ) -> Result<Vec<Assignment>, ClientError> {
        if assignments.is_empty() || assignments.len() > max {
            return Err(ClientError::Unexpected(format!(
                "a pick of at most {max} tasks answered with {}",
                assignments.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut valid = Vec::new();
        for assignment in assignments {
            if !seen.insert(assignment.task.id) {
                log::warn!("task {}: handed out twice in one pick; ran once", assignment.task.id);
                continue;
            }
            match validate(assignment, &self.tags) {
                Ok(assignment) => valid.push(assignment),
                Err(e) => log::warn!("a picked task is left alone: {e}"),
            }
        }
        if valid.is_empty() {
            return Err(ClientError::Unexpected("no picked task could be run".into()));
        }
        Ok(valid)
    }

    /// Tells the API this agent is exiting, so that it shows as gone at once. Short: an exit
    /// must not wait on an API that does not answer (it finds out within a lease anyway).
    pub fn leave(&self) -> Result<(), ClientError> {
        let response = self
            .identified(self.http.post(self.url("/agents/leave")))
            .config()
            .timeout_global(Some(LEAVE_TIMEOUT))
            .build()
            .send_empty()
            .map_err(|e| self.fail_over(transport(e)))?;
        match response.status().as_u16() {
            204 => Ok(()),
            _ => Err(self.fail_over(status_error(response))),
        }
    }

    /// `request` with what every agent request carries: the token, the agent's name and its
    /// version.
    fn identified<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        request
            .header("Authorization", self.authorization.expose_secret())
            .header(headers::AGENT_NAME, &self.name)
            .header(headers::AGENT_VERSION, env!("CARGO_PKG_VERSION"))
            .header(headers::AGENT_INSTANCE, &self.instance)
    }

    /// A POST with the agent's credentials; Ok only for 200.
    fn post(
        &self,
        path: &str,
        body: &impl Serialize,
        timeout: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, ClientError> {
        let response = self
            .identified(self.http.post(self.url(path)))
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

/// One attempt as the agent holds it: the API and the lease a pick granted. Its methods are
/// the only reports the agent makes about a task, each fenced by the lease on the server.
#[derive(Clone)]
pub struct Attempt {
    client: Arc<Client>,
    pub task: TaskId,
    lease: LeaseToken,
}

impl Attempt {
    pub fn new(client: Arc<Client>, assignment: &Assignment) -> Attempt {
        Attempt { client, task: assignment.task.id, lease: assignment.lease }
    }

    /// The lease, for a report's body.
    pub fn lease(&self) -> LeaseToken {
        self.lease
    }

    /// Reports the end of the attempt. Ok also when the server had already recorded this very
    /// report (a retry after a lost response).
    pub fn finish(&self, report: &FinishReport) -> Result<(), ClientError> {
        let path = format!("/tasks/{}/finish", self.task);
        self.client.post(&path, report, FINISH_TIMEOUT).map(|_| ())
    }

    /// Extends the lease; the server holds the call up to `hold` and answers at once when an
    /// abort is requested. The call gives up after `timeout`, or `hold` plus the usual margin
    /// if that is sooner.
    pub fn heartbeat(
        &self,
        hold: Duration,
        timeout: Duration,
    ) -> Result<HeartbeatReply, ClientError> {
        let path = format!("/tasks/{}/heartbeat?wait={}", self.task, hold.as_secs());
        let timeout = timeout.min(hold + CALL_TIMEOUT);
        let mut response = self.client.post(&path, &LeaseBody { lease: self.lease }, timeout)?;
        read_answer(&mut response, "heartbeat answer")
    }

    /// Uploads a chunk of `stream` that starts at `offset` (`skip`: the bytes before it that the
    /// server lacks are dropped). Returns where the server's copy of the stream now ends.
    pub fn upload(
        &self,
        stream: Stream,
        offset: u64,
        skip: bool,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        let client = &self.client;
        let response = client
            .identified(client.http.post(client.url(&format!("/tasks/{}/output", self.task))))
            .query("stream", stream.as_str())
            .query("offset", offset.to_string())
            .query("skip", skip.to_string())
            .header(headers::LEASE, self.lease.to_string())
            .content_type("application/octet-stream")
            .config()
            .timeout_global(Some(CALL_TIMEOUT))
            .build()
            .send(data)
            .map_err(|e| client.fail_over(transport(e)))?;
        let mut response = match response.status().as_u16() {
            200 => response,
            _ => return Err(client.fail_over(status_error(response))),
        };
        let ack: OutputAck = read_answer(&mut response, "upload answer")?;
        Ok(ack.next_offset)
    }

    /// Hands the task back to the queue (the agent is stopping), within `timeout`.
    /// Hands the task back; `unstarted` when its command never ran (the server then queues
    /// it as if never picked, not counting a hand-back).
    pub fn release(&self, timeout: Duration, unstarted: bool) -> Result<(), ClientError> {
        let path = format!("/tasks/{}/release", self.task);
        let body = ReleaseBody { lease: self.lease, unstarted };
        self.client.post(&path, &body, timeout.min(CALL_TIMEOUT)).map(|_| ())
    }
}

/// Sends `report`. When the API takes less than this agent keeps (413), the texts are left
/// out: the server makes them from the uploaded output, by the same rule.
pub fn finish_within_limits(
    attempt: &Attempt,
    report: &mut FinishReport,
) -> Result<(), ClientError> {
    let sent = attempt.finish(report);
    if sent.as_ref().is_err_and(ClientError::is_too_large) {
        report.stdout = None;
        report.stderr = None;
    }
    sent
}

fn read_answer<T: serde::de::DeserializeOwned>(
    response: &mut ureq::http::Response<ureq::Body>,
    what: &str,
) -> Result<T, ClientError> {
    response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_json()
        .map_err(|e| ClientError::Unexpected(format!("unreadable {what}: {e}")))
}

/// HTTPS verifies the API against the system's roots and the certificates of
/// `BACKEND_API_CA_FILE`; a certificate it cannot verify fails the call (never accepted).
fn tls(extra_pem: Option<&[u8]>) -> TlsConfig {
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        log::warn!("a system root certificate could not be loaded: {error}");
    }
    let mut roots: Vec<Certificate<'static>> =
        native.certs.iter().map(|der| Certificate::from_der(der.as_ref()).to_owned()).collect();
    for item in extra_pem.map(ureq::tls::parse_pem).into_iter().flatten() {
        match item {
            Ok(PemItem::Certificate(certificate)) => roots.push(certificate.to_owned()),
            Ok(_) => {}
            Err(e) => {
                log::warn!("BACKEND_API_CA_FILE holds something that is not a certificate: {e}")
            }
        }
    }
    TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(roots))).build()
}

fn transport(error: ureq::Error) -> ClientError {
    // rustls's refusal reaches us wrapped (as an I/O error); say what to do about it.
    let refused = matches!(error, ureq::Error::Rustls(_))
        || error.to_string().contains("invalid peer certificate");
    let hint = if refused {
        "; the API's TLS certificate was not accepted (a private CA goes in BACKEND_API_CA_FILE)"
    } else {
        ""
    };
    ClientError::Unavailable(format!("{error}{hint}"))
}

/// Turns a non-success answer into the error that says what to do, by the problem's type.
fn status_error(mut response: ureq::http::Response<ureq::Body>) -> ClientError {
    let status = response.status().as_u16();
    let problem: Problem = read_answer(&mut response, "problem").unwrap_or_default();
    let detail =
        if problem.detail.is_empty() { format!("HTTP {status}") } else { problem.detail.clone() };
    let kind = problem.problem_type();
    match (status, kind) {
        (409, Some(ProblemType::OffsetGap)) => match problem.expected_offset {
            Some(expected) => ClientError::OffsetGap { expected },
            None => ClientError::Unexpected(format!("an offset gap without an offset: {detail}")),
        },
        (409, Some(ProblemType::OutputIncomplete)) => {
            match (problem.stdout_bytes, problem.stderr_bytes) {
                (Some(stdout), Some(stderr)) => ClientError::OutputIncomplete { stdout, stderr },
                _ => ClientError::Unexpected(format!("incomplete without lengths: {detail}")),
            }
        }
        (409, Some(ProblemType::LeaseNotCurrent)) => ClientError::Fenced(detail),
        (400..=499, _) => ClientError::Refused { status, kind, detail },
        (500..=599, _) => ClientError::Unavailable(format!("HTTP {status}: {detail}")),
        _ => ClientError::Unexpected(format!("HTTP {status}: {detail}")),
    }
}
