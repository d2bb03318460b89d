//! The one error type of the API and its mapping to HTTP: every failure, whether a handler's,
//! a guard's or a routing one, leaves as `application/problem+json` (RFC 9457), one problem
//! type per kind of error. This is the only place where statuses are chosen. Database causes
//! are logged once, with the operation that failed, where they become an `ApiError`; they are
//! never echoed to the client.

use std::io::Cursor;

use rocket::http::{ContentType, Status};
use rocket::response::{self, Responder};
use rocket::{catch, Request, Response};
use taskexec_protocol::{Problem, ProblemType, Stream, TaskId, TaskStatus};

use crate::db::DbError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: bad JSON, a bad path segment or cursor.
    #[error("{0}")]
    Malformed(String),
    /// A query parameter is unknown, repeated or malformed.
    #[error("{detail}")]
    BadParameter { name: String, detail: String },
    /// The request is well-formed but its content is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// No valid token: none, malformed, unknown, revoked or expired.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token whose role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The owner has as many tasks queued as it may.
    #[error("{owner} has {max} tasks queued, as many as it may; retry when some have started")]
    QuotaExceeded { owner: String, max: u64 },
    #[error("{0}")]
    NotFound(String),
    /// An agent write under a lease that is not the task's current one, or whose attempt has
    /// ended.
    #[error("task {id} is not running under this lease: {why}")]
    LeaseNotCurrent { id: TaskId, why: String },
    /// An abort of a task that has ended.
    #[error("task {id} is {status}; only a queued or running task can be aborted")]
    TaskEnded { id: TaskId, status: TaskStatus },
    /// A second, different report for an attempt already reported.
    #[error("task {id} was already reported {status} with a different result")]
    ReportConflict { id: TaskId, status: TaskStatus },
    /// A chunk of output starts past the end of its stream: resend from `expected_offset`.
    #[error("the chunk starts past the end of the stream; resend from offset {expected_offset}")]
    OffsetGap { expected_offset: u64 },
    /// A finish states stream lengths other than those of the uploaded output.
    #[error("the output uploaded for this attempt is stdout {stdout_bytes} and stderr {stderr_bytes} bytes so far; upload the rest, and state the lengths of the uploads")]
    OutputIncomplete { stdout_bytes: u64, stderr_bytes: u64 },
    /// A finish whose text is not the text of the output uploaded for the attempt.
    #[error("the reported {0} is not the text of the {0} uploaded for this attempt (or its uploads leave a gap in the stream's first half)")]
    OutputMismatch(Stream),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The database cannot be reached or is shutting down; retrying later may work.
    #[error("{0}")]
    TooManyWaits(String),
    #[error("the database is unavailable; retry later")]
    Unavailable,
    #[error("{0}")]
    Busy(String),
    /// A bug or an unexpected database answer; the cause is in the server log.
    #[error("internal server error")]
    Internal,
}

impl ApiError {
    /// The kind of problem, which decides the status.
    pub fn kind(&self) -> ProblemType {
        match self {
            ApiError::Malformed(_) => ProblemType::BadRequest,
            ApiError::BadParameter { .. } => ProblemType::BadParameter,
            ApiError::Invalid(_) => ProblemType::InvalidRequest,
            ApiError::Unauthorized(_) => ProblemType::Unauthorized,
            ApiError::Forbidden(_) => ProblemType::Forbidden,
            ApiError::QuotaExceeded { .. } => ProblemType::QuotaExceeded,
            ApiError::NotFound(_) => ProblemType::NotFound,
            ApiError::LeaseNotCurrent { .. } => ProblemType::LeaseNotCurrent,
            ApiError::TaskEnded { .. } => ProblemType::TaskEnded,
            ApiError::ReportConflict { .. } => ProblemType::ReportConflict,
            ApiError::OffsetGap { .. } => ProblemType::OffsetGap,
            ApiError::OutputIncomplete { .. } => ProblemType::OutputIncomplete,
            ApiError::OutputMismatch(_) => ProblemType::OutputMismatch,
            ApiError::PayloadTooLarge(_) => ProblemType::PayloadTooLarge,
            ApiError::UnsupportedMediaType(_) => ProblemType::UnsupportedMediaType,
            ApiError::TooManyWaits(_) => ProblemType::TooManyWaits,
            ApiError::Unavailable => ProblemType::Unavailable,
            ApiError::Busy(_) => ProblemType::Busy,
            ApiError::Internal => ProblemType::Internal,
        }
    }

    pub fn status(&self) -> Status {
        Status::from_code(self.kind().status()).unwrap_or(Status::InternalServerError)
    }

    /// A query parameter that is not what the route takes.
    pub fn bad_parameter(name: &str, detail: impl Into<String>) -> ApiError {
        ApiError::BadParameter { name: name.to_owned(), detail: detail.into() }
    }

    pub fn task_not_found(id: TaskId) -> ApiError {
        ApiError::NotFound(format!("no task with id {id}"))
    }

    /// Records a request guard's failure so that the catcher Rocket calls next can answer
    /// with this detail rather than a bare status.
    pub fn remember(self, request: &Request<'_>) -> (Status, ApiError) {
        let status = self.status();
        request.local_cache(|| GuardFailure(Some(self.clone())));
        (status, self)
    }

    pub(crate) fn problem(&self) -> Problem {
        let kind = self.kind();
        let mut problem = Problem {
            kind: kind.uri().to_owned(),
            title: self.status().reason_lossy().to_owned(),
            status: kind.status(),
            detail: self.to_string(),
            ..Problem::default()
        };
        match self {
            ApiError::BadParameter { name, .. } => problem.parameter = Some(name.clone()),
            ApiError::OffsetGap { expected_offset } => {
                problem.expected_offset = Some(*expected_offset)
            }
            ApiError::OutputIncomplete { stdout_bytes, stderr_bytes } => {
                problem.stdout_bytes = Some(*stdout_bytes);
                problem.stderr_bytes = Some(*stderr_bytes);
            }
            _ => {}
        }
        problem
    }
}

/// The one place a database failure is logged: with its operation and cause, as a warning
/// when the database is away (the client is told to retry), as an error otherwise.
impl From<DbError> for ApiError {
    fn from(error: DbError) -> Self {
        if error.is_unavailable() {
            log::warn!("database unavailable: {error}");
            ApiError::Unavailable
        } else {
            log::error!("database error: {error}");
            ApiError::Internal
        }
    }
}

impl From<crate::tasks::model::Rejected> for ApiError {
    fn from(rejected: crate::tasks::model::Rejected) -> Self {
        ApiError::Invalid(rejected.0)
    }
}

/// How long a client over its quota is told to wait.
const RETRY_AFTER_SECS: u64 = 5;

/// The most of a problem's detail sent back: details quote what the client sent (a path, a
/// parameter, a value), and a client must not get its megabyte echoed, nor make the server
/// build it.
const MAX_DETAIL_BYTES: usize = 512;
const MAX_PARAMETER_BYTES: usize = 64;

/// `text` cut to at most `max` bytes, on a character boundary, with "…" when cut.
fn capped(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The problem as a response, naming its request (`instance`) so that a client's report of it
/// leads to the request's log lines.
fn problem_response<'o>(problem: &Problem, request: &Request<'_>) -> Response<'o> {
    let status = Status::from_code(problem.status).unwrap_or(Status::InternalServerError);
    let mut problem = problem.clone();
    problem.instance =
        Some(format!("urn:taskexec:request:{}", crate::logging::request_id(request)));
    problem.detail = capped(&problem.detail, MAX_DETAIL_BYTES);
    problem.parameter = problem.parameter.map(|name| capped(&name, MAX_PARAMETER_BYTES));
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    let mut response = Response::build();
    response
        .status(status)
        .header(ContentType::new("application", "problem+json"))
        .sized_body(body.len(), Cursor::new(body));
    if status == Status::Unauthorized {
        response.raw_header("WWW-Authenticate", "Bearer");
    }
    // Every 429 and 503 passes: a quota, a cap on waits, the database or this process busy.
    if status == Status::TooManyRequests || status == Status::ServiceUnavailable {
        response.raw_header("Retry-After", RETRY_AFTER_SECS.to_string());
    }
    response.finalize()
}

impl<'r> Responder<'r, 'static> for ApiError {
    fn respond_to(self, request: &'r Request<'_>) -> response::Result<'static> {
        Ok(problem_response(&self.problem(), request))
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
                let kind = match status.code {
                    400 => ProblemType::BadRequest,
                    401 => ProblemType::Unauthorized,
                    403 => ProblemType::Forbidden,
                    404 => ProblemType::NotFound,
                    413 => ProblemType::PayloadTooLarge,
                    415 => ProblemType::UnsupportedMediaType,
                    422 => ProblemType::InvalidRequest,
                    503 => ProblemType::Unavailable,
                    _ => ProblemType::Internal,
                };
                let problem = Problem {
                    kind: kind.uri().to_owned(),
                    title: status.reason_lossy().to_owned(),
                    status: status.code,
                    detail,
                    ..Problem::default()
                };
                Ok(problem_response(&problem, request))
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

#[cfg(test)]
mod tests {
    use super::capped;

    #[test]
    fn quoted_input_is_capped_on_a_character_boundary() {
        assert_eq!(capped("short", 512), "short");
        let long = "é".repeat(1000);
        let cut = capped(&long, 512);
        assert!(cut.len() <= 512 && cut.ends_with('…'), "{} bytes", cut.len());
        assert!(cut.trim_end_matches('…').chars().all(|c| c == 'é'));
    }
}
