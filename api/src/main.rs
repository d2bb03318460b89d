use std::process::ExitCode;

#[rocket::main]
async fn main() -> ExitCode {
    match taskexec_api::rocket().launch().await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("taskexec-api did not start: {e}");
            ExitCode::FAILURE
        }
    }
}
