//! The agent registry as `GET /agents` shows it: every agent seen in the last day, and what it
//! is doing.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::TaskId;

/// What an agent is doing, as far as the server can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[cfg_attr(
    feature = "sqlx",
    derive(sqlx::Type),
    sqlx(type_name = "agent_state", rename_all = "snake_case")
)]
pub enum AgentState {
    /// Seen within the lease, holding no task (parked on a pick, or between two).
    Idle,
    /// Holding the lease of a task.
    Busy,
    /// Withdrawn on exit, or not seen for longer than the lease.
    Gone,
}

impl AgentState {
    pub const ALL: [AgentState; 3] = [AgentState::Idle, AgentState::Busy, AgentState::Gone];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Idle => "idle",
            AgentState::Busy => "busy",
            AgentState::Gone => "gone",
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One agent, by the name it gives in `X-Agent-Name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentInfo {
    pub name: String,
    pub state: AgentState,
    /// What it sends in `X-Agent-Version`, if anything.
    pub version: Option<String>,
    pub first_seen_at: DateTime<Utc>,
    /// Its latest request, to within a few seconds (the server writes sightings in batches).
    pub last_seen_at: DateTime<Utc>,
    /// The task whose lease it holds (a gone agent's until the lease runs out).
    pub current_task: Option<TaskId>,
    /// Tasks whose end it reported (finished, failed or cancelled).
    pub tasks_finished: u64,
    /// The tags it declared on its latest pick (`AGENT_TAGS`); it takes only tasks whose tags
    /// are all among these.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The longest `X-Agent-Version` the server keeps.
pub const MAX_AGENT_VERSION_CHARS: usize = 64;

/// Whether `version` may be sent as `X-Agent-Version`: 1 to 64 visible ASCII characters.
pub fn is_agent_version(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= MAX_AGENT_VERSION_CHARS
        && version.bytes().all(|b| b.is_ascii_graphic())
}
