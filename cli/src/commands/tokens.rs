//! `taskexec token create|list|revoke`: API tokens, for an admin. A new token's secret is
//! printed alone on stdout, so that a script can take it; it is shown only this once.

use std::process::ExitCode;

use serde_json::json;
use taskexec_protocol::NewToken;

use super::{stdout_is_terminal, Context};
use crate::args::{Format, TokenCommand};
use crate::render;
use crate::Error;

pub fn token(context: &Context, command: TokenCommand) -> Result<ExitCode, Error> {
    let client = context.client()?;
    match command {
        TokenCommand::Create { name, role, expires, agent_name } => {
            let new = NewToken { name, role, expires_in_secs: expires, agent_name };
            let created = client.create_token(&new)?;
            if context.format() == Format::Text {
                eprintln!(
                    "taskexec: token {} ({}, {}) created; its secret is shown only here",
                    created.id,
                    render::printable(&created.name),
                    created.role
                );
            }
            context.show(&created, |created| format!("{}\n", created.token))?;
        }
        TokenCommand::List => {
            let tokens = client.tokens()?;
            context.show(&tokens, |tokens| render::tokens(tokens, stdout_is_terminal()))?;
        }
        TokenCommand::Revoke { id } => {
            client.revoke_token(id)?;
            // The API answers 204 without a body: the JSON says what was done.
            context.show(&json!({ "revoked": id }), |_| format!("token {id} revoked\n"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
