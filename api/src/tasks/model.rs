//! The task resource and the bodies that create and finish one, with their validation.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use rocket::data::ByteUnit;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::body::Limited;
use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, Serialize, Deserialize)]
#[sqlx(type_name = "task_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    InProgress,
    Finished,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 5] = [
        TaskStatus::Queued,
        TaskStatus::InProgress,
        TaskStatus::Finished,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// The name used in JSON and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Finished => "finished",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }
}

impl FromStr for TaskStatus {
    type Err = ApiError;

    fn from_str(s: &str) -> Result<Self, ApiError> {
        TaskStatus::ALL.into_iter().find(|status| status.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = TaskStatus::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::BadRequest(format!(
                "unknown status {s:?}; expected one of {}",
                names.join(", ")
            ))
        })
    }
}

/// A task as users see it. The lease is not part of it: it is the agent's capability.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct Task {
    pub id: Uuid,
    pub command: String,
    pub status: TaskStatus,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    /// When the agent reported the command running (its first heartbeat).
    pub running_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    /// The output was not valid UTF-8 (or held NUL bytes) and was converted lossily.
    pub stdout_lossy: bool,
    pub stderr_lossy: bool,
    /// The stream was longer than `max_output_bytes`: its middle was dropped, with a marker.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Bytes the stream has produced so far (dropped ones included), as streamed by the agent.
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub error: Option<String>,
    pub agent: Option<String>,
    pub attempts: i32,
    /// How long the command may run, in seconds.
    pub timeout_secs: i32,
    /// When a user asked to abort the running task.
    pub abort_requested_at: Option<DateTime<Utc>>,
    /// Creation order; the list cursor is made from it.
    #[serde(skip)]
    pub seq: i64,
}

impl Task {
    /// A task as inserted: queued, with the defaults of the table.
    pub fn queued(
        id: Uuid,
        command: String,
        timeout_secs: u32,
        created_at: DateTime<Utc>,
        seq: i64,
    ) -> Task {
        Task {
            id,
            command,
            status: TaskStatus::Queued,
            created_at,
            started_at: None,
            running_at: None,
            finished_at: None,
            exit_code: None,
            stdout: None,
            stderr: None,
            stdout_lossy: false,
            stderr_lossy: false,
            stdout_truncated: false,
            stderr_truncated: false,
            stdout_bytes: 0,
            stderr_bytes: 0,
            error: None,
            agent: None,
            attempts: 0,
            timeout_secs: timeout_secs as i32,
            abort_requested_at: None,
            seq,
        }
    }
}

/// The columns of `Task`, for every query that returns one, optionally qualified with a table
/// alias (`task_columns!("t.")`). A macro so that each query stays one `&'static str`.
#[rustfmt::skip]
macro_rules! task_columns {
    () => {
        task_columns!("", "stdout, stderr, ")
    };
    // For lists: the output is left out (as NULL), it can weigh megabytes per task.
    (summary) => {
        task_columns!("", "NULL::text AS stdout, NULL::text AS stderr, ")
    };
    ($p:literal) => {
        task_columns!($p, concat!($p, "stdout, ", $p, "stderr, "))
    };
    ($p:literal, $output:expr) => {
        concat!(
            $p, "id, ", $p, "command, ", $p, "status, ", $p, "created_at, ", $p, "started_at, ",
            $p, "running_at, ",
            $p, "finished_at, ", $p, "exit_code, ", $output,
            $p, "stdout_lossy, ", $p, "stderr_lossy, ", $p, "stdout_truncated, ",
            $p, "stderr_truncated, ", $p, "stdout_bytes, ", $p, "stderr_bytes, ",
            $p, "error, ", $p, "agent, ",
            $p, "attempts, ", $p, "timeout_secs, ", $p, "abort_requested_at, ", $p, "seq"
        )
    };
}
pub(crate) use task_columns;

/// A task handed to an agent, with the lease that fences its reports and the timings the
/// agent must keep: heartbeat before `lease_expires_at` (this first lease lasts `lease_secs`,
/// the confirmation window; heartbeats grant the full lease), stop the command after
/// `timeout_secs`, and wait `kill_grace_secs` between SIGTERM and SIGKILL.
#[derive(Debug, Serialize)]
pub struct Picked {
    #[serde(flatten)]
    pub task: Task,
    pub lease: Uuid,
    pub lease_expires_at: DateTime<Utc>,
    pub lease_secs: u32,
    pub kill_grace_secs: u32,
    /// The output the server keeps per stream: the agent streams and caps by the same rule.
    pub max_output_bytes: u32,
}

/// The body of `POST /tasks`, checked field by field so that each mistake gets its own
/// message.
#[derive(Debug)]
pub struct NewTask {
    pub command: String,
    pub timeout_secs: Option<u32>,
}

/// The fields a new task may set.
const SETTABLE: [&str; 2] = ["command", "timeout_secs"];

/// Fields of the task resource that the server owns.
const SERVER_OWNED: [&str; 20] = [
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
];

/// The limits a new task is checked against.
pub struct NewTaskLimits {
    pub max_command_bytes: usize,
    pub max_timeout_secs: u32,
}

impl NewTask {
    pub fn from_json(body: Value, limits: &NewTaskLimits) -> Result<NewTask, ApiError> {
        let Value::Object(mut fields) = body else {
            return Err(invalid(
                "the body must be a JSON object such as {\"command\": \"echo hi\"}",
            ));
        };
        reject_other_fields(&fields)?;
        let command = match fields.remove("command") {
            Some(Value::String(command)) => command,
            Some(Value::Null) | None => return Err(invalid("`command` is required")),
            Some(other) => {
                return Err(invalid(&format!("`command` must be a string, not {}", kind(&other))))
            }
        };
        if command.trim().is_empty() {
            return Err(invalid("`command` must not be empty or only whitespace"));
        }
        if command.contains('\0') {
            return Err(invalid("`command` must not contain NUL characters"));
        }
        if command.len() > limits.max_command_bytes {
            return Err(invalid(&format!(
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
                        invalid(&format!(
                            "`timeout_secs` must be a whole number of seconds from 1 to {}",
                            limits.max_timeout_secs
                        ))
                    })?,
            ),
        };
        Ok(NewTask { command, timeout_secs })
    }
}

fn reject_other_fields(fields: &Map<String, Value>) -> Result<(), ApiError> {
    let Some(field) = fields.keys().find(|k| !SETTABLE.contains(&k.as_str())) else {
        return Ok(());
    };
    let allowed = "a new task may set only `command` and `timeout_secs`";
    if SERVER_OWNED.contains(&field.as_str()) {
        Err(invalid(&format!("`{field}` is set by the server; {allowed}")))
    } else {
        Err(invalid(&format!("unknown field `{field}`; {allowed}")))
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

fn invalid(detail: &str) -> ApiError {
    ApiError::Invalid(detail.to_owned())
}

/// The raw body of `POST /tasks`, read within the `task` limit and then checked by
/// `NewTask::from_json`.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct NewTaskBody(pub Value);

impl Limited for NewTaskBody {
    const LIMIT: &'static str = "task";
    const DEFAULT_LIMIT: ByteUnit = ByteUnit::Kibibyte(128);
}

/// An agent's report on the attempt it holds the lease of. Unknown fields are ignored, so a
/// newer agent can report to an older server.
#[derive(Debug, Deserialize)]
pub struct FinishReport {
    pub lease: Uuid,
    /// Set when the command ran to an exit code.
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    #[serde(default)]
    pub stdout_lossy: bool,
    #[serde(default)]
    pub stderr_lossy: bool,
    /// Set when the command did not run to an exit code: why.
    pub error: Option<String>,
    /// The agent stopped the command because an abort was requested.
    #[serde(default)]
    pub aborted: bool,
    /// An agent that streamed the output states each stream's length; the finish is refused
    /// (409, with the lengths the server has) until its uploads add up to them.
    pub stdout_bytes: Option<i64>,
    pub stderr_bytes: Option<i64>,
    /// The agent dropped the middle of the stream (it is longer than it keeps).
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
}

impl Limited for FinishReport {
    const LIMIT: &'static str = "finish";
    const DEFAULT_LIMIT: ByteUnit = ByteUnit::Mebibyte(16);
}

/// The most of an agent's `error` text that is kept.
const MAX_ERROR_BYTES: usize = 4096;

/// A report that passed validation: what will be written.
#[derive(Debug)]
pub struct Outcome {
    pub lease: Uuid,
    pub status: TaskStatus,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_lossy: bool,
    pub stderr_lossy: bool,
    /// Record the task as `cancelled`, if an abort was indeed requested.
    pub aborted: bool,
    pub stdout_bytes: Option<i64>,
    pub stderr_bytes: Option<i64>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl FinishReport {
    /// Checks the report: the server does not take an agent's word for its shape. Output
    /// beyond `max_output_bytes` per stream is cut to its first and last halves.
    pub fn validate(self, max_output_bytes: usize) -> Result<Outcome, ApiError> {
        let (status, exit_code, error) = match (self.exit_code, self.error) {
            (Some(code), None) => {
                let code = i32::try_from(code)
                    .ok()
                    .filter(|c| (0..=255).contains(c))
                    .ok_or_else(|| invalid("`exit_code` must be between 0 and 255"))?;
                (TaskStatus::Finished, Some(code), None)
            }
            (None, Some(error)) if !error.trim().is_empty() => {
                (TaskStatus::Failed, None, Some(truncate(error, MAX_ERROR_BYTES)))
            }
            (Some(_), Some(_)) => {
                return Err(invalid("give `exit_code` (the command ran) or `error`, not both"))
            }
            _ => return Err(invalid("give `exit_code` (the command ran) or a non-empty `error`")),
        };
        for (name, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if text.contains('\0') {
                return Err(invalid(&format!(
                    "`{name}` holds NUL characters; replace them and set `{name}_lossy`"
                )));
            }
        }
        if error.as_deref().is_some_and(|e| e.contains('\0')) {
            return Err(invalid("`error` must not contain NUL characters"));
        }
        if [self.stdout_bytes, self.stderr_bytes].iter().flatten().any(|n| *n < 0) {
            return Err(invalid("`stdout_bytes` and `stderr_bytes` must not be negative"));
        }
        let (stdout, stdout_cut) = cap(self.stdout, max_output_bytes);
        let (stderr, stderr_cut) = cap(self.stderr, max_output_bytes);
        Ok(Outcome {
            lease: self.lease,
            status,
            exit_code,
            error,
            stdout,
            stderr,
            stdout_lossy: self.stdout_lossy,
            stderr_lossy: self.stderr_lossy,
            aborted: self.aborted,
            stdout_bytes: self.stdout_bytes,
            stderr_bytes: self.stderr_bytes,
            stdout_truncated: self.stdout_truncated || stdout_cut,
            stderr_truncated: self.stderr_truncated || stderr_cut,
        })
    }
}

/// The body of a heartbeat or a release: the lease the agent holds.
#[derive(Debug, Deserialize)]
pub struct LeaseBody {
    pub lease: Uuid,
}

impl Limited for LeaseBody {
    const LIMIT: &'static str = "task";
    const DEFAULT_LIMIT: ByteUnit = ByteUnit::Kibibyte(128);
}

/// The answer to a heartbeat.
#[derive(Debug, Serialize)]
pub struct HeartbeatReply {
    /// Stop the command: a user asked to abort the task.
    pub abort: bool,
    pub lease_expires_at: DateTime<Utc>,
    /// The length of the lease this heartbeat granted.
    pub lease_secs: u32,
}

impl Outcome {
    /// Whether `task` holds exactly this report: a retry of a finish already accepted.
    pub fn is_recorded_in(&self, task: &Task) -> bool {
        task.exit_code == self.exit_code
            && task.error == self.error
            && task.stdout.as_deref() == Some(self.stdout.as_str())
            && task.stderr.as_deref() == Some(self.stderr.as_str())
            && task.stdout_lossy == self.stdout_lossy
            && task.stderr_lossy == self.stderr_lossy
    }
}

/// Room for the agent's marker line beyond `max_output_bytes`.
const MARKER_ROOM: usize = 256;

/// Output cut to about `max_bytes`: its first and last halves, on character boundaries, with a
/// marker stating how many bytes were dropped. The second value says whether it was cut.
fn cap(text: String, max_bytes: usize) -> (String, bool) {
    if text.len() <= max_bytes + MARKER_ROOM {
        return (text, false);
    }
    let mut head_end = max_bytes / 2;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let mut tail_start = text.len() - max_bytes / 2;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    let dropped = tail_start - head_end;
    let marker = format!("\n[taskexec: {dropped} bytes of output dropped here]\n");
    (format!("{}{marker}{}", &text[..head_end], &text[tail_start..]), true)
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

    fn new_task(body: Value) -> Result<NewTask, String> {
        let limits = NewTaskLimits { max_command_bytes: 16, max_timeout_secs: 60 };
        NewTask::from_json(body, &limits).map_err(|e| e.to_string())
    }

    #[test]
    fn a_command_alone_is_accepted() {
        assert_eq!(new_task(json!({"command": "echo hi"})).unwrap().command, "echo hi");
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
            let error = new_task(body.clone()).expect_err(&body.to_string());
            assert!(error.contains(expected), "{body}: {error}");
        }
    }

    fn report(exit_code: Option<i64>, error: Option<&str>) -> FinishReport {
        FinishReport {
            lease: Uuid::nil(),
            exit_code,
            stdout: String::new(),
            stderr: String::new(),
            stdout_lossy: false,
            stderr_lossy: false,
            error: error.map(str::to_owned),
            aborted: false,
            stdout_bytes: None,
            stderr_bytes: None,
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }

    #[test]
    fn an_exit_code_finishes_and_an_error_fails() {
        assert_eq!(report(Some(3), None).validate(1 << 20).unwrap().status, TaskStatus::Finished);
        assert_eq!(
            report(None, Some("killed by signal 9")).validate(1 << 20).unwrap().status,
            TaskStatus::Failed
        );
    }

    #[test]
    fn impossible_reports_are_refused() {
        assert!(report(Some(256), None).validate(1 << 20).is_err());
        assert!(report(Some(-1), None).validate(1 << 20).is_err());
        assert!(report(Some(0), Some("both")).validate(1 << 20).is_err());
        assert!(report(None, None).validate(1 << 20).is_err());
        assert!(report(None, Some("  ")).validate(1 << 20).is_err());
        let mut nul = report(Some(0), None);
        nul.stdout = "a\0b".into();
        assert!(nul.validate(1 << 20).is_err());
        assert!(report(None, Some("bad\0error")).validate(1 << 20).is_err());
    }

    #[test]
    fn output_over_the_limit_keeps_both_ends_and_says_so() {
        let mut long = report(Some(0), None);
        long.stdout = format!("{}{}", "a".repeat(600), "z".repeat(600));
        let outcome = long.validate(512).unwrap();
        assert!(outcome.stdout_truncated);
        assert!(
            outcome.stdout.starts_with(&"a".repeat(256))
                && outcome.stdout.ends_with(&"z".repeat(256))
        );
        assert!(outcome.stdout.contains("[taskexec: 688 bytes of output dropped here]"));
        let short = report(Some(0), None).validate(512).unwrap();
        assert!(!short.stdout_truncated);
    }

    #[test]
    fn a_long_error_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let kept = report(None, Some(&long)).validate(1 << 20).unwrap().error.unwrap();
        assert!(kept.len() <= MAX_ERROR_BYTES && kept.chars().all(|c| c == 'é'));
    }
}
