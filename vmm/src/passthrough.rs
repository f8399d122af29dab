//! Passthrough of host PCI devices (`--device path=/sys/bus/pci/devices/<BDF>`): the checks made before
//! anything is opened (preflight), and each device's lifecycle in the VM ([`Passthrough`]: open, plug,
//! park, release, through the IOMMU component). The code that decides *when* is elsewhere: [`attach`]
//! for `--device` without an API socket, `crate::hotplug` with one. This module never talks to the
//! guest about hotplug and keeps no device list of its own (its callers do).
//!
//! The preflight only reads sysfs and the process's limits: when it fails, nothing has been opened,
//! bound or mapped, so there is nothing to undo. Each failure says what is wrong and prints the
//! commands that fix it.
//!
//! Memlock accounting: the type1 driver of the IOMMU component gives each IOMMU group a container of its
//! own (so a group can be parked by emptying its container), and the host kernel accounts pinned pages per
//! container. Guest RAM is therefore counted once per group, and the preflight asks for
//! `guest RAM x number of groups` of RLIMIT_MEMLOCK.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The driver a device must be bound to before it can be passed through.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// One `--device` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The device's sysfs path, e.g. `/sys/bus/pci/devices/0000:00:02.0`.
    pub path: PathBuf,
}

/// Errors of parsing a `--device` argument.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// No `path=` key.
    #[error("--device '{0}': expected path=/sys/bus/pci/devices/<BDF>")]
    NoPath(String),
    /// A key this VMM does not know.
    #[error("--device '{arg}': unknown key '{key}' (known keys: path)")]
    UnknownKey {
        /// The whole argument.
        arg: String,
        /// The key that is not known.
        key: String,
    },
}

impl FromStr for DeviceSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        for part in s.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                Some((k, _)) if k != "path" => {
                    return Err(SpecError::UnknownKey {
                        arg: s.to_string(),
                        key: k.to_string(),
                    })
                }
                // A bare path is accepted as well.
                None if part.starts_with('/') => path = Some(PathBuf::from(part)),
                _ => return Err(SpecError::NoPath(s.to_string())),
            }
        }
        path.map(|path| DeviceSpec { path })
            .ok_or_else(|| SpecError::NoPath(s.to_string()))
    }
}

/// A device that passed the preflight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedDevice {
    /// The sysfs path as given (vfio-ioctls reads `iommu_group` under it).
    pub sysfs: PathBuf,
    /// Its PCI address, e.g. `0000:00:02.0`.
    pub bdf: String,
    /// Its IOMMU group number (`/dev/vfio/<group>`).
    pub group: u32,
}

/// Why a device cannot be passed through. Every message says how to fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    /// The path does not exist.
    #[error("device {path}: no such device. List the host's PCI devices with `ls /sys/bus/pci/devices` (or `lspci -D`) and pass path=/sys/bus/pci/devices/<BDF>")]
    NoSuchDevice {
        /// The path given.
        path: String,
    },
    /// The path exists but is not a PCI device.
    #[error("device {path}: not a PCI device (no vendor/config files); pass path=/sys/bus/pci/devices/<BDF>")]
    NotPci {
        /// The path given.
        path: String,
    },
    /// The device is not bound to vfio-pci.
    #[error("device {bdf}: bound to {}, not to vfio-pci. Bind it to vfio-pci first:\n{fix}", driver.as_deref().map(|d| format!("driver '{d}'")).unwrap_or_else(|| "no driver".to_string()))]
    NotBoundToVfio {
        /// The device's PCI address.
        bdf: String,
        /// The driver it is bound to, if any.
        driver: Option<String>,
        /// Shell commands that bind it to vfio-pci.
        fix: String,
    },
    /// The device has no IOMMU group: the host's IOMMU is off.
    #[error("device {bdf}: no IOMMU group. The host IOMMU is off: boot the host with intel_iommu=on (or amd_iommu=on) and load vfio-pci")]
    NoIommuGroup {
        /// The device's PCI address.
        bdf: String,
    },
    /// Another device of the group is bound to a host driver.
    #[error("device {bdf}: IOMMU group {group} is not viable: {other} in the same group is bound to '{driver}'. Every device of a group must be bound to vfio-pci (or to no driver):\n{fix}")]
    GroupNotViable {
        /// The device's PCI address.
        bdf: String,
        /// The group.
        group: u32,
        /// The other device that holds the group.
        other: String,
        /// Its driver.
        driver: String,
        /// Shell commands that bind it to vfio-pci.
        fix: String,
    },
    /// `/dev/vfio/<group>` is missing.
    #[error("device {bdf}: {node} does not exist although the device is bound to vfio-pci; is devtmpfs mounted on /dev?")]
    NoGroupNode {
        /// The device's PCI address.
        bdf: String,
        /// The missing node.
        node: String,
    },
    /// The same device was given twice.
    #[error("--device {bdf} was given twice")]
    Duplicate {
        /// The device's PCI address.
        bdf: String,
    },
    /// RLIMIT_MEMLOCK does not cover the guest RAM that will be pinned.
    #[error("the memlock limit (RLIMIT_MEMLOCK) is {have} bytes, but passing through {groups} IOMMU group(s) pins guest RAM ({ram} bytes) once per group: {need} bytes. Raise it, e.g. `ulimit -l {need_kib}` (KiB) or `ulimit -l unlimited` in the shell that starts vmm, or `prlimit --pid <vmm pid> --memlock={need}:{need}`")]
    MemlockTooLow {
        /// The current soft limit.
        have: u64,
        /// What is needed.
        need: u64,
        /// `need` in KiB, as `ulimit -l` takes it.
        need_kib: u64,
        /// Guest RAM.
        ram: u64,
        /// Number of distinct groups.
        groups: usize,
    },
    /// getrlimit failed.
    #[error("cannot read RLIMIT_MEMLOCK: {0}")]
    Rlimit(String),
}

/// Where the preflight looks: the real system, or a fake tree in tests.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// Prefix of /sys (a device path given as /sys/... is looked up under it).
    pub sys_root: PathBuf,
    /// Prefix of /dev.
    pub dev_root: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            sys_root: PathBuf::from("/"),
            dev_root: PathBuf::from("/"),
        }
    }
}

impl HostPaths {
    fn sys(&self, p: &Path) -> PathBuf {
        self.sys_root.join(p.strip_prefix("/").unwrap_or(p))
    }
    fn dev(&self, p: &str) -> PathBuf {
        self.dev_root.join(p.trim_start_matches('/'))
    }
}

/// The name of the driver a sysfs device is bound to, if any.
fn bound_driver(dev: &Path) -> Option<String> {
    std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The commands that bind `bdf` to vfio-pci.
pub fn bind_commands(bdf: &str, driver: Option<&str>) -> String {
    let d = format!("/sys/bus/pci/devices/{bdf}");
    let mut s =
        String::from("    modprobe vfio-pci   # if /sys/bus/pci/drivers/vfio-pci does not exist\n");
    s += &format!("    echo vfio-pci > {d}/driver_override\n");
    if driver.is_some() {
        s += &format!("    echo {bdf} > {d}/driver/unbind\n");
    }
    s += &format!("    echo {bdf} > /sys/bus/pci/drivers_probe");
    s
}

/// Checks one device: exists, is PCI, bound to vfio-pci, its group viable, `/dev/vfio/<group>` present.
pub fn check_device(spec: &DeviceSpec, host: &HostPaths) -> Result<CheckedDevice, PreflightError> {
    let shown = spec.path.display().to_string();
    let dev = host.sys(&spec.path);
    if !dev.exists() {
        return Err(PreflightError::NoSuchDevice { path: shown });
    }
    if !dev.join("config").exists() || !dev.join("vendor").exists() {
        return Err(PreflightError::NotPci { path: shown });
    }
    let bdf = std::fs::canonicalize(&dev)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .or_else(|| {
            spec.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| shown.clone());
    let driver = bound_driver(&dev);
    if driver.as_deref() != Some(VFIO_PCI_DRIVER) {
        return Err(PreflightError::NotBoundToVfio {
            fix: bind_commands(&bdf, driver.as_deref()),
            bdf,
            driver,
        });
    }
    let group_link = std::fs::read_link(dev.join("iommu_group"))
        .map_err(|_| PreflightError::NoIommuGroup { bdf: bdf.clone() })?;
    let group: u32 = group_link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| PreflightError::NoIommuGroup { bdf: bdf.clone() })?;
    let members = host.sys(Path::new(&format!(
        "/sys/kernel/iommu_groups/{group}/devices"
    )));
    if let Ok(entries) = std::fs::read_dir(&members) {
        let mut names: Vec<_> = entries.filter_map(|e| e.ok()).collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let other = e.file_name().to_string_lossy().into_owned();
            if let Some(d) = bound_driver(&e.path()) {
                if !crate::check_host::driver_allows_vfio(&d) {
                    return Err(PreflightError::GroupNotViable {
                        fix: bind_commands(&other, Some(&d)),
                        bdf,
                        group,
                        other,
                        driver: d,
                    });
                }
            }
        }
    }
    let node = host.dev(&format!("/dev/vfio/{group}"));
    if !node.exists() {
        return Err(PreflightError::NoGroupNode {
            bdf,
            node: format!("/dev/vfio/{group}"),
        });
    }
    Ok(CheckedDevice {
        sysfs: spec.path.clone(),
        bdf,
        group,
    })
}

/// The soft RLIMIT_MEMLOCK of this process, `None` when unlimited.
pub fn memlock_limit() -> Result<Option<u64>, PreflightError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if r != 0 {
        return Err(PreflightError::Rlimit(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(if lim.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(lim.rlim_cur)
    })
}

/// Checks that `limit` (None = unlimited) covers `ram` bytes pinned once per group.
pub fn check_memlock(limit: Option<u64>, ram: u64, groups: usize) -> Result<(), PreflightError> {
    let need = ram.saturating_mul(groups as u64);
    match limit {
        Some(have) if have < need => Err(PreflightError::MemlockTooLow {
            have,
            need,
            need_kib: need.div_ceil(1024),
            ram,
            groups,
        }),
        _ => Ok(()),
    }
}

/// All checks for all `--device` arguments, before anything is opened.
pub fn preflight(
    specs: &[DeviceSpec],
    guest_ram: u64,
    host: &HostPaths,
) -> Result<Vec<CheckedDevice>, PreflightError> {
    let mut out: Vec<CheckedDevice> = Vec::new();
    for s in specs {
        let d = check_device(s, host)?;
        if out.iter().any(|o| o.bdf == d.bdf) {
            return Err(PreflightError::Duplicate { bdf: d.bdf });
        }
        out.push(d);
    }
    if !out.is_empty() {
        let groups: BTreeSet<u32> = out.iter().map(|d| d.group).collect();
        check_memlock(memlock_limit()?, guest_ram, groups.len())?;
    }
    Ok(out)
}

impl fmt::Display for CheckedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (IOMMU group {})", self.bdf, self.group)
    }
}

// ---------------------------------------------------------------------------------------------------------
// The lifecycle of a device, through the IOMMU component's `vfio` instance:
//
//   open: probe, claim its group for the guest (blocked domain: the device fd is open, its container empty)
//   plug: attach the guest-RAM paging domain (the driver replays its mappings into the group's container),
//         build the passthrough PCI device, put it on the bus
//   park: attach the blocked domain (container emptied, device fd kept open), stop the PCI device
//   plug again: the group is plugged again in the component, then as above
//   release: off the bus, stop the PCI device, release through the component (release domain, fds closed)
//
// [`Passthrough`] does these steps; [`BootDevices`] uses them for `--device` without an API socket, and
// `crate::hotplug` adds the guest's hotplug handshake and the control API on top.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::pci::{MsiRouting, PciBus, PciSlot};
use devices::vfio_pci::{BarMapper, VfioPciDevice, VfioPciError};
use iommu::core::{
    CoreError, DeviceDesc, DeviceId, DeviceStatus, GroupId, InstanceId, IommuCore, PagingDomain,
    Prot, Target,
};
use iommu::vfio::VfioIommu;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vfio_ioctls::VfioDevice;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::dma::{error_chain, VMM_OWNER};
use crate::interrupts::GsiRouter;
use crate::memory::GuestMemory;
use crate::vm::Vm;

/// Errors of the passthrough lifecycle (open, plug, park). Each names the device and the step.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The IOMMU component refused or its vfio driver failed.
    #[error("passthrough of {device}: {what}: {}", error_chain(source))]
    Iommu {
        /// The device (or "guest RAM").
        device: String,
        /// The step.
        what: &'static str,
        /// The component's error.
        #[source]
        source: CoreError,
    },
    /// The passthrough PCI device could not be built.
    #[error("passthrough of {device}: {source}")]
    Device {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: VfioPciError,
    },
    /// The PCI bus refused the device.
    #[error("passthrough of {device}: {source}")]
    Bus {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: devices::pci::PciBusError,
    },
    /// The guest-RAM domain is gone: the VM is ending.
    #[error("passthrough of {device}: the VM is shutting down; no device can be plugged any more")]
    ShuttingDown {
        /// The device.
        device: String,
    },
}

fn ierr<'a>(device: &'a str, what: &'static str) -> impl FnOnce(CoreError) -> AttachError + 'a {
    move |source| AttachError::Iommu {
        device: device.to_string(),
        what,
        source,
    }
}

/// KVM memory slots for BAR mappings, numbered from the first slot after guest RAM.
pub struct KvmBarSlots {
    vm: Arc<VmFd>,
    state: Mutex<SlotState>,
}

struct SlotState {
    next: u32,
    free: Vec<u32>,
    used: HashMap<u32, (u64, u64, u64)>,
}

impl KvmBarSlots {
    /// Slots from `first` on, in `vm`.
    pub fn new(vm: Arc<VmFd>, first: u32) -> Self {
        KvmBarSlots {
            vm,
            state: Mutex::new(SlotState {
                next: first,
                free: Vec::new(),
                used: HashMap::new(),
            }),
        }
    }

    /// Number of slots in use.
    pub fn in_use(&self) -> usize {
        self.state.lock().map(|s| s.used.len()).unwrap_or(0)
    }
}

impl BarMapper for KvmBarSlots {
    fn map(&self, gpa: u64, size: u64, host_addr: u64) -> Result<u32, String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match st.free.pop() {
            Some(s) => s,
            None => {
                st.next += 1;
                st.next - 1
            }
        };
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: `host_addr` is an mmap of a VFIO BAR owned by the passthrough device, which removes
        // this slot (unmap) before it unmaps the BAR.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(r) } {
            st.free.push(slot);
            return Err(format!(
                "KVM refused memory slot {slot} ({size:#x} bytes at {gpa:#x}): {e}"
            ));
        }
        st.used.insert(slot, (gpa, size, host_addr));
        log::debug!("passthrough: slot {slot}: BAR memory {size:#x} bytes at {gpa:#x}");
        Ok(slot)
    }

    fn unmap(&self, slot: u32) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some((gpa, _, host)) = st.used.remove(&slot) else {
            return Err(format!("slot {slot} is not a BAR slot"));
        };
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: host,
        };
        // SAFETY: deleting a slot (size 0) only removes a mapping.
        unsafe { self.vm.set_user_memory_region(r) }
            .map_err(|e| format!("KVM refused to delete slot {slot}: {e}"))?;
        st.free.push(slot);
        Ok(())
    }
}

/// A host device that the VMM holds through the IOMMU component: probed, its group claimed for the
/// guest. It is on the guest's PCI bus after [`Passthrough::plug`], off it (reaching no memory) before
/// and after [`Passthrough::park`]. Give it back with [`Passthrough::release_device`].
pub struct PassthroughDevice {
    /// How the log names it: its BDF, or `<id> (<BDF>)` under the hotplug manager.
    pub name: String,
    /// What the preflight found (BDF, sysfs path, host IOMMU group).
    pub host: CheckedDevice,
    dev: DeviceId,
    group: GroupId,
    parked: bool,
    on_bus: Option<(PciSlot, Arc<Mutex<VfioPciDevice>>)>,
}

impl PassthroughDevice {
    /// The guest PCI slot, while the device is on the bus (or the guest is ejecting it).
    pub fn slot(&self) -> Option<PciSlot> {
        self.on_bus.as_ref().map(|(s, _)| *s)
    }

    /// The passthrough PCI device, while it is on the bus.
    pub fn pci(&self) -> Option<&Arc<Mutex<VfioPciDevice>>> {
        self.on_bus.as_ref().map(|(_, p)| p)
    }
}

/// The passthrough set-up of a VM: the IOMMU component with its `vfio` instance, the guest-RAM paging
/// domain (IOVA = GPA, mapped once; the driver replays it into each group's container on attach), the PCI
/// bus, MSI routing and the KVM slots for BARs. It does each step of a device's lifecycle (see the
/// section comment above); it does not decide when (that is [`BootDevices`] or `crate::hotplug`).
///
/// [`Passthrough::release`] (or drop) frees the domain: release every device first.
pub struct Passthrough {
    core: Arc<IommuCore>,
    vfio: Arc<VfioIommu>,
    inst: InstanceId,
    domain: Option<PagingDomain>,
    bus: Arc<PciBus>,
    router: Arc<GsiRouter>,
    slots: Arc<KvmBarSlots>,
    /// Guest RAM stays mapped in this process while the domain maps it.
    memory: GuestMemory,
    runs: Vec<(u64, u64, u64)>,
    released: bool,
}

/// The guest RAM ranges to map: (gpa, host address, length), adjacent regions merged when both their
/// guest and host addresses are contiguous.
pub fn ram_runs(mem: &GuestMemory) -> Vec<(u64, u64, u64)> {
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for r in mem.iter() {
        let (gpa, host, len) = (r.start_addr().0, r.as_ptr() as u64, r.len());
        match runs.last_mut() {
            Some(last) if last.0 + last.2 == gpa && last.1 + last.2 == host => last.2 += len,
            _ => runs.push((gpa, host, len)),
        }
    }
    runs
}

impl Passthrough {
    /// Registers the component's `vfio` driver (in the VM's IOMMU component) and maps guest RAM (IOVA = GPA) into a new paging domain.
    /// No VFIO call is made until a device's group is attached to it.
    pub fn new(vm: &Vm) -> Result<Self, AttachError> {
        let core = vm.iommu().clone();
        let vfio = Arc::new(VfioIommu::new());
        let inst = core
            .register(vfio.clone())
            .map_err(ierr("vfio", "registering the vfio driver"))?;
        let domain = core
            .alloc_paging(inst)
            .map_err(ierr("guest RAM", "allocating the guest-RAM domain"))?;
        let runs = ram_runs(vm.memory());
        for &(gpa, host, len) in &runs {
            core.map(&domain, gpa, host, len, Prot::RW)
                .map_err(ierr("guest RAM", "mapping guest RAM into the domain"))?;
        }
        Ok(Passthrough {
            core,
            vfio,
            inst,
            domain: Some(domain),
            bus: vm.devices().pci().clone(),
            router: vm.gsi_router().clone(),
            slots: Arc::new(KvmBarSlots::new(vm.vm_fd().clone(), vm.next_free_slot())),
            memory: vm.memory().clone(),
            runs,
            released: false,
        })
    }

    /// Bytes of guest RAM in the domain.
    pub fn ram_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.2).sum()
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The VFIO driver of the component (counters, open containers, device fds).
    pub fn vfio(&self) -> &VfioIommu {
        &self.vfio
    }

    /// KVM memory slots in use by BARs.
    pub fn bar_slots_in_use(&self) -> usize {
        self.slots.in_use()
    }

    /// GSIs in use by MSI-X vectors.
    pub fn msi_gsis_in_use(&self) -> usize {
        self.router.msi_count()
    }

    /// What the component says about `d` (owner, domain); `None` once it is released.
    pub fn status(&self, d: &PassthroughDevice) -> Option<DeviceStatus> {
        self.core.device_status(d.dev).ok()
    }

    /// The open VFIO device of `d` (`None` if the driver has none).
    pub fn vfio_device(&self, d: &PassthroughDevice) -> Option<Arc<VfioDevice>> {
        self.vfio.device(d.dev)
    }

    /// Maps `len` bytes at `host_addr` at `iova` into the guest-RAM domain (every attached group sees it).
    pub fn map_into_domain(
        &self,
        iova: u64,
        host_addr: u64,
        len: u64,
        what: &'static str,
    ) -> Result<(), AttachError> {
        let domain = self.domain.as_ref().ok_or(AttachError::ShuttingDown {
            device: what.to_string(),
        })?;
        self.core
            .map(domain, iova, host_addr, len, Prot::RW)
            .map_err(ierr(what, "mapping into the guest-RAM domain"))
    }

    /// Probes `host` into the component and claims its group for the guest (the blocked domain: the
    /// device is opened in an empty container). Nothing is left behind on error.
    pub fn open(
        &self,
        host: &CheckedDevice,
        name: String,
    ) -> Result<PassthroughDevice, AttachError> {
        let dev = self
            .core
            .probe_device(self.inst, DeviceDesc::new(host.sysfs.display().to_string()))
            .map_err(ierr(&host.bdf, "probe"))?;
        let claimed = self
            .core
            .group_of(dev)
            .map_err(ierr(&host.bdf, "group"))
            .and_then(|group| {
                self.core
                    .claim_dma_owner(group, VMM_OWNER)
                    .map_err(ierr(
                        &host.bdf,
                        "claiming its group for the guest (blocked domain)",
                    ))
                    .map(|()| group)
            });
        match claimed {
            Ok(group) => Ok(PassthroughDevice {
                name,
                host: host.clone(),
                dev,
                group,
                parked: false,
                on_bus: None,
            }),
            Err(e) => {
                if let Err(x) = self.core.release_device(dev) {
                    log::error!(
                        "passthrough: {}: releasing after a failed open: {}",
                        host.bdf,
                        error_chain(&x)
                    );
                }
                Err(e)
            }
        }
    }

    /// Puts an opened or parked device on the guest's bus: a parked group is plugged again in the
    /// component, the guest-RAM domain is attached (its mappings replayed into the group's container),
    /// the passthrough PCI device built and added to the bus. On error a parked device is parked again;
    /// a device that was never plugged stays claimed (release it).
    pub fn plug(&self, d: &mut PassthroughDevice) -> Result<PciSlot, AttachError> {
        let again = d.parked;
        if again {
            self.core
                .plug(d.group, VMM_OWNER)
                .map_err(ierr(&d.name, "plugging the parked group"))?;
            d.parked = false;
        }
        let r = self
            .attach_guest_ram(d, again)
            .and_then(|()| self.put_on_bus(d));
        if r.is_err() && again {
            if let Err(x) = self.core.park(d.group, VMM_OWNER) {
                log::error!(
                    "passthrough: {}: parking again after a failed plug: {}",
                    d.name,
                    error_chain(&x)
                );
            }
            d.parked = true;
        }
        r
    }

    fn attach_guest_ram(&self, d: &PassthroughDevice, again: bool) -> Result<(), AttachError> {
        let domain = self.domain.as_ref().ok_or(AttachError::ShuttingDown {
            device: d.name.clone(),
        })?;
        // Another device of the same group (several --device of one group) attached it already.
        let attached = self.core.group_domain(d.group).ok().flatten().map(|i| i.id);
        if attached == Some(domain.id()) {
            return Ok(());
        }
        let before = self.vfio.stats();
        self.core
            .attach(d.group, VMM_OWNER, Target::Paging(domain))
            .map_err(ierr(&d.name, "attaching the guest-RAM domain"))?;
        let after = self.vfio.stats();
        let (calls, bytes) = (
            after.map_calls - before.map_calls,
            after.map_bytes - before.map_bytes,
        );
        if again {
            log::info!(
                "passthrough: {}: guest RAM mapped into its container again: {calls} VFIO_IOMMU_MAP_DMA call(s), {bytes} bytes",
                d.name
            );
        } else {
            log::info!(
                "passthrough: {}: guest RAM ({} region(s), {} bytes) DMA-mapped IOVA=GPA: {calls} VFIO_IOMMU_MAP_DMA call(s), {bytes} bytes, into the container of host group {}",
                d.name,
                self.runs.len(),
                self.ram_bytes(),
                d.host.group
            );
        }
        Ok(())
    }

    fn put_on_bus(&self, d: &mut PassthroughDevice) -> Result<PciSlot, AttachError> {
        let bdf = &d.host.bdf;
        let vdev = self
            .vfio
            .device(d.dev)
            .ok_or(CoreError::UnknownDevice(d.dev))
            .map_err(ierr(bdf, "opening"))?;
        let router: Arc<dyn MsiRouting> = self.router.clone();
        let pci = VfioPciDevice::new(format!("vfio {bdf}"), vdev, router, self.slots.clone())
            .map_err(|source| AttachError::Device {
                device: bdf.clone(),
                source,
            })?;
        let pci = Arc::new(Mutex::new(pci));
        let slot = self
            .bus
            .add_device(None, pci.clone())
            .map_err(|source| AttachError::Bus {
                device: bdf.clone(),
                source,
            })?;
        let sizes = self
            .vfio
            .host_page_sizes(d.dev)
            .map(|ps| format!("{ps:#x}"))
            .unwrap_or_else(|| "unknown".into());
        log::info!(
            "passthrough: {} plugged as guest PCI {slot} (host group {}, host IOMMU page sizes {sizes})",
            d.name,
            d.host.group
        );
        d.on_bus = Some((slot, pci));
        Ok(slot)
    }

    /// Takes `d` off the bus (if it is on it) and stops its PCI device (MSI-X off, BAR slots removed,
    /// reset, GSIs released). Its DMA is untouched: park or release it next.
    pub fn take_off_bus(&self, d: &mut PassthroughDevice) {
        if let Some((slot, pci)) = d.on_bus.take() {
            self.bus.remove_device(slot);
            pci.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        }
    }

    /// Parks a device that the guest let go of (it must be off the bus already: the hotplug controller
    /// takes it off when the guest ejects it): the component attaches the blocked domain (its container
    /// emptied, the device fd kept open), then the PCI device is stopped. A parked device reaches no
    /// memory; [`plug`](Self::plug) puts it back.
    pub fn park(&self, d: &mut PassthroughDevice) -> Result<(), AttachError> {
        let before = self.vfio.stats();
        let parked = self.core.park(d.group, VMM_OWNER);
        if let Some((_, pci)) = d.on_bus.take() {
            pci.lock().unwrap_or_else(|x| x.into_inner()).shutdown();
        }
        let after = self.vfio.stats();
        parked.map_err(ierr(&d.name, "parking (blocked domain)"))?;
        d.parked = true;
        log::info!(
            "passthrough: {} parked: blocked domain attached ({} VFIO_IOMMU_UNMAP_DMA call(s), {} bytes: its container is empty), device fd kept open; BAR slots in use {}, MSI GSIs in use {}",
            d.name,
            after.unmap_calls - before.unmap_calls,
            after.unmap_bytes - before.unmap_bytes,
            self.slots.in_use(),
            self.router.msi_count()
        );
        Ok(())
    }

    /// Gives `d` back: off the bus and stopped, then released through the component (the release domain,
    /// blocked, is attached; then the driver closes the device fd and the container).
    pub fn release_device(&self, mut d: PassthroughDevice) {
        self.take_off_bus(&mut d);
        match self.core.release_device(d.dev) {
            Ok(()) => log::info!(
                "passthrough: {} released (release domain, then fds closed)",
                d.name
            ),
            Err(e) => log::error!("passthrough: releasing {}: {}", d.name, error_chain(&e)),
        }
    }

    /// Frees the guest-RAM domain (release every device first) and logs what VFIO did in total and what
    /// is left. Idempotent; also run on drop.
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        if let Some(d) = self.domain.take() {
            if let Err(e) = self.core.free(d) {
                log::error!("passthrough: the guest-RAM domain could not be freed: {e:?}");
            }
        }
        let s = self.vfio.stats();
        log::info!(
            "passthrough: released; VFIO totals: {} map call(s) / {} bytes, {} unmap call(s) / {} bytes; {} container(s), {} BAR slot(s) and {} VFIO fd(s) left",
            s.map_calls,
            s.map_bytes,
            s.unmap_calls,
            s.unmap_bytes,
            self.vfio.open_containers(),
            self.slots.in_use(),
            open_vfio_fds()
        );
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        self.release();
    }
}

/// The `--device` devices of a VM that runs without an API socket: plugged before the guest runs,
/// released (in reverse order) when dropped, after the vCPUs stopped.
pub struct BootDevices {
    pt: Passthrough,
    devices: Vec<PassthroughDevice>,
}

/// Opens and plugs every checked device (see [`Passthrough`]).
pub fn attach(checked: &[CheckedDevice], vm: &Vm) -> Result<BootDevices, AttachError> {
    let mut boot = BootDevices {
        pt: Passthrough::new(vm)?,
        devices: Vec::new(),
    };
    for c in checked {
        let mut d = boot.pt.open(c, c.bdf.clone())?;
        let plugged = boot.pt.plug(&mut d);
        // Released by `boot` on error as well.
        boot.devices.push(d);
        plugged?;
    }
    Ok(boot)
}

impl Drop for BootDevices {
    fn drop(&mut self) {
        for d in self.devices.drain(..).rev() {
            self.pt.release_device(d);
        }
        self.pt.release();
    }
}

/// Number of this process's open fds on /dev/vfio/* or VFIO device files.
pub fn open_vfio_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|t| {
                    let t = t.to_string_lossy();
                    t.starts_with("/dev/vfio/") || t.contains("vfio-device")
                })
                .count()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A throw-away fake /sys + /dev tree.
    struct FakeHost {
        root: PathBuf,
    }

    impl FakeHost {
        fn new(name: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("iovmm-preflight-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
            std::fs::create_dir_all(root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
            std::fs::create_dir_all(root.join("sys/bus/pci/drivers/igb")).unwrap();
            std::fs::create_dir_all(root.join("dev/vfio")).unwrap();
            FakeHost { root }
        }
        fn paths(&self) -> HostPaths {
            HostPaths {
                sys_root: self.root.clone(),
                dev_root: self.root.clone(),
            }
        }
        fn device(&self, bdf: &str, group: u32, driver: Option<&str>) {
            let d = self.root.join("sys/devices/pci0000:00").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config"), [0u8; 64]).unwrap();
            std::fs::write(d.join("vendor"), "0x8086\n").unwrap();
            symlink(&d, self.root.join("sys/bus/pci/devices").join(bdf)).unwrap();
            if let Some(drv) = driver {
                symlink(
                    self.root.join("sys/bus/pci/drivers").join(drv),
                    d.join("driver"),
                )
                .unwrap();
            }
            let g = self.root.join(format!("sys/kernel/iommu_groups/{group}"));
            std::fs::create_dir_all(g.join("devices")).unwrap();
            symlink(&g, d.join("iommu_group")).unwrap();
            symlink(&d, g.join("devices").join(bdf)).unwrap();
            let _ = std::fs::write(self.root.join(format!("dev/vfio/{group}")), "");
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn spec(bdf: &str) -> DeviceSpec {
        DeviceSpec {
            path: PathBuf::from(format!("/sys/bus/pci/devices/{bdf}")),
        }
    }

    #[test]
    fn parses_device_arguments() {
        let s: DeviceSpec = "path=/sys/bus/pci/devices/0000:00:02.0".parse().unwrap();
        assert_eq!(s.path, PathBuf::from("/sys/bus/pci/devices/0000:00:02.0"));
        let s: DeviceSpec = "/sys/bus/pci/devices/0000:00:03.0".parse().unwrap();
        assert_eq!(s.path, PathBuf::from("/sys/bus/pci/devices/0000:00:03.0"));
        assert!(matches!(
            "id=x,path=/a".parse::<DeviceSpec>(),
            Err(SpecError::UnknownKey { .. })
        ));
        assert!(matches!(
            "".parse::<DeviceSpec>(),
            Err(SpecError::NoPath(_))
        ));
        assert!(matches!(
            "path=".parse::<DeviceSpec>(),
            Err(SpecError::NoPath(_))
        ));
    }

    #[test]
    fn accepts_a_device_bound_to_vfio_pci() {
        let h = FakeHost::new("ok");
        h.device("0000:00:02.0", 7, Some("vfio-pci"));
        let d = check_device(&spec("0000:00:02.0"), &h.paths()).unwrap();
        assert_eq!(d.bdf, "0000:00:02.0");
        assert_eq!(d.group, 7);
    }

    #[test]
    fn refuses_a_missing_path() {
        let h = FakeHost::new("missing");
        let e = check_device(&spec("0000:00:09.0"), &h.paths()).unwrap_err();
        assert!(matches!(e, PreflightError::NoSuchDevice { .. }));
        assert!(e.to_string().contains("no such device"));
    }

    #[test]
    fn refuses_a_device_bound_to_its_host_driver_and_says_how_to_fix_it() {
        let h = FakeHost::new("bound");
        h.device("0000:00:02.0", 3, Some("igb"));
        let e = check_device(&spec("0000:00:02.0"), &h.paths()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, PreflightError::NotBoundToVfio { .. }));
        assert!(msg.contains("driver 'igb'"), "{msg}");
        assert!(msg.contains("echo vfio-pci > /sys/bus/pci/devices/0000:00:02.0/driver_override"));
        assert!(msg.contains("echo 0000:00:02.0 > /sys/bus/pci/devices/0000:00:02.0/driver/unbind"));
        assert!(msg.contains("echo 0000:00:02.0 > /sys/bus/pci/drivers_probe"));
        // Unbound: no unbind line.
        let h2 = FakeHost::new("unbound");
        h2.device("0000:00:04.0", 4, None);
        let msg = check_device(&spec("0000:00:04.0"), &h2.paths())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("no driver") && !msg.contains("unbind"),
            "{msg}"
        );
    }

    #[test]
    fn refuses_a_group_with_a_member_on_a_host_driver() {
        let h = FakeHost::new("group");
        h.device("0000:00:02.0", 5, Some("vfio-pci"));
        h.device("0000:00:02.1", 5, Some("igb"));
        let e = check_device(&spec("0000:00:02.0"), &h.paths()).unwrap_err();
        match &e {
            PreflightError::GroupNotViable { other, group, .. } => {
                assert_eq!(other, "0000:00:02.1");
                assert_eq!(*group, 5);
            }
            _ => panic!("{e}"),
        }
    }

    #[test]
    fn refuses_the_same_device_twice() {
        let h = FakeHost::new("dup");
        h.device("0000:00:02.0", 5, Some("vfio-pci"));
        let e = preflight(&[spec("0000:00:02.0"), spec("0000:00:02.0")], 0, &h.paths());
        assert!(matches!(e, Err(PreflightError::Duplicate { .. })));
    }

    #[test]
    fn memlock_must_cover_ram_once_per_group() {
        assert!(check_memlock(None, 1 << 30, 2).is_ok());
        assert!(check_memlock(Some(2 << 30), 1 << 30, 2).is_ok());
        let e = check_memlock(Some(64 << 10), 256 << 20, 1).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("ulimit -l 262144"), "{msg}");
        assert!(msg.contains("prlimit"), "{msg}");
    }
}
