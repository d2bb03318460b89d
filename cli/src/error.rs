//! The one error type of the command line. Each error is shown as one line that says what
//! went wrong and what to do about it, and maps to the exit code: 2 for arguments that cannot
//! work together (as clap's own argument errors), 1 for everything else, the settings of the
//! command line itself included (no token, a config file that cannot be read).

use taskexec_protocol::ProblemType;

const CHECK_URL: &str = "check --url (or TASKEXEC_URL) and that the API is running";
const CHECK_CA: &str = "its TLS certificate was not accepted (a private CA goes in --ca-file)";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API refused the request: its status and problem (RFC 9457), with a hint by kind.
    #[error("{status} {title}: {detail}{}", hint(*.kind, *.retry_after, .request.as_deref()))]
    Api {
        status: u16,
        title: String,
        detail: String,
        kind: Option<ProblemType>,
        /// `Retry-After`, in seconds (429 and 503).
        retry_after: Option<u64>,
        /// The request id the server's log lines carry (from the problem's `instance`).
        request: Option<String>,
    },
    /// The API could not be reached, or did not answer in time: it may answer in a moment.
    #[error("cannot reach the API at {url}: {cause}; {}", CHECK_URL)]
    Unreachable { url: String, cause: String },
    /// The API's TLS certificate (or the TLS session) was refused: no retry will change that.
    #[error("cannot reach the API at {url}: {cause}; {}", CHECK_CA)]
    Tls { url: String, cause: String },
    /// The API answered something this command cannot read.
    #[error("the API answered something unexpected: {0}")]
    Unexpected(String),
    /// The settings are missing or wrong: no token, an unreadable file, an unusable URL.
    #[error("{0}")]
    Config(String),
    /// A local read or write failed.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A thread of this command panicked: a bug of its own, whatever the API did.
    #[error("{0} (a bug of taskexec)")]
    Internal(String),
    /// A combination of arguments that cannot work, found after parsing: exit 2, as clap's.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// The process's exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }

    /// Whether the same request may succeed in a moment: the API was unreachable or said so
    /// (429, 502-504). Long waits ride over such blips rather than give up on a running task; a
    /// refused certificate or an unreadable answer would only come back.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            Error::Api { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            _ => false,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { what: what.into(), source }
    }
}

/// What to do about a problem of this kind, appended to its detail.
fn hint(kind: Option<ProblemType>, retry_after: Option<u64>, request: Option<&str>) -> String {
    let retry = || match retry_after {
        Some(secs) => format!("; retry in {secs} s"),
        None => "; retry later".to_owned(),
    };
    match kind {
        Some(ProblemType::Unauthorized) => "; run taskexec login".to_owned(),
        Some(ProblemType::Forbidden) => "; this needs a token of another role".to_owned(),
        Some(
            ProblemType::QuotaExceeded
            | ProblemType::TooManyWaits
            | ProblemType::Unavailable
            | ProblemType::Busy,
        ) => retry(),
        Some(ProblemType::Internal) => match request {
            Some(id) => format!("; the server's log has the cause, under request {id}"),
            None => "; the server's log has the cause".to_owned(),
        },
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, title: &str, detail: &str, kind: ProblemType) -> Error {
        Error::Api {
            status,
            title: title.into(),
            detail: detail.into(),
            kind: Some(kind),
            retry_after: Some(1),
            request: Some("8f0c".into()),
        }
    }

    #[test]
    fn an_api_error_says_what_went_wrong_and_what_to_do() {
        let detail = "the token is unknown, revoked or expired";
        let revoked = api(401, "Unauthorized", detail, ProblemType::Unauthorized);
        assert_eq!(
            revoked.to_string(),
            "401 Unauthorized: the token is unknown, revoked or expired; run taskexec login"
        );
        let busy = api(503, "Service Unavailable", "busy", ProblemType::Busy);
        assert_eq!(busy.to_string(), "503 Service Unavailable: busy; retry in 1 s");
        assert!(busy.is_transient() && !revoked.is_transient());
        let bug = api(500, "Internal Server Error", "a bug", ProblemType::Internal);
        assert!(bug.to_string().ends_with("under request 8f0c"), "{bug}");
        assert_eq!(revoked.exit_code(), 1);
        assert_eq!(Error::Usage("no".into()).exit_code(), 2);
        assert_eq!(Error::Config("no token".into()).exit_code(), 1);
    }

    #[test]
    fn only_an_unreachable_or_busy_api_is_worth_retrying() {
        let (url, cause) = ("https://api".to_owned(), "x".to_owned());
        let tls = Error::Tls { url: url.clone(), cause: cause.clone() };
        assert!(Error::Unreachable { url, cause }.is_transient());
        assert!(!tls.is_transient());
        assert!(tls.to_string().ends_with("(a private CA goes in --ca-file)"));
        assert!(!Error::Unexpected("too large".into()).is_transient());
    }
}
