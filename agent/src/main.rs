fn main() -> std::process::ExitCode {
    match nodeward::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line a person can act on: what failed and why, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
