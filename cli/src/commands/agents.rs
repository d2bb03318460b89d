//! `taskexec agents`: the agents seen in the last day and what each is doing.

use std::process::ExitCode;

use super::{stdout_is_terminal, Context};
use crate::render;
use crate::Error;

pub fn agents(context: &Context) -> Result<ExitCode, Error> {
    let agents = context.client()?.agents()?;
    context.show(&agents, |agents| render::agents(agents, stdout_is_terminal()))?;
    Ok(ExitCode::SUCCESS)
}
