use std::process::ExitCode;

use clap::Parser;

/// The taskexec API server: takes shell commands over HTTP and hands them to executor agents,
/// who long-poll it for work. Runs on PostgreSQL, applies its migrations at start.
#[derive(Parser)]
#[command(name = "taskexec-api", version, after_help = taskexec_api::config::SETTINGS_HELP)]
struct Args {}

#[rocket::main]
async fn main() -> ExitCode {
    Args::parse();
    match taskexec_api::rocket().launch().await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("taskexec-api did not start: {e}");
            ExitCode::FAILURE
        }
    }
}
