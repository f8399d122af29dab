//! The command line, in the style of cloud-hypervisor: `vmm --kernel K --initramfs I ...` boots a guest,
//! `vmm check-host` reports what the host offers for passthrough.

use clap::{Args, Parser, Subcommand};

/// iovmm: a minimal KVM VMM that passes PCI devices through with VFIO.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// More log output: -v info, -vv debug, -vvv trace (default: warnings and errors).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report what this host offers for passthrough (KVM, VFIO groups, IOMMU page sizes, hugepages, memlock).
    CheckHost(CheckHostArgs),
}

/// Arguments of `vmm check-host`.
#[derive(Debug, Args)]
pub struct CheckHostArgs {
    /// Print the report as JSON instead of plain text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments that boot a guest.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Pass a host PCI device through with VFIO: `path=/sys/bus/pci/devices/<BDF>` (repeatable). The device
    /// must be bound to vfio-pci; `vmm` says how to bind it when it is not.
    #[arg(long = "device", value_name = "path=/sys/bus/pci/devices/<BDF>")]
    pub devices: Vec<crate::passthrough::DeviceSpec>,
}
