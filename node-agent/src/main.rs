use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};
use slipway_agent::cli::{self, Cli, EXIT_USAGE};

fn main() -> ExitCode {
    // `--version`: the version as the agent reports it everywhere (Hello,
    // heartbeats), then the commit and date of the build.
    let parsed = Cli::command()
        .version(slipway_agent::version::long())
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
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
