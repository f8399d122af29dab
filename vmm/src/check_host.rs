//! `vmm check-host`: what a user needs to know before passthrough.

use std::process::ExitCode;

use crate::cli::CheckHostArgs;

/// Errors of `check-host`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not written yet.
    #[error("check-host is not implemented yet")]
    NotYet,
}

/// Runs the checks and prints the report.
pub fn run(_args: &CheckHostArgs) -> Result<ExitCode, Error> {
    Err(Error::NotYet)
}
