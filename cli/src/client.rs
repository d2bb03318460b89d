//! The API over HTTP (ureq, synchronous), in the protocol's types: one method per endpoint the
//! command line calls. A refusal becomes an [`Error::Api`] read from its problem+json body.
//!
//! Timeouts are ordered: a long poll asks the server to hold it [`LONG_POLL`], below the
//! server's cap (`pick_wait_max_secs`, 60 s by default), and gives up only [`CALL_TIMEOUT`]
//! after that, so the server always answers first.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use taskexec_protocol::output::headers;
use taskexec_protocol::{
    AgentInfo, CreatedToken, NewTask, NewToken, Problem, Stream, Task, TaskId, TaskPage,
    TaskStatus, TokenId, TokenInfo,
};
use ureq::http::Response;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::Body;

use crate::Error;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A call the server answers at once; and the margin of a long poll beyond its hold.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a long poll (`?wait`) asks the server to hold it.
pub const LONG_POLL: Duration = Duration::from_secs(25);
/// The largest JSON answer read: a page of 1,000 tasks, or a task with two capped outputs (1 MiB
/// each by default, up to six times that once escaped).
const MAX_JSON_BYTES: u64 = 64 << 20;
/// The largest output read: the server sends at most 256 KiB at a time.
const MAX_OUTPUT_BYTES: u64 = 4 << 20;
/// The largest problem body read.
const MAX_PROBLEM_BYTES: u64 = 64 << 10;
/// How long [`retrying`] goes on calling after a transient failure, whatever each call took.
const RETRY_FOR: Duration = Duration::from_secs(60);
/// The longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_secs(10);

/// What `GET /tasks` is asked for.
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    pub status: Option<TaskStatus>,
    pub owner: Option<String>,
    pub limit: Option<u32>,
}

/// The answer to an abort.
pub enum Aborted {
    /// A queued task, cancelled at once (200).
    Cancelled(Task),
    /// A running task: its agent was asked to stop it (202).
    Requested(Task),
}

/// A read of one stream from an offset: the raw bytes and where they stand.
#[derive(Debug)]
pub struct OutputRead {
    pub data: Vec<u8>,
    pub next_offset: u64,
    /// Bytes before `data` that the output cap dropped.
    pub dropped: u64,
    /// The task has ended and nothing more will come.
    pub ended: bool,
}

/// The API at one address, called with one token.
pub struct Client {
    http: ureq::Agent,
    base: String,
    authorization: SecretString,
}

impl Client {
    /// A client of the API at `url` that presents `token`, trusting the system's roots and the
    /// certificates in `ca_file`.
    ///
    /// # Errors
    ///
    /// `Config` when `ca_file` cannot be read or holds no certificate.
    pub fn new(url: &str, token: &SecretString, ca_file: Option<&Path>) -> Result<Client, Error> {
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("taskexec/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls(ca_file)?)
            .build()
            .into();
        let authorization = format!("Bearer {}", token.expose_secret()).into();
        Ok(Client { http, base: url.trim_end_matches('/').to_owned(), authorization })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST /tasks`.
    pub fn submit(&self, task: &NewTask) -> Result<Task, Error> {
        let sent =
            self.authorized(self.http.post(self.url("/tasks")), CALL_TIMEOUT).send_json(task);
        self.json(sent, 201)
    }

    /// `GET /tasks/<id>`, held by the server up to `wait` until the task has ended.
    pub fn task(&self, id: TaskId, wait: Duration) -> Result<Task, Error> {
        let request = self.http.get(self.url(&format!("/tasks/{id}")));
        let request = if wait.is_zero() { request } else { request.query("wait", secs(wait)) };
        self.json(self.authorized(request, wait + CALL_TIMEOUT).call(), 200)
    }

    /// The task once it has ended: long polls, one after another, riding over blips of the
    /// API (see [`retrying`]).
    pub fn until_ended(&self, id: TaskId) -> Result<Task, Error> {
        loop {
            let task = retrying(|| self.task(id, LONG_POLL))?;
            if task.status.is_terminal() {
                return Ok(task);
            }
        }
    }

    /// `GET /tasks`: one page, after `cursor` (the previous page's `next`).
    pub fn list(&self, query: &ListQuery, cursor: Option<&str>) -> Result<TaskPage, Error> {
        let mut request = self.http.get(self.url("/tasks"));
        if let Some(status) = query.status {
            request = request.query("status", status.as_str());
        }
        if let Some(owner) = &query.owner {
            request = request.query("owner", owner);
        }
        if let Some(limit) = query.limit {
            request = request.query("limit", limit.to_string());
        }
        if let Some(cursor) = cursor {
            request = request.query("cursor", cursor);
        }
        self.json(self.authorized(request, CALL_TIMEOUT).call(), 200)
    }

    /// `POST /tasks/<id>/abort`.
    pub fn abort(&self, id: TaskId) -> Result<Aborted, Error> {
        let request = self.http.post(self.url(&format!("/tasks/{id}/abort")));
        let mut response = self.checked(self.authorized(request, CALL_TIMEOUT).send_empty())?;
        match response.status().as_u16() {
            200 => Ok(Aborted::Cancelled(self.read_json(&mut response)?)),
            202 => Ok(Aborted::Requested(self.read_json(&mut response)?)),
            _ => Err(refusal(response)),
        }
    }

    /// `GET /tasks/<id>/output`: the raw bytes of `stream` from `offset`, held by the server
    /// up to `wait` while there is nothing new.
    pub fn output(
        &self,
        id: TaskId,
        stream: Stream,
        offset: u64,
        wait: Duration,
    ) -> Result<OutputRead, Error> {
        let request = self
            .http
            .get(self.url(&format!("/tasks/{id}/output")))
            .query("stream", stream.as_str())
            .query("offset", offset.to_string())
            .query("wait", secs(wait));
        let mut response = self.checked(self.authorized(request, wait + CALL_TIMEOUT).call())?;
        if response.status().as_u16() != 200 {
            return Err(refusal(response));
        }
        let header = |name: &str| {
            let value = response.headers().get(name).and_then(|value| value.to_str().ok());
            value
                .map(str::to_owned)
                .ok_or_else(|| Error::Unexpected(format!("an output read without a {name} header")))
        };
        let number = |name: &str| {
            header(name)?
                .parse::<u64>()
                .map_err(|_| Error::Unexpected(format!("{name} is not a number")))
        };
        let (next_offset, dropped) = (number(headers::NEXT_OFFSET)?, number(headers::DROPPED)?);
        let ended = header(headers::ENDED)? == "true";
        let data = response
            .body_mut()
            .with_config()
            .limit(MAX_OUTPUT_BYTES)
            .read_to_vec()
            .map_err(|e| self.transport(e))?;
        Ok(OutputRead { data, next_offset, dropped, ended })
    }

    /// `GET /agents`.
    pub fn agents(&self) -> Result<Vec<AgentInfo>, Error> {
        let request = self.http.get(self.url("/agents"));
        self.json(self.authorized(request, CALL_TIMEOUT).call(), 200)
    }

    /// `POST /tokens`.
    pub fn create_token(&self, token: &NewToken) -> Result<CreatedToken, Error> {
        let request = self.http.post(self.url("/tokens"));
        self.json(self.authorized(request, CALL_TIMEOUT).send_json(token), 201)
    }

    /// `GET /tokens`.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>, Error> {
        let request = self.http.get(self.url("/tokens"));
        self.json(self.authorized(request, CALL_TIMEOUT).call(), 200)
    }

    /// `DELETE /tokens/<id>`.
    pub fn revoke_token(&self, id: TokenId) -> Result<(), Error> {
        let request = self.http.delete(self.url(&format!("/tokens/{id}")));
        let response = self.checked(self.authorized(request, CALL_TIMEOUT).call())?;
        match response.status().as_u16() {
            204 => Ok(()),
            _ => Err(refusal(response)),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `request` with the token, given up after `timeout` (a request with a body or without).
    fn authorized<B>(
        &self,
        request: ureq::RequestBuilder<B>,
        timeout: Duration,
    ) -> ureq::RequestBuilder<B> {
        request
            .header("Authorization", self.authorization.expose_secret())
            .config()
            .timeout_global(Some(timeout))
            .build()
    }

    /// The response, or why there is none.
    fn checked(&self, sent: Result<Response<Body>, ureq::Error>) -> Result<Response<Body>, Error> {
        sent.map_err(|e| self.transport(e))
    }

    /// The JSON body of a response with status `expected`, or the refusal.
    fn json<T: DeserializeOwned>(
        &self,
        sent: Result<Response<Body>, ureq::Error>,
        expected: u16,
    ) -> Result<T, Error> {
        let mut response = self.checked(sent)?;
        if response.status().as_u16() == expected {
            self.read_json(&mut response)
        } else {
            Err(refusal(response))
        }
    }

    /// The JSON body of `response`, read whole (at most [`MAX_JSON_BYTES`]) then parsed.
    fn read_json<T: DeserializeOwned>(&self, response: &mut Response<Body>) -> Result<T, Error> {
        let body = response.body_mut().with_config().limit(MAX_JSON_BYTES).read_to_vec();
        let body = body.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&body)
            .map_err(|e| Error::Unexpected(format!("an unreadable answer: {e}")))
    }

    /// What a failed call stands for, by the error's kind: the API out of reach (worth
    /// retrying), its certificate refused, an address that cannot work, or an answer that
    /// cannot be read (too large, not HTTP).
    fn transport(&self, error: ureq::Error) -> Error {
        let (url, cause) = (self.base.clone(), error.to_string());
        match error {
            error if is_tls(&error) => Error::Tls { url, cause },
            ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::ConnectProxyFailed(_) => Error::Unreachable { url, cause },
            ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::InvalidProxyUrl => {
                Error::Config(format!("cannot call the API at {url}: {cause}; check --url"))
            }
            _ => Error::Unexpected(cause),
        }
    }
}

/// Whether the TLS session failed: the certificate refused, most often. rustls's refusal
/// during the handshake reaches ureq as the source of an I/O error.
fn is_tls(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::Tls(_)
        | ureq::Error::Rustls(_)
        | ureq::Error::Pem(_)
        | ureq::Error::TlsRequired => true,
        ureq::Error::Io(e) => e.get_ref().is_some_and(|source| source.is::<rustls::Error>()),
        _ => false,
    }
}

/// Runs `call` again after a transient failure (the API unreachable, restarting or busy) for
/// about a minute in all, so that a long `run` or `logs -f` outlives a restart of the API.
pub fn retrying<T>(call: impl FnMut() -> Result<T, Error>) -> Result<T, Error> {
    retrying_for(RETRY_FOR, call)
}

/// [`retrying`] until `budget` has passed since the first call, however long each call took.
fn retrying_for<T>(
    budget: Duration,
    mut call: impl FnMut() -> Result<T, Error>,
) -> Result<T, Error> {
    let deadline = Instant::now() + budget;
    let mut pause = Duration::from_millis(500);
    loop {
        match call() {
            Err(e) if e.is_transient() => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(e);
                }
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(MAX_PAUSE);
            }
            answer => return answer,
        }
    }
}

fn secs(duration: Duration) -> String {
    duration.as_secs().to_string()
}

/// The error a non-success answer stands for, read from its problem (any body will do: a
/// proxy's page becomes its status alone).
fn refusal(mut response: Response<Body>) -> Error {
    let status = response.status();
    let retry_after =
        response.headers().get("Retry-After").and_then(|value| value.to_str().ok()?.parse().ok());
    let problem: Problem =
        response.body_mut().with_config().limit(MAX_PROBLEM_BYTES).read_json().unwrap_or_default();
    let title = if problem.title.is_empty() {
        status.canonical_reason().unwrap_or("Error").to_owned()
    } else {
        problem.title.clone()
    };
    let detail = if problem.detail.is_empty() {
        "the API gave no detail".to_owned()
    } else {
        problem.detail.clone()
    };
    let request = problem
        .instance
        .as_deref()
        .map(|instance| instance.trim_start_matches("urn:taskexec:request:").to_owned());
    Error::Api {
        status: status.as_u16(),
        title,
        detail,
        kind: problem.problem_type(),
        retry_after,
        request,
    }
}

/// HTTPS verifies the API against the system's roots and the certificates of `ca_file`; a
/// certificate that cannot be verified fails the call, never is accepted.
fn tls(ca_file: Option<&Path>) -> Result<TlsConfig, Error> {
    let native = rustls_native_certs::load_native_certs();
    let mut roots: Vec<Certificate<'static>> =
        native.certs.iter().map(|der| Certificate::from_der(der.as_ref()).to_owned()).collect();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| Error::Config(format!("--ca-file {}: {e}", path.display())))?;
        let before = roots.len();
        for item in ureq::tls::parse_pem(&pem) {
            if let Ok(PemItem::Certificate(certificate)) = item {
                roots.push(certificate.to_owned());
            }
        }
        if roots.len() == before {
            let why = format!("--ca-file {} holds no PEM certificate", path.display());
            return Err(Error::Config(why));
        }
    }
    Ok(TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(roots))).build())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn unreachable() -> Error {
        Error::Unreachable { url: "http://api".into(), cause: "refused".into() }
    }

    #[test]
    fn retries_end_once_the_budget_is_spent_however_long_each_call_took() {
        let calls = Cell::new(0);
        let started = Instant::now();

        let answer: Result<(), Error> = retrying_for(Duration::from_millis(600), || {
            calls.set(calls.get() + 1);
            std::thread::sleep(Duration::from_millis(400));
            Err(unreachable())
        });

        // Calls at 0 and 0.6 s (the pause cut to what was left of the budget), then no more.
        assert!(matches!(answer, Err(Error::Unreachable { .. })));
        assert_eq!(calls.get(), 2);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn an_answer_that_no_retry_would_change_is_returned_at_once() {
        let calls = Cell::new(0);
        let tls = || Error::Tls { url: "https://api".into(), cause: "unknown issuer".into() };

        let answer: Result<(), Error> = retrying_for(Duration::from_secs(60), || {
            calls.set(calls.get() + 1);
            Err(tls())
        });

        assert!(matches!(answer, Err(Error::Tls { .. })));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn a_refused_certificate_is_told_apart_by_its_source_not_its_words() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");

        assert!(is_tls(&ureq::Error::Io(refused)));
        assert!(!is_tls(&ureq::Error::Io(reset)));
        assert!(!is_tls(&ureq::Error::BodyExceedsLimit(10)));
    }

    #[test]
    fn an_answer_too_large_is_unexpected_and_not_retried() {
        let client = Client::new("http://api", &"tex_x".into(), None).unwrap();

        let too_large = client.transport(ureq::Error::BodyExceedsLimit(10));
        let refused = client.transport(ureq::Error::ConnectionFailed);

        assert!(matches!(too_large, Error::Unexpected(_)) && !too_large.is_transient());
        assert!(refused.is_transient());
    }
}
