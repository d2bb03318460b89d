fn main() -> std::process::ExitCode {
    taskexec_worker::main()
}
