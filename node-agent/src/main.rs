use std::process::ExitCode;

use clap::Parser;
use slipway_agent::cli::{self, Cli, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed.
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    cli::init_tracing(cli.verbose);
    cli::run(cli)
}
