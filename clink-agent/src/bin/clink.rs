fn main() -> std::process::ExitCode {
    clink_agent::cli::main()
}
