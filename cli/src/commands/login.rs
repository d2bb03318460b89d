//! `taskexec login`: keeps the API's address and a token in the config file, so that no
//! command needs them on its command line. The token is read from stdin, or asked for on the
//! terminal without echo, never from the arguments (which `ps` shows to every user), and it
//! is tried on the API before it is kept.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::Context;
use crate::client::{Client, ListQuery};
use crate::config::{self, DEFAULT_URL};
use crate::Error;

/// The most read from stdin: a token is 47 characters.
const MAX_TOKEN_INPUT: u64 = 4096;

pub fn login(context: &Context) -> Result<ExitCode, Error> {
    let path = config::path()?;
    let mut file = config::load(&path)?;
    let url = context.global.url.clone().or(file.url.take()).unwrap_or(DEFAULT_URL.into());
    let ca_file = match &context.global.ca_file {
        Some(given) => Some(absolute(given)?),
        None => file.ca_file.take(),
    };
    let token = read_token(&url)?;
    let client = Client::new(&url, &token, ca_file.as_deref())?;
    // Any call that every user's role may make will do: a token refused now is not kept.
    client.list(&ListQuery { limit: Some(1), ..ListQuery::default() }, None)?;
    file.url = Some(client.base().to_owned());
    file.token = Some(token.expose_secret().to_owned());
    file.ca_file = ca_file;
    config::save(&path, &file)?;
    let saved = json!({ "url": client.base(), "config_file": path });
    context.show(&saved, |_| {
        format!("saved the token for {} in {}\n", client.base(), path.display())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The token: from stdin when it is not a terminal (`taskexec login < token-file`), else
/// typed at a prompt that does not echo.
fn read_token(url: &str) -> Result<SecretString, Error> {
    let token = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("Token for {url}: "))
            .map_err(|e| Error::io("read the token from the terminal", e))?
    } else {
        let mut text = String::new();
        std::io::stdin()
            .take(MAX_TOKEN_INPUT)
            .read_to_string(&mut text)
            .map_err(|e| Error::io("read the token from stdin", e))?;
        text
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(Error::Config("no token given: type it, or pipe it to stdin".into()));
    }
    Ok(SecretString::from(token.to_owned()))
}

/// The CA file as an absolute path, so that the saved setting works from any directory.
fn absolute(path: &std::path::Path) -> Result<PathBuf, Error> {
    std::path::absolute(path).map_err(|e| Error::io(format!("--ca-file {}", path.display()), e))
}
