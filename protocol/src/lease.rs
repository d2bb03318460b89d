//! The agent's side of the protocol: what a pick hands out, on which terms, and what the
//! holder of a lease sends back.
//!
//! ```text
//! agent                                   API
//!   GET /tasks/pick?wait=25&max=N ────────▶  parks; one claim for all parked picks
//!   ◀──────────────── 200 [Assignment] (1 to N: task, lease, terms: confirmation window)
//!   POST /tasks/<id>/heartbeat {lease} ──▶  full lease; held until an abort or wait ends
//!   ◀──────────────── 200 HeartbeatReply {abort, lease_secs}
//!   POST /tasks/<id>/output?stream&offset (X-Lease) ─▶ 200 OutputAck {next_offset}
//!   POST /tasks/<id>/finish FinishReport ─▶  200 Task          (or /release {lease})
//! ```
//!
//! Every write after the pick is fenced by the lease: a stale one gets 409
//! (`/problems/lease-not-current`) and changes nothing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{LeaseToken, Task};

/// What a pick grants besides the task: how long the lease lasts from now and from each
/// heartbeat, the grace between SIGTERM and SIGKILL when the command must stop, and the
/// output the server keeps per stream (the agent caps by the same rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseTerms {
    /// The pick's lease, in seconds: the confirmation window until the agent's first
    /// heartbeat grants the full lease.
    pub lease_secs: u32,
    pub kill_grace_secs: u32,
    pub max_output_bytes: u32,
}

/// A task handed to an agent by `GET /tasks/pick`, with the lease that fences its reports.
/// The agent must heartbeat before `lease_expires_at`, stop the command after the task's
/// `timeout_secs`, and wait `kill_grace_secs` between SIGTERM and SIGKILL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignment {
    #[serde(flatten)]
    pub task: Task,
    pub lease: LeaseToken,
    pub lease_expires_at: DateTime<Utc>,
    #[serde(flatten)]
    pub terms: LeaseTerms,
}

/// The most tasks one pick may ask for (`GET /tasks/pick?max=`): an agent's slots.
pub const MAX_PICK: usize = 64;

/// The answer to a pick: one assignment when the pick named no `max`, as agents before
/// `max` expect, else a list of one to `max` of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum Picked {
    One(Box<Assignment>),
    Many(Vec<Assignment>),
}

/// The body of a heartbeat or a release: the lease the agent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseBody {
    pub lease: LeaseToken,
}

/// The body of a release: the lease, and whether the command was never started (a task
/// picked while the agent was already stopping). An unstarted task goes back to the queue
/// as if it had never been picked, without counting as a hand-back; a started one is
/// refunded only `max_attempts` times, so that a command cannot loop by making its agent hand
/// it back. A task the server knows to have started (its first heartbeat came) is released
/// as started whatever the flag says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseBody {
    pub lease: LeaseToken,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unstarted: bool,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatReply {
    /// Stop the command: a user asked to abort the task.
    pub abort: bool,
    pub lease_expires_at: DateTime<Utc>,
    /// The length of the lease this heartbeat granted, in seconds.
    pub lease_secs: u32,
}

/// An agent's report on the attempt it holds the lease of: `exit_code` when the command ran
/// to one, `error` when it did not. Unknown fields are ignored, so that a newer agent can
/// report to an older server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FinishReport {
    pub lease: LeaseToken,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// The output as text, capped by [`crate::OutputCap::text`]. When the streams were
    /// uploaded, the server makes the task's text from the uploaded bytes by the same rule, and
    /// a text given here must be exactly that one (an agent may leave it out: a smaller body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(default)]
    pub stdout_lossy: bool,
    #[serde(default)]
    pub stderr_lossy: bool,
    /// The command was stopped because an abort was requested.
    #[serde(default)]
    pub aborted: bool,
    /// The command was stopped because it ran past its timeout (`error` says so too): the
    /// task may be retried, as after a non-zero exit code.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// The length of each stream as uploaded: the finish is refused (409, with the lengths
    /// the server has) until they are the lengths of the uploads. Left out only when nothing
    /// was uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<u64>,
    /// The stream was longer than the cap: its middle was dropped.
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
    /// How long before this report was sent the command started, in milliseconds, when it
    /// started at all. A command that ends before its first heartbeat gets its `running_at`
    /// from this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms_ago: Option<u64>,
}

impl FinishReport {
    /// A report of a command that ran to `exit_code`, without output.
    pub fn exited(lease: LeaseToken, exit_code: i32) -> FinishReport {
        FinishReport { exit_code: Some(exit_code), ..FinishReport::empty(lease) }
    }

    /// A report of a command that did not run to an exit code, without output.
    pub fn failed(lease: LeaseToken, error: impl Into<String>) -> FinishReport {
        FinishReport { error: Some(error.into()), ..FinishReport::empty(lease) }
    }

    fn empty(lease: LeaseToken) -> FinishReport {
        FinishReport {
            lease,
            exit_code: None,
            error: None,
            stdout: None,
            stderr: None,
            stdout_lossy: false,
            stderr_lossy: false,
            aborted: false,
            timed_out: false,
            stdout_bytes: None,
            stderr_bytes: None,
            stdout_truncated: false,
            stderr_truncated: false,
            started_ms_ago: None,
        }
    }
}
