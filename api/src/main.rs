use std::process::ExitCode;

use clap::{Parser, Subcommand};
use taskexec_api::cli::TokenCommand;

/// The taskexec API server: takes shell commands over HTTP and hands them to executor agents,
/// who long-poll it for work. Runs on PostgreSQL, applies its migrations at start.
#[derive(Parser)]
#[command(name = "taskexec-api", version, after_help = taskexec_api::config::SETTINGS_HELP)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Manages API tokens on the database the server uses (no server needed).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Prints the API's OpenAPI 3.1 document (as GET /openapi.json serves it), for client
    /// generators and linters, without a server or a database.
    Openapi,
}

#[rocket::main]
async fn main() -> ExitCode {
    match Args::parse().command {
        Some(Command::Token(command)) => {
            taskexec_api::cli::token(taskexec_api::config::figment(), command).await
        }
        Some(Command::Openapi) => {
            println!("{}", taskexec_api::openapi::json());
            ExitCode::SUCCESS
        }
        None => match taskexec_api::rocket().launch().await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                log::error!("taskexec-api did not start: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
