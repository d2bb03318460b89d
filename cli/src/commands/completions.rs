//! `taskexec completions SHELL`: the shell's completion script, generated from the grammar.

use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use super::Context;
use crate::args::Cli;
use crate::Error;

pub fn completions(context: &Context, shell: Shell) -> Result<ExitCode, Error> {
    context.text_only("completions", "it prints a shell script")?;
    clap_complete::generate(shell, &mut Cli::command(), "taskexec", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
