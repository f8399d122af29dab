//! The KVM VM: in-kernel irqchip and PIT, guest memory slots, the GSI router, the devices, and the vCPU
//! threads. [`Vm::new`] builds it; [`Vm::start`] runs the vCPUs; [`RunningVm::stop`] ends them.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::pci::{BarWindows, HostBridge, PciBus};
use devices::serial::SerialConsole;
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::BootInfo;
use crate::device_manager::DeviceManager;
use crate::interrupts::GsiRouter;
use crate::layout::*;
use crate::memory::{self, GuestMemory};
use crate::vcpu::{self, VmExit};

/// Most vCPUs a VM may have (APIC ids are one byte; the MADT uses one local APIC entry each).
pub const MAX_VCPUS: u8 = 254;

/// Errors of building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm ({0}): is KVM available, and may this user open /dev/kvm (group kvm)?")]
    OpenKvm(kvm_ioctls::Error),
    /// A VM-level KVM call failed.
    #[error("KVM: {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Bad vCPU count.
    #[error("--cpus boot={0}: between 1 and {MAX_VCPUS} vCPUs are supported")]
    BadCpuCount(u8),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Interrupt routing.
    #[error("interrupt routing: {0}")]
    Msi(#[from] devices::pci::MsiError),
    /// PCI bus.
    #[error(transparent)]
    Pci(#[from] devices::pci::PciBusError),
    /// Guest RAM reaches the vCPUs' physical address limit.
    #[error("guest RAM ends at {ram_end:#x}, which leaves no room for the 64-bit PCI window below the {phys_bits}-bit physical address limit of this host's vCPUs: give the guest less memory (--memory size=...)")]
    NoRoomForMmio64 {
        /// The vCPUs' physical address bits (0: not reported, 36 assumed).
        phys_bits: u8,
        /// End of guest RAM.
        ram_end: u64,
    },
    /// An OS resource (eventfd, thread, signal handler).
    #[error("{what}: {source}")]
    Os {
        /// What was being created.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where the guest's console output goes.
pub enum SerialOutput {
    /// No console device at all (the ports read as absent).
    Off,
    /// A console whose output goes to this writer (stdout, a file, a test's buffer).
    Writer(Box<dyn Write + Send>),
}

/// A VM that is built but whose vCPUs do not run yet.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemory,
    devices: Arc<DeviceManager>,
    gsi: Arc<GsiRouter>,
    vcpus: Vec<VcpuFd>,
    _serial_irq: Option<EventFd>,
    next_slot: u32,
    mmio64: (u64, u64),
    iommu: Arc<iommu::core::IommuCore>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

static KICK_HANDLER: Once = Once::new();

/// The vCPUs' physical address width in KVM's supported CPUID (leaf 0x80000008: `EAX[7:0]`, or the
/// smaller guest width in `EAX[23:16]` when KVM reports one); 0 when the leaf is missing.
pub fn phys_bits(supported: &CpuId) -> u8 {
    supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| {
            let (phys, guest) = (e.eax as u8, (e.eax >> 16) as u8);
            match guest {
                0 => phys,
                g => g.min(phys),
            }
        })
        .unwrap_or(0)
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

impl Vm {
    /// Creates the VM with `cpus` vCPUs (not yet configured) over `memory`, its irqchip, PIT, memory slots,
    /// GSI routes, the PCI bus with the host bridge, the ACPI power register, the i8042 and the console.
    pub fn new(cpus: u8, memory: GuestMemory, serial: SerialOutput) -> Result<Self, Error> {
        if cpus == 0 || cpus > MAX_VCPUS {
            return Err(Error::BadCpuCount(cpus));
        }
        let k = |what| move |source| Error::Kvm { what, source };
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let fd = Arc::new(kvm.create_vm().map_err(k("KVM_CREATE_VM"))?);
        fd.set_tss_address(0xfffb_d000)
            .map_err(k("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(0xfffb_c000)
            .map_err(k("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(k("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(k("KVM_CREATE_PIT2"))?;
        let next_slot = memory::register(&fd, &memory)?;
        let gsi = Arc::new(GsiRouter::new(fd.clone())?);

        let (serial_dev, serial_irq) = match serial {
            SerialOutput::Off => (None, None),
            SerialOutput::Writer(w) => {
                let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Os {
                    what: "eventfd",
                    source,
                })?;
                gsi.register_legacy_irqfd(&irq, COM1_IRQ)?;
                let dev_irq = irq.try_clone().map_err(|source| Error::Os {
                    what: "eventfd",
                    source,
                })?;
                (Some(SerialConsole::new(dev_irq, w)), Some(irq))
            }
        };
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(k("KVM_GET_SUPPORTED_CPUID"))?;
        let bits = phys_bits(&supported);
        let ram_end = memory
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0);
        let mmio64 = mmio64_window(bits, ram_end).ok_or(Error::NoRoomForMmio64 {
            phys_bits: bits,
            ram_end,
        })?;
        log::debug!(
            "64-bit PCI window {:#x}..{:#x} ({bits} physical address bits)",
            mmio64.0,
            mmio64.0 + mmio64.1
        );
        let pci = Arc::new(PciBus::new(BarWindows {
            mmio32: (MMIO32_START, MMIO32_SIZE),
            mmio64,
            io: (PCI_IO_START, PCI_IO_SIZE),
        }));
        pci.add_device(Some(0), Arc::new(std::sync::Mutex::new(HostBridge::new())))?;
        let devices = Arc::new(DeviceManager::new(serial_dev, pci));

        let mut vcpus = Vec::new();
        for id in 0..cpus {
            vcpus.push(
                fd.create_vcpu(u64::from(id))
                    .map_err(k("KVM_CREATE_VCPU"))?,
            );
        }
        Ok(Self {
            kvm,
            fd,
            memory,
            devices,
            gsi,
            vcpus,
            _serial_irq: serial_irq,
            next_slot,
            mmio64,
            iommu: Arc::new(iommu::core::IommuCore::new()),
        })
    }

    /// The VM's IOMMU component: one domain manager for every device that does DMA (its `vfio` instance
    /// for passthrough devices, its `soft` instance for emulated ones).
    pub fn iommu(&self) -> &Arc<iommu::core::IommuCore> {
        &self.iommu
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The KVM VM fd (for devices that add memory slots, e.g. VFIO BARs).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The next free KVM memory slot number.
    pub fn next_free_slot(&self) -> u32 {
        self.next_slot
    }

    /// The devices.
    pub fn devices(&self) -> &Arc<DeviceManager> {
        &self.devices
    }

    /// The GSI router (MSI routes for devices).
    pub fn gsi_router(&self) -> &Arc<GsiRouter> {
        &self.gsi
    }

    /// The vCPU fds, for set-up before [`Vm::start`] (tests set registers of tiny guests here).
    pub fn vcpus(&self) -> &[VcpuFd] {
        &self.vcpus
    }

    /// The 64-bit PCI MMIO window `(start, size)` (see [`mmio64_window`]); the DSDT must declare it.
    pub fn mmio64_window(&self) -> (u64, u64) {
        self.mmio64
    }

    /// KVM's supported CPUID.
    pub fn supported_cpuid(&self) -> Result<CpuId, Error> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| Error::Kvm {
                what: "KVM_GET_SUPPORTED_CPUID",
                source,
            })
    }

    /// Sets CPUID and MSRs on every vCPU and the 64-bit entry registers on vCPU 0.
    pub fn configure_linux(&self, boot: &BootInfo) -> Result<(), Error> {
        let supported = self.supported_cpuid()?;
        let count = self.vcpus.len() as u8;
        for (i, v) in self.vcpus.iter().enumerate() {
            let id = i as u8;
            let cpuid = vcpu::cpuid_for(&supported, id, count);
            vcpu::configure(v, id, &cpuid, (id == 0).then_some(boot))?;
        }
        Ok(())
    }

    /// Starts one thread per vCPU.
    pub fn start(self) -> Result<RunningVm, Error> {
        let mut reg_err = None;
        KICK_HANDLER.call_once(|| {
            if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
                reg_err = Some(e);
            }
        });
        if let Some(e) = reg_err {
            return Err(Error::Os {
                what: "registering the vCPU kick signal",
                source: e.into(),
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Os {
            what: "eventfd",
            source,
        })?;
        let (tx, rx) = channel();
        let mut threads = Vec::new();
        let handler: Arc<dyn vcpu::ExitHandler> = self.devices.clone();
        for (i, v) in self.vcpus.into_iter().enumerate() {
            let id = i as u8;
            let (handler, stop, tx) = (handler.clone(), stop.clone(), tx.clone());
            let evt = exit_evt.try_clone().map_err(|source| Error::Os {
                what: "eventfd",
                source,
            })?;
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Some(exit) = vcpu::run_loop(v, id, handler, stop) {
                        let _ = tx.send(exit);
                        let _ = evt.write(1);
                    }
                })
                .map_err(|source| Error::Os {
                    what: "spawning a vCPU thread",
                    source,
                })?;
            threads.push(t);
        }
        Ok(RunningVm {
            _kvm: self.kvm,
            fd: self.fd,
            memory: self.memory,
            devices: self.devices,
            gsi: self.gsi,
            threads,
            stop,
            exit_rx: rx,
            exit_evt,
            _serial_irq: self._serial_irq,
        })
    }
}

/// A VM whose vCPUs run.
pub struct RunningVm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemory,
    devices: Arc<DeviceManager>,
    gsi: Arc<GsiRouter>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    exit_rx: Receiver<VmExit>,
    exit_evt: EventFd,
    _serial_irq: Option<EventFd>,
}

impl RunningVm {
    /// Readable when a vCPU ended the VM (for the event loop).
    pub fn exit_event(&self) -> &EventFd {
        &self.exit_evt
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait_exit(&self, timeout: Duration) -> Option<VmExit> {
        self.exit_rx.recv_timeout(timeout).ok()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The devices.
    pub fn devices(&self) -> &Arc<DeviceManager> {
        &self.devices
    }

    /// The GSI router.
    pub fn gsi_router(&self) -> &Arc<GsiRouter> {
        &self.gsi
    }

    /// The KVM VM fd.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Number of vCPU threads still running.
    pub fn running_vcpus(&self) -> usize {
        self.threads.iter().filter(|t| !t.is_finished()).count()
    }

    /// Stops every vCPU (kicking those blocked in KVM_RUN, e.g. halted with the in-kernel irqchip) and
    /// joins their threads. Fails if a vCPU does not stop within `timeout`.
    pub fn stop(mut self, timeout: Duration) -> Result<(), Error> {
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        while self.threads.iter().any(|t| !t.is_finished()) {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                // A kick that lands before KVM_RUN is entered is lost; hence the loop.
                let _ = t.kill(kick_signal());
            }
            if Instant::now() > deadline {
                return Err(Error::Os {
                    what: "stopping the vCPUs",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "a vCPU thread did not stop",
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Ok(())
    }
}
