//! iovmm's VMM: KVM VM and vCPUs, guest memory, boot, ACPI, event loop, control API and CLI.
//!
//! Dependencies flow one way: `vmm -> devices -> iommu`. This crate only wires.
//!
//! Module map: [`layout`] (the guest address map), [`memory`] (guest RAM), [`boot`] (bzImage, initramfs,
//! zero page), [`acpi`] (tables), [`vm`] (KVM VM, irqchip, vCPU threads), [`vcpu`] (CPUID, MSRs,
//! registers, run loop), [`interrupts`] (GSI routes and MSI), [`device_manager`] (ports and addresses to
//! devices), [`event_loop`] (the main thread), [`passthrough`] (preflight and each passthrough device's
//! lifecycle through the IOMMU component), [`hotplug`] (ACPI PCI hotplug and the API's backend),
//! [`api`] (the control socket and its client), [`check_host`] (`vmm check-host`), [`cli`],
//! [`logging`]. The architecture as a whole: `docs/DESIGN.md`.
//!
//! Exit status of `vmm`: 0 when the guest powers off; 2 when it resets (reboot, panic with `panic=-1`,
//! triple fault: iovmm does not restart guests); 128 + N when stopped by signal N (SIGTERM, SIGINT, SIGHUP:
//! the VM is stopped and its devices released first); 1 on any error.

use std::fs::File;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub mod acpi;
pub mod api;
pub mod boot;
pub mod check_host;
pub mod cli;
pub mod device_manager;
pub mod dma;
pub mod edu;
pub mod event_loop;
pub mod hotplug;
pub mod interrupts;
pub mod layout;
pub mod logging;
pub mod memory;
pub mod passthrough;
pub mod vcpu;
pub mod vm;

/// Exit status when the guest reset instead of powering off.
pub const EXIT_GUEST_RESET: u8 = 2;

/// Top-level errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kernel given.
    #[error("no guest kernel: pass --kernel PATH (an x86-64 bzImage)")]
    NoKernel,
    /// The console output file.
    #[error("cannot create the console file {path}: {source}")]
    SerialFile {
        /// Path.
        path: std::path::PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Passthrough preflight.
    #[error(transparent)]
    Passthrough(#[from] passthrough::PreflightError),
    /// Attaching a passthrough device.
    #[error(transparent)]
    PassthroughAttach(#[from] passthrough::AttachError),
    /// Hotplug set-up.
    #[error(transparent)]
    Hotplug(#[from] hotplug::Error),
    /// Setting up the `--edu` devices.
    #[error(transparent)]
    Edu(#[from] edu::EduError),
    /// The control API socket.
    #[error(transparent)]
    Api(#[from] api::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Loading the kernel.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// The VM.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// The event loop.
    #[error(transparent)]
    EventLoop(#[from] event_loop::Error),
    /// The guest or KVM failed.
    #[error("the VM stopped: {0}")]
    Guest(String),
}

/// Restores the terminal's canonical mode when dropped.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        use vmm_sys_util::terminal::Terminal;
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        match stdin.lock().set_raw_mode() {
            Ok(()) => Some(RawTerminal),
            Err(e) => {
                log::warn!(
                    "cannot put the terminal in raw mode ({e}); console input is line-buffered"
                );
                None
            }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use vmm_sys_util::terminal::Terminal;
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// Boots a guest as the command line asks; returns the exit status (see the crate documentation).
pub fn run(args: cli::RunArgs) -> Result<ExitCode, Error> {
    let started = Instant::now();
    // First, so that a signal during set-up is not lost: the event loop acts on it as soon as it runs.
    event_loop::handle_termination_signals()?;
    let kernel = args.kernel.as_deref().ok_or(Error::NoKernel)?;
    let checked = passthrough::preflight(
        &args.devices,
        args.memory.size,
        &passthrough::HostPaths::default(),
    )?;
    let backing = if args.memory.hugepages {
        memory::Backing::HugeTlb
    } else {
        memory::Backing::Anonymous {
            thp: args.memory.thp,
        }
    };
    let mem = memory::create(args.memory.size, backing)?;
    let serial = match &args.serial {
        cli::SerialArg::Off => vm::SerialOutput::Off,
        cli::SerialArg::Tty => vm::SerialOutput::Writer(Box::new(std::io::stdout())),
        cli::SerialArg::File(p) => {
            vm::SerialOutput::Writer(Box::new(File::create(p).map_err(|source| {
                Error::SerialFile {
                    path: p.clone(),
                    source,
                }
            })?))
        }
    };
    let cpus = args.cpus.boot;
    let vm = vm::Vm::new(cpus, mem, serial)?;
    // With an API socket, the hotplug manager owns every passthrough device (the --device ones too).
    let hotplug = match &args.api_socket {
        Some(_) => Some(hotplug::Hotplug::new(&vm, &checked)?),
        None => None,
    };
    let passthrough = match checked.is_empty() || hotplug.is_some() {
        true => None,
        false => Some(passthrough::attach(&checked, &vm)?),
    };
    let edu = match args.edu {
        0 => None,
        n => Some(edu::EduDevices::attach(&vm, usize::from(n))?),
    };
    let boot = boot::load_linux(
        vm.memory(),
        kernel,
        args.initramfs.as_deref(),
        &args.cmdline,
    )?;
    acpi::AcpiTables {
        cpus,
        mmio64: vm.mmio64_window(),
        extra: Vec::new(),
    }
    .write_with_dsdt(
        vm.memory(),
        &hotplug
            .as_ref()
            .map(|_| hotplug::dsdt_aml())
            .unwrap_or_default(),
    )?;
    vm.configure_linux(&boot)?;
    log::info!(
        "starting {} vCPU(s), {} MiB of RAM, entry {:#x}, set-up took {:?}",
        cpus,
        args.memory.size >> 20,
        boot.entry,
        started.elapsed()
    );
    let api = match (hotplug, &args.api_socket) {
        (Some(h), Some(path)) => Some(api::ApiServer::start(path, h)?),
        _ => None,
    };
    let running = vm.start()?;
    let _raw = matches!(args.serial, cli::SerialArg::Tty)
        .then(RawTerminal::enter)
        .flatten();
    let exit = event_loop::run(&running, matches!(args.serial, cli::SerialArg::Tty));
    let stopped = running.stop(Duration::from_secs(5));
    if let Some(api) = api {
        drop(api.shutdown()); // hotplugged devices released through the component, vCPUs stopped
    }
    drop(passthrough); // released through the IOMMU component once the vCPUs are stopped
    drop(edu); // parked, then released, likewise
    drop(_raw);
    let exit = exit?;
    stopped?;
    log::info!("VM ended after {:?}: {exit:?}", started.elapsed());
    match exit {
        vcpu::VmExit::PowerOff => Ok(ExitCode::SUCCESS),
        vcpu::VmExit::Reset => {
            eprintln!("vmm: the guest reset (reboot, panic or triple fault); iovmm does not restart guests");
            Ok(ExitCode::from(EXIT_GUEST_RESET))
        }
        vcpu::VmExit::Error(e) => Err(Error::Guest(e)),
        vcpu::VmExit::Terminated(sig) => {
            eprintln!(
                "vmm: stopped by signal {sig}; the guest was stopped and its devices released"
            );
            Ok(ExitCode::from(128u8.saturating_add(sig as u8)))
        }
    }
}
