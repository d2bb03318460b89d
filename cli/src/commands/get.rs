//! `taskexec get`: one task, now or once it has ended.

use std::process::ExitCode;
use std::time::Duration;

use taskexec_protocol::TaskId;

use super::Context;
use crate::progress::Spinner;
use crate::render;
use crate::Error;

pub fn get(context: &Context, id: TaskId, wait: bool) -> Result<ExitCode, Error> {
    let client = context.client()?;
    let task = if wait {
        let spinner = Spinner::start(format!("waiting for task {id} to end"));
        let task = client.until_ended(id);
        spinner.clear();
        task?
    } else {
        client.task(id, Duration::ZERO)?
    };
    context.show(&task, render::task)?;
    Ok(ExitCode::SUCCESS)
}
