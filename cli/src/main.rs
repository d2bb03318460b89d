fn main() -> std::process::ExitCode {
    taskexec::main()
}
