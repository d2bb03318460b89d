//! `taskexec abort`: a queued task is cancelled at once; a running one is stopped by its agent,
//! which reports it cancelled with its output so far.

use std::process::ExitCode;

use taskexec_protocol::TaskId;

use super::Context;
use crate::client::Aborted;
use crate::Error;

pub fn abort(context: &Context, id: TaskId) -> Result<ExitCode, Error> {
    match context.client()?.abort(id)? {
        Aborted::Cancelled(task) => {
            context.show(&task, |task| format!("task {} cancelled\n", task.id))?
        }
        Aborted::Requested(task) => context.show(&task, |task| {
            format!("task {}: abort requested; its agent is stopping it\n", task.id)
        })?,
    }
    Ok(ExitCode::SUCCESS)
}
