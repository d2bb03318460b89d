//! What the server checks before it writes: a new task's fields, and an agent's finish report.
//! The server does not take a body's word for its shape; each mistake gets its own message.

use rocket::data::ByteUnit;
use serde::Deserialize;
use serde_json::{Map, Value};
use taskexec_protocol::output::OutputText;
use taskexec_protocol::{FinishReport, LeaseBody, NewTask, Task, TaskStatus};

use crate::body::Limited;

/// A body whose content is not acceptable (a 422): the reason, for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

fn rejected(detail: impl Into<String>) -> Rejected {
    Rejected(detail.into())
}

/// The fields a new task may set.
const SETTABLE: [&str; 2] = ["command", "timeout_secs"];

/// Fields of the task resource that the server owns.
const SERVER_OWNED: [&str; 23] = [
    "command_truncated",
    "id",
    "status",
    "created_at",
    "started_at",
    "running_at",
    "finished_at",
    "exit_code",
    "stdout",
    "stderr",
    "stdout_lossy",
    "stderr_lossy",
    "stdout_truncated",
    "stderr_truncated",
    "stdout_bytes",
    "stderr_bytes",
    "error",
    "agent",
    "attempts",
    "abort_requested_at",
    "lease",
    "owner",
    "aborted_by",
];

/// The limits a new task is checked against.
pub struct NewTaskLimits {
    pub max_command_bytes: usize,
    pub max_timeout_secs: u32,
}

/// The body of `POST /tasks`, checked field by field (rather than by serde) so that each
/// mistake gets its own message.
pub fn new_task(body: Value, limits: &NewTaskLimits) -> Result<NewTask, Rejected> {
    let Value::Object(mut fields) = body else {
        return Err(rejected("the body must be a JSON object such as {\"command\": \"echo hi\"}"));
    };
    reject_other_fields(&fields)?;
    let command = match fields.remove("command") {
        Some(Value::String(command)) => command,
        Some(Value::Null) | None => return Err(rejected("`command` is required")),
        Some(other) => {
            return Err(rejected(format!("`command` must be a string, not {}", kind(&other))))
        }
    };
    if command.trim().is_empty() {
        return Err(rejected("`command` must not be empty or only whitespace"));
    }
    if command.contains('\0') {
        return Err(rejected("`command` must not contain NUL characters"));
    }
    if command.len() > limits.max_command_bytes {
        return Err(rejected(format!(
            "`command` is {} bytes; the limit is {}",
            command.len(),
            limits.max_command_bytes
        )));
    }
    let timeout_secs = match fields.remove("timeout_secs") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (1..=limits.max_timeout_secs).contains(n))
                .ok_or_else(|| {
                    rejected(format!(
                        "`timeout_secs` must be a whole number of seconds from 1 to {}",
                        limits.max_timeout_secs
                    ))
                })?,
        ),
    };
    Ok(NewTask { command, timeout_secs })
}

fn reject_other_fields(fields: &Map<String, Value>) -> Result<(), Rejected> {
    let Some(field) = fields.keys().find(|k| !SETTABLE.contains(&k.as_str())) else {
        return Ok(());
    };
    let allowed = "a new task may set only `command` and `timeout_secs`";
    if SERVER_OWNED.contains(&field.as_str()) {
        Err(rejected(format!("`{field}` is set by the server; {allowed}")))
    } else {
        Err(rejected(format!("unknown field `{field}`; {allowed}")))
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The raw body of `POST /tasks`, read within the `task` limit and then checked by
/// `new_task`.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct NewTaskBody(pub Value);

impl Limited for NewTaskBody {
    const LIMIT: &'static str = "task";
    const DEFAULT_LIMIT: ByteUnit = ByteUnit::Kibibyte(128);
}

impl Limited for FinishReport {
    const LIMIT: &'static str = "finish";
    const DEFAULT_LIMIT: ByteUnit = ByteUnit::Mebibyte(16);
}

impl Limited for LeaseBody {
    const LIMIT: &'static str = "task";
    const DEFAULT_LIMIT: ByteUnit = ByteUnit::Kibibyte(128);
}

/// The most of an agent's `error` text that is kept.
const MAX_ERROR_BYTES: usize = 4096;

/// The longest ago a command is taken to have started, in milliseconds (timeouts end at one
/// day; a finish retried through a long outage must not push `running_at` before its pick).
const MAX_STARTED_MS_AGO: u64 = 2 * 86_400_000;

/// A report that passed validation: what will be written.
#[derive(Debug)]
pub struct Outcome {
    pub status: TaskStatus,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// Each stream's text as reported, if it was: it must be the text of the uploads.
    pub reported: [Option<OutputText>; 2],
    /// Record the task as `cancelled`, if an abort was indeed requested.
    pub aborted: bool,
    /// The stream lengths the report states: they must be the lengths of the uploads.
    pub lengths: Option<[u64; 2]>,
    /// How long before the report the command started, when it did.
    pub started_ms_ago: Option<u64>,
}

/// Checks an agent's report.
///
/// # Errors
/// `Rejected` for a report that cannot be true: both or neither of an exit code and an error,
/// an exit code outside 0 to 255, NUL characters, half-stated lengths.
pub fn outcome(report: FinishReport) -> Result<Outcome, Rejected> {
    let (status, exit_code, error) = match (report.exit_code, report.error) {
        (Some(code), None) if (0..=255).contains(&code) => (TaskStatus::Finished, Some(code), None),
        (Some(_), None) => return Err(rejected("`exit_code` must be between 0 and 255")),
        (None, Some(error)) if !error.trim().is_empty() => {
            (TaskStatus::Failed, None, Some(truncate(error, MAX_ERROR_BYTES)))
        }
        (Some(_), Some(_)) => {
            return Err(rejected("give `exit_code` (the command ran) or `error`, not both"))
        }
        _ => return Err(rejected("give `exit_code` (the command ran) or a non-empty `error`")),
    };
    for (name, text) in [("stdout", &report.stdout), ("stderr", &report.stderr)] {
        if text.as_deref().is_some_and(|t| t.contains('\0')) {
            return Err(rejected(format!(
                "`{name}` holds NUL characters; replace them and set `{name}_lossy`"
            )));
        }
    }
    if error.as_deref().is_some_and(|e| e.contains('\0')) {
        return Err(rejected("`error` must not contain NUL characters"));
    }
    let lengths = match (report.stdout_bytes, report.stderr_bytes) {
        (Some(stdout), Some(stderr)) => Some([stdout, stderr]),
        (None, None) => None,
        _ => return Err(rejected("state both `stdout_bytes` and `stderr_bytes`, or neither")),
    };
    let text = |text: Option<String>, lossy: bool, truncated: bool| {
        text.map(|text| OutputText { text, lossy, truncated })
    };
    Ok(Outcome {
        status,
        exit_code,
        error,
        reported: [
            text(report.stdout, report.stdout_lossy, report.stdout_truncated),
            text(report.stderr, report.stderr_lossy, report.stderr_truncated),
        ],
        aborted: report.aborted,
        lengths,
        // Clamped, not refused: a finish retried for days must still be taken.
        started_ms_ago: report.started_ms_ago.map(|ms| ms.min(MAX_STARTED_MS_AGO)),
    })
}

impl Outcome {
    /// Whether `task` holds exactly this report: a retry of a finish already accepted.
    pub fn is_recorded_in(&self, task: &Task) -> bool {
        let [stdout, stderr] = &self.reported;
        let same =
            |reported: &Option<OutputText>, text: &Option<String>, lossy: bool| match reported {
                None => true,
                Some(r) => Some(&r.text) == text.as_ref() && r.lossy == lossy,
            };
        task.exit_code == self.exit_code
            && task.error == self.error
            && same(stdout, &task.stdout, task.stdout_lossy)
            && same(stderr, &task.stderr, task.stderr_lossy)
    }
}

fn truncate(mut text: String, max_bytes: usize) -> String {
    if text.len() > max_bytes {
        let mut end = max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use taskexec_protocol::LeaseToken;

    fn checked(body: Value) -> Result<NewTask, String> {
        let limits = NewTaskLimits { max_command_bytes: 16, max_timeout_secs: 60 };
        new_task(body, &limits).map_err(|e| e.to_string())
    }

    #[test]
    fn a_command_alone_is_accepted() {
        assert_eq!(checked(json!({"command": "echo hi"})).unwrap().command, "echo hi");
    }

    #[test]
    fn each_bad_new_task_is_named() {
        let cases = [
            (json!([]), "JSON object"),
            (json!({}), "`command` is required"),
            (json!({"command": null}), "`command` is required"),
            (json!({"command": 5}), "must be a string, not a number"),
            (json!({"command": " \n\t"}), "empty or only whitespace"),
            (json!({"command": "a\u{0}b"}), "NUL"),
            (json!({"command": "x".repeat(17)}), "17 bytes; the limit is 16"),
            (json!({"command": "ls", "status": "finished"}), "`status` is set by the server"),
            (json!({"command": "ls", "priority": 1}), "unknown field `priority`"),
        ];
        for (body, expected) in cases {
            let error = checked(body.clone()).expect_err(&body.to_string());
            assert!(error.contains(expected), "{body}: {error}");
        }
    }

    fn report(exit_code: Option<i32>, error: Option<&str>) -> FinishReport {
        let lease = LeaseToken::random();
        match (exit_code, error) {
            (Some(code), _) => FinishReport {
                error: error.map(str::to_owned),
                ..FinishReport::exited(lease, code)
            },
            (None, Some(error)) => FinishReport::failed(lease, error),
            (None, None) => FinishReport { exit_code: None, ..FinishReport::exited(lease, 0) },
        }
    }

    #[test]
    fn an_exit_code_finishes_and_an_error_fails() {
        assert_eq!(outcome(report(Some(3), None)).unwrap().status, TaskStatus::Finished);
        let failed = outcome(report(None, Some("killed by signal 9"))).unwrap();
        assert_eq!(failed.status, TaskStatus::Failed);
    }

    #[test]
    fn impossible_reports_are_refused() {
        assert!(outcome(report(Some(256), None)).is_err());
        assert!(outcome(report(Some(-1), None)).is_err());
        assert!(outcome(report(Some(0), Some("both"))).is_err());
        assert!(outcome(report(None, None)).is_err());
        assert!(outcome(report(None, Some("  "))).is_err());
        let nul = FinishReport { stdout: Some("a\0b".into()), ..report(Some(0), None) };
        assert!(outcome(nul).is_err());
        assert!(outcome(report(None, Some("bad\0error"))).is_err());
        let half = FinishReport { stdout_bytes: Some(1), ..report(Some(0), None) };
        assert!(outcome(half).is_err());
    }

    #[test]
    fn a_reported_text_is_kept_as_given_and_one_left_out_stays_out() {
        let given = FinishReport { stdout: Some("a".repeat(600)), ..report(Some(0), None) };
        let [stdout, stderr] = outcome(given).unwrap().reported;
        assert_eq!(stdout.unwrap().text, "a".repeat(600), "capped later, by the attempt's cap");
        assert_eq!(stderr, None);
    }

    #[test]
    fn a_long_error_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let kept = outcome(report(None, Some(&long))).unwrap().error.unwrap();
        assert!(kept.len() <= MAX_ERROR_BYTES && kept.chars().all(|c| c == 'é'));
    }
}
