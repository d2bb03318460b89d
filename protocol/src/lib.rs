//! The taskexec wire protocol, written once and used by the API, the agent, the tests and the
//! benchmark: what a task looks like, what a pick hands out and on which terms, what an agent
//! reports, how live output is addressed, what an error says, and the rule by which output is
//! capped. Types carry the rules: a [`TaskId`] is not a [`LeaseToken`], a [`TaskStatus`] knows
//! whether it is terminal, a [`ProblemType`] is matched as a value, not a string.

pub mod agent;
mod ids;
pub mod lease;
#[cfg(feature = "log")]
pub mod logline;
pub mod output;
mod problem;
mod task;
pub mod token;

pub use agent::{AgentInfo, AgentState};
pub use ids::{LeaseToken, ParseIdError, TaskId, TokenId};
pub use lease::{
    Assignment, FinishReport, HeartbeatReply, LeaseBody, LeaseTerms, Picked, ReleaseBody, MAX_PICK,
};
pub use output::{OutputAck, OutputCap, Stream};
pub use problem::{Problem, ProblemType};
pub use task::{
    is_env_name, is_tag, Attempt, AttemptOutcome, NewTask, Task, TaskOptions, TaskPage, TaskStatus,
    UnknownStatus, DEFAULT_RETRY_BACKOFF_SECS, LISTED_COMMAND_CHARS,
};
pub use token::{CreatedToken, NewToken, Role, TokenInfo, TOKEN_PREFIX};
