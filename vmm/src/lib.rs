//! iovmm's VMM: KVM VM and vCPUs, guest memory, boot, ACPI, event loop, control API and CLI.
//!
//! Dependencies flow one way: `vmm -> devices -> iommu`. This crate only wires.

use std::process::ExitCode;

pub mod check_host;
pub mod cli;
pub mod logging;
pub mod passthrough;

/// Top-level errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A capability that this build does not have yet.
    #[error("{0} is not implemented yet")]
    NotYet(&'static str),
}

/// Boots a guest as the command line asks.
pub fn run(_args: cli::RunArgs) -> Result<ExitCode, Error> {
    Err(Error::NotYet("booting a guest"))
}
