//! `taskexec`, taskexec's command line: `taskexec run -- make test` runs a command on an agent
//! as if it ran here (its output streamed live, its exit code returned), and the other
//! commands look after tasks, agents and tokens. Synchronous: ureq and a thread per stream.
//!
//! `main.rs` is a shim; this assembles: `args` parses, `config` finds the settings, `commands`
//! does the work through `client` (the API in the protocol's types), `quote` writes a command
//! line for the agent's shell, `follow` copies live output, `render` shows the answers,
//! `progress` the waiting, and every failure is an [`Error`] shown as one line with an exit
//! code.

use std::process::ExitCode;

use clap::Parser;

mod args;
mod client;
mod commands;
mod config;
mod error;
mod follow;
mod progress;
mod quote;
mod render;

pub use args::Cli;
pub use error::Error;

/// The binary: parses the arguments (clap exits 2 on bad ones), runs the command, and turns
/// a failure into one line on stderr and its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(error) => {
            // One line, whatever the API's title and detail hold: no control character of theirs
            // reaches the terminal.
            eprintln!("taskexec: {}", render::printable(&error.to_string()));
            ExitCode::from(error.exit_code())
        }
    }
}
