fn main() -> std::process::ExitCode {
    taskexec_worker::cli::main()
}
