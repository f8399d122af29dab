//! The `vmm` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmm::logging::init(cli.verbose);
    let result = match cli.command {
        Some(Command::CheckHost(args)) => vmm::check_host::run(&args),
        None => vmm::run(cli.run),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e:#}");
            eprintln!("vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
