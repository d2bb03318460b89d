//! The one error type of the API and its mapping to HTTP: every failure, whether a handler's,
//! a guard's or a routing one, leaves as `application/problem+json` (RFC 9457). Database
//! causes are logged here with their context and never echoed to the client.

use std::io::Cursor;

use rocket::http::{ContentType, Status};
use rocket::response::{self, Responder};
use rocket::{catch, Request, Response};
use serde::Serialize;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: bad JSON, a bad query parameter or path segment.
    #[error("{0}")]
    BadRequest(String),
    /// The request is well-formed but its content is not acceptable.
    #[error("{0}")]
    Invalid(String),
    #[error("a valid agent token is required: send Authorization: Bearer <AGENT_TOKEN>")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the task's state or lease.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A chunk of output starts past the end of its stream: resend from `expected_offset`.
    #[error("the chunk starts past the end of the stream; resend from offset {expected_offset}")]
    OffsetGap { expected_offset: i64 },
    /// A finish states stream lengths that the uploaded output does not reach yet.
    #[error("the output uploaded so far is stdout {stdout_bytes} and stderr {stderr_bytes} bytes; upload the rest first")]
    OutputIncomplete { stdout_bytes: i64, stderr_bytes: i64 },
    /// The database cannot be reached or is shutting down; retrying later may work.
    #[error("the database is unavailable; retry later")]
    Unavailable,
    /// A bug or an unexpected database answer; the cause is in the server log.
    #[error("internal server error")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> Status {
        match self {
            ApiError::BadRequest(_) => Status::BadRequest,
            ApiError::Invalid(_) => Status::UnprocessableEntity,
            ApiError::Unauthorized => Status::Unauthorized,
            ApiError::NotFound(_) => Status::NotFound,
            ApiError::Conflict(_) => Status::Conflict,
            ApiError::OffsetGap { .. } | ApiError::OutputIncomplete { .. } => Status::Conflict,
            ApiError::PayloadTooLarge(_) => Status::PayloadTooLarge,
            ApiError::UnsupportedMediaType(_) => Status::UnsupportedMediaType,
            ApiError::Unavailable => Status::ServiceUnavailable,
            ApiError::Internal => Status::InternalServerError,
        }
    }

    /// A stable, machine-readable name for the problem (the RFC 9457 `type`).
    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Invalid(_) => "invalid-request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not-found",
            ApiError::Conflict(_) => "conflict",
            ApiError::OffsetGap { .. } => "offset-gap",
            ApiError::OutputIncomplete { .. } => "output-incomplete",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::Unavailable => "database-unavailable",
            ApiError::Internal => "internal",
        }
    }

    /// Records a request guard's failure so that the catcher Rocket calls next can answer
    /// with this detail rather than a bare status.
    pub fn remember(self, request: &Request<'_>) -> (Status, ApiError) {
        let status = self.status();
        request.local_cache(|| GuardFailure(Some(self.clone())));
        (status, self)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            log::warn!("database unavailable: {error}");
            ApiError::Unavailable
        } else {
            log::error!("database error: {error}");
            ApiError::Internal
        }
    }
}

/// Errors that mean "the database is not there right now" rather than "the query is wrong".
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        // A connection that closes during the handshake (a proxy in front of a dead server)
        // surfaces as a protocol error.
        sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        // 08: connection exception; 57P: operator intervention (shutdown, crash recovery);
        // 53: insufficient resources (too many connections).
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")),
        _ => false,
    }
}

/// The body of every error response, with the extension members (RFC 9457, section 3.2) that
/// tell an agent where its output stands.
#[derive(Serialize, Default)]
struct Problem {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr_bytes: Option<i64>,
}

fn problem_response<'o>(status: Status, kind: &str, detail: String) -> Response<'o> {
    problem_with(Problem {
        kind: format!("/problems/{kind}"),
        title: status.reason_lossy(),
        status: status.code,
        detail,
        ..Problem::default()
    })
}

fn problem_with<'o>(problem: Problem) -> Response<'o> {
    let status = Status::from_code(problem.status).unwrap_or(Status::InternalServerError);
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut response = Response::build();
    response
        .status(status)
        .header(ContentType::new("application", "problem+json"))
        .sized_body(body.len(), Cursor::new(body));
    if status == Status::Unauthorized {
        response.raw_header("WWW-Authenticate", "Bearer");
    }
    response.finalize()
}

impl<'r> Responder<'r, 'static> for ApiError {
    fn respond_to(self, _: &'r Request<'_>) -> response::Result<'static> {
        let status = self.status();
        let mut problem = Problem {
            kind: format!("/problems/{}", self.kind()),
            title: status.reason_lossy(),
            status: status.code,
            detail: self.to_string(),
            ..Problem::default()
        };
        match self {
            ApiError::OffsetGap { expected_offset } => {
                problem.expected_offset = Some(expected_offset)
            }
            ApiError::OutputIncomplete { stdout_bytes, stderr_bytes } => {
                problem.stdout_bytes = Some(stdout_bytes);
                problem.stderr_bytes = Some(stderr_bytes);
            }
            _ => {}
        }
        Ok(problem_with(problem))
    }
}

/// A guard failure remembered for the catcher.
struct GuardFailure(Option<ApiError>);

/// What the catcher answers: a remembered guard failure, or a problem for a bare status.
pub enum Caught {
    Guard(ApiError),
    Status(Status, String),
}

impl<'r> Responder<'r, 'static> for Caught {
    fn respond_to(self, request: &'r Request<'_>) -> response::Result<'static> {
        match self {
            Caught::Guard(error) => error.respond_to(request),
            Caught::Status(status, detail) => {
                let kind = status.reason_lossy().to_ascii_lowercase().replace(' ', "-");
                Ok(problem_response(status, &kind, detail))
            }
        }
    }
}

/// Answers every status Rocket itself produces (no route, a failed guard, a panic) in the
/// same problem+json shape as handler errors.
#[catch(default)]
pub fn catch_all(status: Status, request: &Request<'_>) -> Caught {
    if let GuardFailure(Some(error)) = request.local_cache(|| GuardFailure(None)) {
        return Caught::Guard(error.clone());
    }
    let what = format!("{} {}", request.method(), request.uri().path());
    let detail = match status.code {
        404 => format!("no resource at {what}"),
        422 => format!("a parameter of {what} is not valid"),
        500..=599 => {
            log::error!("{what} ended in {status}");
            "internal server error".into()
        }
        _ => format!("{what}: {}", status.reason_lossy()),
    };
    Caught::Status(status, detail)
}
