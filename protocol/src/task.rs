//! The task resource, its states, and the bodies that create and list tasks.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::TaskId;

/// Where a task is in its life. `queued` → `in_progress` → one of the three terminal states;
/// an expired lease or a hand-back takes `in_progress` back to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "sqlx",
    derive(sqlx::Type),
    sqlx(type_name = "task_status", rename_all = "snake_case")
)]
pub enum TaskStatus {
    /// Waiting for an agent.
    Queued,
    /// Picked by an agent, which holds its lease.
    InProgress,
    /// The command ran to an exit code, any exit code.
    Finished,
    /// The command did not run to an exit code: it could not start, a signal killed it, it
    /// timed out, or its agent was lost. `error` says which.
    Failed,
    /// A user aborted it.
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

    /// The name used in JSON, in query parameters and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::InProgress => "in_progress",
            TaskStatus::Finished => "finished",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the task has ended for good: nothing about it changes any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Finished | TaskStatus::Failed | TaskStatus::Cancelled)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`TaskStatus::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownStatus(pub String);

impl fmt::Display for UnknownStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = TaskStatus::ALL.iter().map(|s| s.as_str()).collect();
        write!(f, "unknown status {:?}; expected one of {}", self.0, names.join(", "))
    }
}

impl std::error::Error for UnknownStatus {}

impl FromStr for TaskStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<TaskStatus, UnknownStatus> {
        TaskStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// A task as users see it. The lease is not part of it: it is the agent's capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Task {
    pub id: TaskId,
    pub command: String,
    pub status: TaskStatus,
    pub created_at: DateTime<Utc>,
    /// When the current (or last) attempt was picked.
    pub started_at: Option<DateTime<Utc>>,
    /// When its command was seen running: the agent's first heartbeat, or the finish of a
    /// command that ended before one was due. Set on every task whose command started.
    pub running_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    /// The output as text, capped at `max_output_bytes` (its first and last halves, with a
    /// marker line between). Lists leave both out.
    #[serde(default)]
    pub stdout: Option<String>,
    #[serde(default)]
    pub stderr: Option<String>,
    /// The output was not valid UTF-8 (or held NUL bytes) and was converted lossily.
    pub stdout_lossy: bool,
    pub stderr_lossy: bool,
    /// The stream was longer than the cap: its middle was dropped, with a marker.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Bytes the stream has produced so far (dropped ones included), as streamed by the agent.
    pub stdout_bytes: i64,
    pub stderr_bytes: i64,
    pub error: Option<String>,
    /// The name of the agent that picked the current (or last) attempt.
    pub agent: Option<String>,
    /// How many times the task was handed to an agent (refunded hand-backs and lost picks
    /// excepted).
    pub attempts: i32,
    /// How long the command may run, in seconds.
    pub timeout_secs: i32,
    /// When a user asked to abort the running task.
    pub abort_requested_at: Option<DateTime<Utc>>,
    /// The name of the token that submitted the task (none for tasks from before tokens).
    #[serde(default)]
    pub owner: Option<String>,
    /// The name of the token that aborted it, if one did.
    #[serde(default)]
    pub aborted_by: Option<String>,
    /// Lists shorten commands longer than 1,024 characters ([`LISTED_COMMAND_CHARS`]) to that
    /// many and set this; `GET /tasks/<id>` has the whole command.
    #[serde(default)]
    pub command_truncated: bool,
    #[serde(flatten)]
    pub options: TaskOptions,
    /// How many times the command has been tried again after it failed (see `max_retries`).
    #[serde(default)]
    pub retries: i32,
}

/// What a submit may say about a task besides its command and timeout, as the task shows it.
/// The defaults are those of a task that says nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskOptions {
    /// Only an agent whose tags include all of these takes the task (sorted, no repeats).
    #[serde(default)]
    pub tags: Vec<String>,
    /// -100 to 100; higher first, then creation order.
    #[serde(default)]
    pub priority: i32,
    /// Not picked before this time (a delayed submit, or a retry's backoff).
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    /// Times a command that ends with a non-zero exit code, or by its timeout, is tried again.
    #[serde(default)]
    pub max_retries: i32,
    /// The first retry's delay; each next one doubles it (with jitter, at most an hour).
    #[serde(default = "default_retry_backoff_secs")]
    pub retry_backoff_secs: i32,
    /// Variables added to the command's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The absolute path the command starts in (the agent's default when absent).
    #[serde(default)]
    pub cwd: Option<String>,
}

/// The delay before a failed command's first retry, when the submit does not say.
pub const DEFAULT_RETRY_BACKOFF_SECS: i32 = 10;

fn default_retry_backoff_secs() -> i32 {
    DEFAULT_RETRY_BACKOFF_SECS
}

impl Default for TaskOptions {
    fn default() -> TaskOptions {
        TaskOptions {
            tags: Vec::new(),
            priority: 0,
            run_at: None,
            max_retries: 0,
            retry_backoff_secs: DEFAULT_RETRY_BACKOFF_SECS,
            env: BTreeMap::new(),
            cwd: None,
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "sqlx",
    derive(sqlx::Type),
    sqlx(type_name = "attempt_outcome", rename_all = "snake_case")
)]
pub enum AttemptOutcome {
    /// The command ran to an exit code, and the task ended with it.
    Finished,
    /// The command did not run to an exit code (or its agent was lost), and the task failed.
    Failed,
    /// Back to the queue without a result: its lease ran out, or its pick was never confirmed.
    Requeued,
    /// Its draining agent handed it back.
    Released,
    /// The command failed (non-zero exit code, timeout) and the task was queued to be tried again.
    Retried,
    /// Stopped because a user aborted the task.
    Cancelled,
}

/// One attempt of a task (`GET /tasks/<id>/attempts`). The current attempt of a task in
/// progress comes last, without an outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Attempt {
    pub agent: String,
    pub started_at: DateTime<Utc>,
    pub running_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<AttemptOutcome>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
}

/// How much of a command a list shows: a page of 1,000 tasks with 64 KiB commands would
/// otherwise be 64 MB of JSON.
pub const LISTED_COMMAND_CHARS: usize = 1024;

/// The body of `POST /tasks`. Every field but `command` may be left out; any other field is
/// refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// Run by `sh -c`; not only whitespace, without NUL, at most `max_command_bytes` bytes
    /// (64 KiB by default).
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub command: String,
    /// Stop the command after this many seconds (the server's default when absent; at most
    /// `max_timeout_secs`, a day by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub timeout_secs: Option<u32>,
    /// Only an agent whose tags include all of these takes the task: up to 16 of
    /// `[a-z0-9][a-z0-9_.-]{0,63}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 16))]
    pub tags: Vec<String>,
    /// Higher first; 0 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = -100, maximum = 100))]
    pub priority: Option<i32>,
    /// Not before this time (within a year); or `delay_secs` from the submit (not both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 31622400))]
    pub delay_secs: Option<u32>,
    /// Times a command that exits non-zero or times out is tried again; 0 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 20))]
    pub max_retries: Option<u32>,
    /// The first retry's delay, doubled for each next one (less up to a fifth at random, at
    /// most an hour); 10 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 3600))]
    pub retry_backoff_secs: Option<u32>,
    /// Added to the command's environment: up to 64 variables named `[A-Za-z_][A-Za-z0-9_]*`,
    /// values without NUL, 32 KiB in all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The absolute path the command starts in (at most 4,096 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^/", max_length = 4096))]
    pub cwd: Option<String>,
}

impl NewTask {
    pub fn new(command: impl Into<String>) -> NewTask {
        NewTask { command: command.into(), ..NewTask::default() }
    }
}

/// The rule a tag follows: `[a-z0-9][a-z0-9_.-]{0,63}`.
pub fn is_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    (1..=64).contains(&bytes.len())
        && matches!(bytes[0], b'a'..=b'z' | b'0'..=b'9')
        && bytes.iter().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
}

/// The rule an environment variable's name follows: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One page of `GET /tasks`, newest first. The tasks come without `stdout` and `stderr`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    /// Pass as `cursor` to get the next (older) page; null on the last page.
    pub next: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_by_name_and_know_whether_they_are_terminal() {
        for status in TaskStatus::ALL {
            assert_eq!(status.as_str().parse::<TaskStatus>().unwrap(), status);
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        let terminal: Vec<_> = TaskStatus::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, [TaskStatus::Finished, TaskStatus::Failed, TaskStatus::Cancelled]);
        let unknown = "done".parse::<TaskStatus>().unwrap_err().to_string();
        assert!(unknown.contains("\"done\"") && unknown.contains("in_progress"), "{unknown}");
    }
}
