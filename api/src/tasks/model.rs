//! What the server checks before it writes: a new task's fields, and an agent's finish report.
//! The server does not take a body's word for its shape; each mistake gets its own message.

use rocket::data::ByteUnit;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use taskexec_protocol::output::OutputText;

use taskexec_protocol::{
    is_env_name, is_tag, FinishReport, LeaseBody, NewTask, ReleaseBody, Task, TaskStatus,
};

use crate::body::Limited;

/// A body whose content is not acceptable (a 422): the reason, for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

fn rejected(detail: impl Into<String>) -> Rejected {
    Rejected(detail.into())
}

/// The fields a new task may set.
const SETTABLE: [&str; 10] = [
    "command",
    "timeout_secs",
    "tags",
    "priority",
    "run_at",
    "delay_secs",
    "max_retries",
    "retry_backoff_secs",
    "env",
    "cwd",
];

/// The most tags a task may require.
pub const MAX_TAGS: usize = 16;
/// The most variables a task's `env` may hold, and their names' and values' total size.
pub const MAX_ENV_VARS: usize = 64;
pub const MAX_ENV_BYTES: usize = 32 * 1024;
/// The furthest ahead a task may be delayed: a year.
pub const MAX_DELAY_SECS: u32 = 366 * 86_400;
/// The longest `cwd`, in bytes (PATH_MAX).
const MAX_CWD_BYTES: usize = 4096;

/// Fields of the task resource that the server owns.
const SERVER_OWNED: [&str; 24] = [
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
    "retries",
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
    let tags = tags(fields.remove("tags"))?;
    let priority = number(fields.remove("priority"), "priority", -100, 100)?.map(|n| n as i32);
    let run_at = match fields.remove("run_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(
            chrono::DateTime::parse_from_rfc3339(&text)
                .map_err(|_| {
                    rejected(format!(
                        "`run_at` must be an RFC 3339 time such as 2026-12-31T23:59:00Z, not {text:?}"
                    ))
                })?
                .with_timezone(&chrono::Utc),
        ),
        Some(other) => {
            return Err(rejected(format!("`run_at` must be an RFC 3339 time, not {}", kind(&other))))
        }
    };
    if run_at.is_some_and(|at| {
        at > chrono::Utc::now() + chrono::Duration::seconds(MAX_DELAY_SECS.into())
    }) {
        return Err(rejected("`run_at` must be within a year from now"));
    }
    let delay_secs = number(fields.remove("delay_secs"), "delay_secs", 0, MAX_DELAY_SECS.into())?
        .map(|n| n as u32);
    if run_at.is_some() && delay_secs.is_some() {
        return Err(rejected("give `run_at` or `delay_secs`, not both"));
    }
    let max_retries = number(fields.remove("max_retries"), "max_retries", 0, 20)?.map(|n| n as u32);
    let retry_backoff_secs =
        number(fields.remove("retry_backoff_secs"), "retry_backoff_secs", 0, 3600)?
            .map(|n| n as u32);
    let env = env(fields.remove("env"))?;
    let cwd = match fields.remove("cwd") {
        None | Some(Value::Null) => None,
        Some(Value::String(cwd)) if cwd.starts_with('/') && !cwd.contains('\0') && cwd.len() <= MAX_CWD_BYTES => {
            Some(cwd)
        }
        Some(_) => {
            return Err(rejected(format!(
                "`cwd` must be an absolute path (starting with /) of at most {MAX_CWD_BYTES} bytes, without NUL"
            )))
        }
    };
    Ok(NewTask {
        command,
        timeout_secs,
        tags,
        priority,
        run_at,
        delay_secs,
        max_retries,
        retry_backoff_secs,
        env,
        cwd,
    })
}

/// A whole number within `min..=max`, if given.
fn number(value: Option<Value>, name: &str, min: i64, max: i64) -> Result<Option<i64>, Rejected> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            value.as_i64().filter(|n| (min..=max).contains(n)).map(Some).ok_or_else(|| {
                rejected(format!("`{name}` must be a whole number from {min} to {max}"))
            })
        }
    }
}

/// Tags, sorted and without repeats.
fn tags(value: Option<Value>) -> Result<Vec<String>, Rejected> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(rejected(format!(
                "`tags` must be an array of strings, not {}",
                kind(&other)
            )))
        }
    };
    let mut tags = std::collections::BTreeSet::new();
    for item in items {
        match item {
            Value::String(tag) if is_tag(&tag) => {
                tags.insert(tag);
            }
            other => {
                return Err(rejected(format!(
                    "`tags` holds {other}; a tag is 1 to 64 of a-z, 0-9, `_`, `.`, `-`, \
                     starting with a letter or digit"
                )))
            }
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(rejected(format!("`tags` holds {} tags; the limit is {MAX_TAGS}", tags.len())));
    }
    Ok(tags.into_iter().collect())
}

fn env(value: Option<Value>) -> Result<BTreeMap<String, String>, Rejected> {
    let vars = match value {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(vars)) => vars,
        Some(other) => {
            return Err(rejected(format!(
                "`env` must be an object of strings such as {{\"MODE\": \"fast\"}}, not {}",
                kind(&other)
            )))
        }
    };
    if vars.len() > MAX_ENV_VARS {
        return Err(rejected(format!(
            "`env` holds {} variables; the limit is {MAX_ENV_VARS}",
            vars.len()
        )));
    }
    let mut env = BTreeMap::new();
    let mut bytes = 0;
    for (name, value) in vars {
        if !is_env_name(&name) {
            return Err(rejected(format!(
                "`env` names {name:?}; a name is letters, digits and `_`, not starting with a digit"
            )));
        }
        let Value::String(value) = value else {
            return Err(rejected(format!("`env.{name}` must be a string, not {}", kind(&value))));
        };
        if value.contains('\0') {
            return Err(rejected(format!("`env.{name}` must not contain NUL characters")));
        }
        bytes += name.len() + value.len();
        env.insert(name, value);
    }
    if bytes > MAX_ENV_BYTES {
        return Err(rejected(format!("`env` is {bytes} bytes; the limit is {MAX_ENV_BYTES}")));
    }
    Ok(env)
}

/// What identifies a submit's body for its `Idempotency-Key`: a SHA-256 of the task as
/// checked (so that the order of its fields or tags does not matter) and the timeout it gets.
pub fn digest(task: &NewTask, timeout_secs: u32) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let body = serde_json::to_vec(&(task, timeout_secs)).unwrap_or_default();
    Sha256::digest(body).into()
}

fn reject_other_fields(fields: &Map<String, Value>) -> Result<(), Rejected> {
    let Some(field) = fields.keys().find(|k| !SETTABLE.contains(&k.as_str())) else {
        return Ok(());
    };
    let allowed = "a new task may set `command`, `timeout_secs`, `tags`, `priority`, `run_at` or \
                   `delay_secs`, `max_retries`, `retry_backoff_secs`, `env` and `cwd`";
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

impl Limited for ReleaseBody {
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
    /// The command ran past its timeout: a failure that may be retried.
    pub timed_out: bool,
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
        timed_out: report.timed_out && exit_code.is_none(),
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
    fn every_option_is_taken_and_tags_are_sorted_without_repeats() {
        let task = checked(json!({
            "command": "ls", "tags": ["gpu", "linux", "gpu"], "priority": -5, "delay_secs": 3,
            "max_retries": 2, "retry_backoff_secs": 0, "env": {"MODE": "fast"}, "cwd": "/tmp"
        }))
        .unwrap();
        assert_eq!(task.tags, ["gpu", "linux"]);
        assert_eq!(
            (task.priority, task.delay_secs, task.max_retries),
            (Some(-5), Some(3), Some(2))
        );
        assert_eq!((task.retry_backoff_secs, task.cwd.as_deref()), (Some(0), Some("/tmp")));
        assert_eq!(task.env["MODE"], "fast");
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
            (json!({"command": "ls", "queue": 1}), "unknown field `queue`"),
            (
                json!({"command": "ls", "priority": 101}),
                "`priority` must be a whole number from -100 to 100",
            ),
            (json!({"command": "ls", "priority": 1.5}), "`priority`"),
            (json!({"command": "ls", "tags": "gpu"}), "`tags` must be an array"),
            (json!({"command": "ls", "tags": ["GPU"]}), "`tags` holds \"GPU\""),
            (
                json!({"command": "ls", "tags": (0..17).map(|i| format!("t{i}")).collect::<Vec<_>>()}),
                "the limit is 16",
            ),
            (json!({"command": "ls", "run_at": "tomorrow"}), "`run_at` must be an RFC 3339 time"),
            (
                json!({"command": "ls", "run_at": "2026-01-01T00:00:00Z", "delay_secs": 1}),
                "not both",
            ),
            (json!({"command": "ls", "delay_secs": -1}), "`delay_secs`"),
            (
                json!({"command": "ls", "max_retries": 21}),
                "`max_retries` must be a whole number from 0 to 20",
            ),
            (json!({"command": "ls", "retry_backoff_secs": 3601}), "`retry_backoff_secs`"),
            (json!({"command": "ls", "env": ["A"]}), "`env` must be an object"),
            (json!({"command": "ls", "env": {"1A": "x"}}), "`env` names \"1A\""),
            (json!({"command": "ls", "env": {"A": 1}}), "`env.A` must be a string"),
            (json!({"command": "ls", "env": {"A": "a\u{0}"}}), "`env.A` must not contain NUL"),
            (json!({"command": "ls", "env": {"A": "x".repeat(40_000)}}), "the limit is 32768"),
            (json!({"command": "ls", "cwd": "tmp"}), "`cwd` must be an absolute path"),
            (json!({"command": "ls", "retries": 2}), "`retries` is set by the server"),
            (json!({"command": "ls", "lease": "x"}), "`lease` is set by the server"),
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
