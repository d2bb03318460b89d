//! `taskexec-api token …`: token management from the command line, for a deployment with no
//! admin token yet. It reads the same database settings as the server (and applies the
//! migrations, so it works on a new database too).

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use rocket::figment::Figment;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use taskexec_protocol::{NewToken, Role, TokenId};

use crate::auth::tokens;
use crate::config::DATABASE_URL_KEY;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a token and prints its secret alone on stdout: it is shown only this once.
    Create {
        /// Who holds it (letters, digits, `._@-`); a submitter's tasks are owned by this name.
        #[arg(long)]
        name: String,
        /// admin, submitter, reader or agent.
        #[arg(long)]
        role: Role,
        /// How long it lasts, such as 90d or 12h; for ever when absent.
        #[arg(long, value_parser = whole_seconds)]
        expires: Option<Duration>,
        /// For an agent token: the only X-Agent-Name it may present.
        #[arg(long)]
        agent_name: Option<String>,
    },
    /// Lists the tokens, without their secrets.
    List,
    /// Revokes a token: every API process refuses it within seconds.
    Revoke {
        /// The token's id, as `list` shows it.
        id: TokenId,
    },
}

/// A lifetime such as `90d`: whole seconds, at least one.
fn whole_seconds(text: &str) -> Result<Duration, String> {
    let lifetime = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if lifetime.subsec_nanos() != 0 || lifetime.as_secs() == 0 {
        return Err("a token lasts a whole number of seconds, at least 1s (such as 90d)".into());
    }
    Ok(lifetime)
}

/// Runs a token command against the database that `figment` names.
pub async fn token(figment: Figment, command: TokenCommand) -> ExitCode {
    match run(figment, command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("taskexec-api token: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(figment: Figment, command: TokenCommand) -> Result<(), String> {
    let pool = connect(&figment).await?;
    match command {
        TokenCommand::Create { name, role, expires, agent_name } => {
            let new =
                NewToken { name, role, expires_in_secs: expires.map(|d| d.as_secs()), agent_name };
            tokens::check(&new)?;
            let created = tokens::create(&pool, &new).await.map_err(|e| e.to_string())?;
            // The secret alone on stdout, so that scripts can take it; the rest on stderr.
            eprintln!(
                "token {} ({}, {}) created; its secret is shown only here",
                created.id, created.name, created.role
            );
            println!("{}", created.token);
        }
        TokenCommand::List => {
            let list = tokens::list(&pool).await.map_err(|e| e.to_string())?;
            println!(
                "{:<36}  {:<24}  {:<9}  {:<20}  {:<20}  {:<20}",
                "ID", "NAME", "ROLE", "EXPIRES", "REVOKED", "LAST USED"
            );
            let when = |at: Option<chrono::DateTime<chrono::Utc>>| {
                at.map_or("-".to_owned(), |at| at.format("%Y-%m-%d %H:%M:%S").to_string())
            };
            for token in list {
                println!(
                    "{:<36}  {:<24}  {:<9}  {:<20}  {:<20}  {:<20}",
                    token.id,
                    token.name,
                    token.role.as_str(),
                    when(token.expires_at),
                    when(token.revoked_at),
                    when(token.last_used_at)
                );
            }
        }
        TokenCommand::Revoke { id } => {
            if !tokens::revoke(&pool, id).await.map_err(|e| e.to_string())? {
                return Err(format!("no token with id {id}"));
            }
            eprintln!("token {id} revoked");
        }
    }
    Ok(())
}

async fn connect(figment: &Figment) -> Result<PgPool, String> {
    let url: String = figment
        .extract_inner(DATABASE_URL_KEY)
        .map_err(|e| format!("no database settings: {e}"))?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .map_err(|e| format!("cannot reach the database: {e}"))?;
    crate::db::migrator()
        .run(&pool)
        .await
        .map_err(|e| format!("the database migration failed: {e}"))?;
    Ok(pool)
}
