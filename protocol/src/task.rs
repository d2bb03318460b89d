//! The task resource, its states, and the bodies that create and list tasks.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::TaskId;

/// Where a task is in its life. `queued` → `in_progress` → one of the three terminal states;
/// an expired lease or a hand-back takes `in_progress` back to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// The output as text, capped (see [`crate::OutputCap`]). Lists leave both out.
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
    /// Lists shorten commands longer than [`LISTED_COMMAND_CHARS`] characters to that many and
    /// set this; `GET /tasks/<id>` has the whole command.
    #[serde(default)]
    pub command_truncated: bool,
}

/// How much of a command a list shows: a page of 1,000 tasks with 64 KiB commands would
/// otherwise be 64 MB of JSON.
pub const LISTED_COMMAND_CHARS: usize = 1024;

/// The body of `POST /tasks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTask {
    pub command: String,
    /// Stop the command after this many seconds (the server's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

impl NewTask {
    pub fn new(command: impl Into<String>) -> NewTask {
        NewTask { command: command.into(), timeout_secs: None }
    }
}

/// One page of `GET /tasks`, newest first. The tasks come without `stdout` and `stderr`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
