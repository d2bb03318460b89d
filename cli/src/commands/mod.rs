//! The commands, one module each, and what they share: the settings, the client, and how an
//! answer is shown in the chosen format.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use serde::Serialize;

use crate::args::{Cli, Command, Format, Global};
use crate::client::Client;
use crate::config::{self, FileConfig, Settings};
use crate::{render, Error};

mod abort;
mod agents;
mod completions;
mod get;
mod login;
mod logs;
mod ls;
mod run;
mod tokens;

/// Runs the command `cli` names.
///
/// # Errors
///
/// Whatever failed, for `main` to show.
pub fn run(cli: Cli) -> Result<ExitCode, Error> {
    let context = Context { global: cli.global };
    match cli.command {
        Command::Run(args) => run::run(&context, args),
        Command::Get { id, wait } => get::get(&context, id, wait),
        Command::Logs { id, follow, stream } => logs::logs(&context, id, follow, stream),
        Command::Ls(args) => ls::ls(&context, args),
        Command::Abort { id } => abort::abort(&context, id),
        Command::Agents => agents::agents(&context),
        Command::Token(command) => tokens::token(&context, command),
        Command::Login => login::login(&context),
        Command::Completions { shell } => completions::completions(&context, shell),
    }
}

/// What every command may need. The settings are read when first needed, so that
/// `completions` works whatever the config file holds.
pub struct Context {
    pub global: Global,
}

impl Context {
    fn format(&self) -> Format {
        self.global.output
    }

    /// The settings. A config file that cannot be read fails the command, unless the flags
    /// and the environment name both the API and the token: then it is only warned about.
    fn settings(&self) -> Result<Settings, Error> {
        let file = match config::path().and_then(|path| config::load(&path)) {
            Ok(file) => file,
            Err(e) if config::given_without_file(&self.global) => {
                eprintln!("taskexec: warning: the config file is ignored: {e}");
                FileConfig::default()
            }
            Err(e) => return Err(e),
        };
        Settings::resolve(&self.global, file)
    }

    /// A client of the configured API with the configured token.
    ///
    /// # Errors
    ///
    /// `Config` when there is no token, or the settings cannot be read.
    fn client(&self) -> Result<Arc<Client>, Error> {
        let settings = self.settings()?;
        let Some(token) = &settings.token else {
            return Err(Error::Config(
                "no token: run taskexec login, or set TASKEXEC_TOKEN or TASKEXEC_TOKEN_FILE".into(),
            ));
        };
        Ok(Arc::new(Client::new(&settings.url, token, settings.ca_file.as_deref())?))
    }

    /// Prints `value`: as JSON, or as `text` renders it for people.
    fn show<T: Serialize>(&self, value: &T, text: impl FnOnce(&T) -> String) -> Result<(), Error> {
        match self.format() {
            Format::Json => render::emit(&render::json(value)?),
            Format::Text => render::emit(&text(value)),
        }
    }

    /// Refuses `--output json` for a command whose output is not data.
    fn text_only(&self, command: &str, instead: &str) -> Result<(), Error> {
        match self.format() {
            Format::Text => Ok(()),
            Format::Json => Err(Error::Usage(format!(
                "{command} has no JSON output (--output json); {instead}"
            ))),
        }
    }
}

/// Whether stdout is a terminal: tables for people there, plain rows for programs elsewhere.
fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}
