//! The lines an operator reads about tasks, at info: created, picked by whom, ended how,
//! handed back, abort asked, requeued or failed by the reaper and why. (A pick whose agent had
//! gone is logged where it is put back.) Each carries the task id, and the agent where there is
//! one, as fields.

use taskexec_protocol::{Task, TaskId, TaskStatus};

use super::store::Fate;

const TARGET: &str = "taskexec_api::tasks";

pub fn created(task: &Task) {
    let owner = task.owner.as_deref().unwrap_or("-");
    log::info!(target: TARGET, task:% = task.id, owner = owner; "task created by {owner:?}");
}

pub fn picked(task: &Task) {
    let agent = task.agent.as_deref().unwrap_or("-");
    let attempt = task.attempts;
    log::info!(target: TARGET, task:% = task.id, agent = agent, attempt = attempt;
        "task picked by {agent:?} (attempt {attempt})");
}

/// A task whose end this process recorded (its agent's report, an abort, a hand-back too
/// many). Nothing for a task still going.
pub fn ended(task: &Task) {
    if !task.status.is_terminal() {
        return;
    }
    let agent = task.agent.as_deref().unwrap_or("-");
    let status = task.status;
    // The error is the agent's text: a field (quoted in text lines), never the message, so
    // that it cannot forge a line.
    match (task.exit_code, task.error.as_deref()) {
        (Some(code), _) if status == TaskStatus::Finished => log::info!(
            target: TARGET, task:% = task.id, agent = agent, status:% = status, exit_code = code;
            "task finished with exit code {code}"),
        (_, Some(error)) => log::info!(
            target: TARGET, task:% = task.id, agent = agent, status:% = status, error = error;
            "task {status}"),
        _ => log::info!(target: TARGET, task:% = task.id, agent = agent, status:% = status;
            "task {status}"),
    }
}

/// A failed attempt of a task with retries left: queued again, to run after its backoff.
pub fn retried(task: &Task) {
    let (retry, of) = (task.retries, task.options.max_retries);
    let at = task.options.run_at.map_or_else(|| "-".to_owned(), |at| at.to_rfc3339());
    log::info!(target: TARGET, task:% = task.id, retry = retry, run_at = at.as_str();
        "task failed; retry {retry} of {of} queued to run at {at}");
}

/// Handed back by a draining agent: queued again (or failed, when handed back too often).
pub fn released(task: &Task) {
    if task.status.is_terminal() {
        return ended(task);
    }
    log::info!(target: TARGET, task:% = task.id; "task handed back by its agent; queued again");
}

pub fn abort_requested(task: &Task) {
    let agent = task.agent.as_deref().unwrap_or("-");
    log::info!(target: TARGET, task:% = task.id, agent = agent;
        "abort of the running task requested; its agent is told");
}

/// What the reaper did to a task whose lease ran out or that overran its timeout.
pub fn reaped(task: TaskId, fate: Fate) {
    let why = match fate {
        Fate::Refunded => "its pick was never confirmed: queued again, the attempt given back",
        Fate::Requeued => "its lease ran out (agent lost): queued again",
        Fate::Cancelled => "its lease ran out after an abort was asked: cancelled",
        Fate::Lost => "its lease ran out on its last attempt: failed, agent lost",
        Fate::TimedOut => "it ran past its timeout, grace and lease: failed",
        Fate::Exhausted => "handed back too often: failed",
    };
    log::info!(target: TARGET, task:% = task, fate:? = fate; "task reaped: {why}");
}
