//! Errors on the wire: every error response is an RFC 9457 problem
//! (`application/problem+json`) whose `type` names the kind of error, one per kind, so that
//! clients match on [`ProblemType`] rather than on words.

use serde::{Deserialize, Serialize};

/// The kinds of error, by their `type` URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemType {
    /// 400: malformed JSON, a malformed task id, cursor or path segment.
    BadRequest,
    /// 400: an unknown, repeated or malformed query parameter (named in `parameter`).
    BadParameter,
    /// 401: no valid credentials.
    Unauthorized,
    /// 403: valid credentials whose role may not do this.
    Forbidden,
    /// 404: no such task or route.
    NotFound,
    /// 409: the lease is not the task's current one, or its attempt has ended: another
    /// attempt owns the task. The agent drops the attempt.
    LeaseNotCurrent,
    /// 409: the task has ended, so it cannot be aborted.
    TaskEnded,
    /// 409: a different report for an attempt that was already reported.
    ReportConflict,
    /// 409: an output chunk starts past the end of its stream; resend from
    /// `expected_offset`.
    OffsetGap,
    /// 409: a finish states stream lengths that the uploads do not reach yet; upload from
    /// `stdout_bytes` / `stderr_bytes`.
    OutputIncomplete,
    /// 409: a finish whose text is not the text of the uploaded output.
    OutputMismatch,
    /// 413: a body over its limit.
    PayloadTooLarge,
    /// 415: a body of the wrong content type.
    UnsupportedMediaType,
    /// 422: well-formed JSON with a bad field.
    InvalidRequest,
    /// 429: the owner has as many tasks queued as it may; retry after `Retry-After`.
    QuotaExceeded,
    /// 429: the token has as many waits and follows open at once as it may.
    TooManyWaits,
    /// 503: the database is unreachable; retry later.
    Unavailable,
    /// 503: this API process holds as many waits and follows as it may; retry later.
    Busy,
    /// 500: a bug; the cause is in the server's log.
    Internal,
}

impl ProblemType {
    pub const ALL: [ProblemType; 19] = [
        ProblemType::BadRequest,
        ProblemType::BadParameter,
        ProblemType::Unauthorized,
        ProblemType::Forbidden,
        ProblemType::NotFound,
        ProblemType::LeaseNotCurrent,
        ProblemType::TaskEnded,
        ProblemType::ReportConflict,
        ProblemType::OffsetGap,
        ProblemType::OutputIncomplete,
        ProblemType::OutputMismatch,
        ProblemType::PayloadTooLarge,
        ProblemType::UnsupportedMediaType,
        ProblemType::InvalidRequest,
        ProblemType::QuotaExceeded,
        ProblemType::TooManyWaits,
        ProblemType::Unavailable,
        ProblemType::Busy,
        ProblemType::Internal,
    ];

    /// The `type` member: a relative URI, stable across versions.
    pub fn uri(self) -> &'static str {
        match self {
            ProblemType::BadRequest => "/problems/bad-request",
            ProblemType::BadParameter => "/problems/bad-parameter",
            ProblemType::Unauthorized => "/problems/unauthorized",
            ProblemType::Forbidden => "/problems/forbidden",
            ProblemType::NotFound => "/problems/not-found",
            ProblemType::LeaseNotCurrent => "/problems/lease-not-current",
            ProblemType::TaskEnded => "/problems/task-ended",
            ProblemType::ReportConflict => "/problems/report-conflict",
            ProblemType::OffsetGap => "/problems/offset-gap",
            ProblemType::OutputIncomplete => "/problems/output-incomplete",
            ProblemType::OutputMismatch => "/problems/output-mismatch",
            ProblemType::PayloadTooLarge => "/problems/payload-too-large",
            ProblemType::UnsupportedMediaType => "/problems/unsupported-media-type",
            ProblemType::InvalidRequest => "/problems/invalid-request",
            ProblemType::QuotaExceeded => "/problems/quota-exceeded",
            ProblemType::TooManyWaits => "/problems/too-many-waits",
            ProblemType::Unavailable => "/problems/database-unavailable",
            ProblemType::Busy => "/problems/busy",
            ProblemType::Internal => "/problems/internal",
        }
    }

    /// The HTTP status that goes with the kind.
    pub fn status(self) -> u16 {
        match self {
            ProblemType::BadRequest | ProblemType::BadParameter => 400,
            ProblemType::Unauthorized => 401,
            ProblemType::Forbidden => 403,
            ProblemType::NotFound => 404,
            ProblemType::LeaseNotCurrent
            | ProblemType::TaskEnded
            | ProblemType::ReportConflict
            | ProblemType::OffsetGap
            | ProblemType::OutputIncomplete
            | ProblemType::OutputMismatch => 409,
            ProblemType::PayloadTooLarge => 413,
            ProblemType::UnsupportedMediaType => 415,
            ProblemType::InvalidRequest => 422,
            ProblemType::QuotaExceeded | ProblemType::TooManyWaits => 429,
            ProblemType::Unavailable | ProblemType::Busy => 503,
            ProblemType::Internal => 500,
        }
    }

    pub fn from_uri(uri: &str) -> Option<ProblemType> {
        ProblemType::ALL.into_iter().find(|kind| kind.uri() == uri)
    }
}

/// The body of every error response, with the extension members (RFC 9457, section 3.2) that
/// tell a client what to do next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    /// A [`ProblemType::uri`] (kept as a string: a newer server may send a kind this client
    /// does not know).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// This occurrence: `urn:taskexec:request:<id>`, the `X-Request-Id` of the request, which
    /// the server's log lines of it carry too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The query parameter at fault (`bad-parameter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// Where to resend output from (`offset-gap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_offset: Option<u64>,
    /// How much output the server has (`output-incomplete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<u64>,
}

impl Problem {
    /// The kind, when this client knows it.
    pub fn problem_type(&self) -> Option<ProblemType> {
        ProblemType::from_uri(&self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_uri_and_parses_back() {
        let mut uris = std::collections::HashSet::new();
        for kind in ProblemType::ALL {
            assert!(uris.insert(kind.uri()), "{kind:?} shares its URI");
            assert_eq!(ProblemType::from_uri(kind.uri()), Some(kind));
        }
        assert_eq!(ProblemType::from_uri("/problems/nonsense"), None);
    }
}
