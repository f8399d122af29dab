//! The `vmm` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmm::logging::init(cli.verbose);
    // Each command has its own error type; here they only need to be shown.
    let result: Result<ExitCode, Box<dyn std::error::Error>> = match cli.command {
        Some(Command::CheckHost(args)) => vmm::check_host::run(&args).map_err(Into::into),
        Some(Command::Remote(args)) => vmm::api::client::run(&args).map_err(Into::into),
        None => vmm::run(cli.run).map_err(Into::into),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
