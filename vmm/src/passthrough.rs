//! Passthrough of host PCI devices (`--device path=/sys/bus/pci/devices/<BDF>`): the checks made before
//! anything is opened (preflight), and the wiring of each device into the VM.
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
    #[error("--device {path}: no such device. List the host's PCI devices with `ls /sys/bus/pci/devices` (or `lspci -D`) and pass path=/sys/bus/pci/devices/<BDF>")]
    NoSuchDevice {
        /// The path given.
        path: String,
    },
    /// The path exists but is not a PCI device.
    #[error("--device {path}: not a PCI device (no vendor/config files); pass path=/sys/bus/pci/devices/<BDF>")]
    NotPci {
        /// The path given.
        path: String,
    },
    /// The device is not bound to vfio-pci.
    #[error("--device {bdf}: bound to {}, not to vfio-pci. Bind it to vfio-pci first:\n{fix}", driver.as_deref().map(|d| format!("driver '{d}'")).unwrap_or_else(|| "no driver".to_string()))]
    NotBoundToVfio {
        /// The device's PCI address.
        bdf: String,
        /// The driver it is bound to, if any.
        driver: Option<String>,
        /// Shell commands that bind it to vfio-pci.
        fix: String,
    },
    /// The device has no IOMMU group: the host's IOMMU is off.
    #[error("--device {bdf}: no IOMMU group. The host IOMMU is off: boot the host with intel_iommu=on (or amd_iommu=on) and load vfio-pci")]
    NoIommuGroup {
        /// The device's PCI address.
        bdf: String,
    },
    /// Another device of the group is bound to a host driver.
    #[error("--device {bdf}: IOMMU group {group} is not viable: {other} in the same group is bound to '{driver}'. Every device of a group must be bound to vfio-pci (or to no driver):\n{fix}")]
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
    #[error("--device {bdf}: {node} does not exist although the device is bound to vfio-pci; is devtmpfs mounted on /dev?")]
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
// Wiring: each checked device is probed into the IOMMU component's `vfio` instance, its group claimed for
// the guest (the blocked domain: the device is opened, its container empty), guest RAM mapped IOVA=GPA in
// a paging domain that every group is then attached to, and the device put on the PCI bus.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::pci::{MsiRouting, PciBus, PciSlot};
use devices::vfio_pci::{BarMapper, VfioPciDevice, VfioPciError};
use iommu::core::{
    CoreError, DeviceDesc, DeviceId, GroupId, IommuCore, OwnerId, PagingDomain, Prot, Target,
};
use iommu::vfio::VfioIommu;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// The owner id the VMM claims groups with.
const VMM_OWNER: OwnerId = OwnerId(1);

/// Errors of attaching passthrough devices.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The IOMMU component refused or its vfio driver failed.
    #[error("passthrough of {device}: {what}: {source}{}", source_chain(source))]
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
}

/// The causes below a core error, as ": a: b" (the core's own message names only the step).
fn source_chain(e: &CoreError) -> String {
    let mut s = String::new();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
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

struct Attached {
    name: String,
    dev: DeviceId,
    slot: Option<PciSlot>,
    pci: Option<Arc<Mutex<VfioPciDevice>>>,
}

/// The passthrough devices of a VM. [`Passthrough::release`] (or drop) gives them back.
pub struct Passthrough {
    core: Arc<IommuCore>,
    vfio: Arc<VfioIommu>,
    domain: Option<PagingDomain>,
    groups: Vec<GroupId>,
    devices: Vec<Attached>,
    bus: Arc<PciBus>,
    slots: Arc<KvmBarSlots>,
    /// Guest RAM stays mapped in this process while the domain maps it.
    _memory: GuestMemory,
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

/// Attaches every checked device to the VM: component first (claim, map, attach), then the PCI device.
pub fn attach(
    checked: &[CheckedDevice],
    memory: &GuestMemory,
    vm: Arc<VmFd>,
    first_free_slot: u32,
    bus: Arc<PciBus>,
    router: Arc<dyn MsiRouting>,
) -> Result<Passthrough, AttachError> {
    let core = Arc::new(IommuCore::new());
    let vfio = Arc::new(VfioIommu::new());
    let mut pt = Passthrough {
        core: core.clone(),
        vfio: vfio.clone(),
        domain: None,
        groups: Vec::new(),
        devices: Vec::new(),
        bus,
        slots: Arc::new(KvmBarSlots::new(vm, first_free_slot)),
        _memory: memory.clone(),
        released: false,
    };
    let ierr = |device: &str, what, source| AttachError::Iommu {
        device: device.to_string(),
        what,
        source,
    };
    let inst = core
        .register(vfio.clone())
        .map_err(|e| ierr("vfio", "registering the vfio driver", e))?;
    let mut probed = Vec::new();
    for d in checked {
        let path = d.sysfs.display().to_string();
        let dev = core
            .probe_device(inst, DeviceDesc::new(path))
            .map_err(|e| ierr(&d.bdf, "probe", e))?;
        // Every device probed so far is released by `pt` on error.
        pt.devices.push(Attached {
            name: d.bdf.clone(),
            dev,
            slot: None,
            pci: None,
        });
        let group = core.group_of(dev).map_err(|e| ierr(&d.bdf, "group", e))?;
        if !pt.groups.contains(&group) {
            core.claim_dma_owner(group, VMM_OWNER).map_err(|e| {
                ierr(
                    &d.bdf,
                    "claiming its group for the guest (blocked domain)",
                    e,
                )
            })?;
            pt.groups.push(group);
        }
        probed.push((d, dev));
    }
    // Guest RAM, IOVA = GPA.
    let domain = core
        .alloc_paging(inst)
        .map_err(|e| ierr("guest RAM", "allocating a paging domain", e))?;
    let runs = ram_runs(memory);
    for &(gpa, host, len) in &runs {
        core.map(&domain, gpa, host, len, Prot::RW)
            .map_err(|e| ierr("guest RAM", "mapping guest RAM", e))?;
    }
    pt.domain = Some(domain);
    let before = vfio.stats();
    for g in pt.groups.clone() {
        if let Some(d) = pt.domain.as_ref() {
            core.attach(g, VMM_OWNER, Target::Paging(d))
                .map_err(|e| ierr("guest RAM", "attaching the guest-RAM domain", e))?;
        }
    }
    let after = vfio.stats();
    log::info!(
        "passthrough: guest RAM ({} region(s), {} bytes) DMA-mapped IOVA=GPA: {} VFIO_IOMMU_MAP_DMA call(s), {} bytes, over {} group(s)",
        runs.len(),
        runs.iter().map(|r| r.2).sum::<u64>(),
        after.map_calls - before.map_calls,
        after.map_bytes - before.map_bytes,
        pt.groups.len()
    );
    // The PCI devices.
    for (k, (d, dev)) in probed.into_iter().enumerate() {
        let name = format!("vfio {}", d.bdf);
        let Some(vdev) = vfio.device(dev) else {
            return Err(ierr(&d.bdf, "opening", CoreError::UnknownDevice(dev)));
        };
        let pci = VfioPciDevice::new(name.clone(), vdev, router.clone(), pt.slots.clone())
            .map_err(|source| AttachError::Device {
                device: d.bdf.clone(),
                source,
            })?;
        let pci = Arc::new(Mutex::new(pci));
        pt.devices[k].pci = Some(pci.clone());
        let slot = pt
            .bus
            .add_device(None, pci)
            .map_err(|source| AttachError::Bus {
                device: d.bdf.clone(),
                source,
            })?;
        pt.devices[k].slot = Some(slot);
        if let Some(ps) = vfio.host_page_sizes(dev) {
            log::info!(
                "passthrough: {} (host group {}) is guest PCI {slot}; host IOMMU page sizes {ps:#x}",
                d.bdf,
                d.group
            );
        }
    }
    Ok(pt)
}

impl Passthrough {
    /// The component (for diagnostics).
    pub fn core(&self) -> &Arc<IommuCore> {
        &self.core
    }

    /// Stops every device and releases it through the component: the PCI device is removed from the bus
    /// and reset, the release domain (blocked: its container emptied) is attached, the driver closes the
    /// device fd and the container; the guest-RAM domain is freed. Idempotent.
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        for a in self.devices.drain(..).rev() {
            if let Some(slot) = a.slot {
                self.bus.remove_device(slot);
            }
            if let Some(pci) = a.pci {
                pci.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
            }
            match self.core.release_device(a.dev) {
                Ok(()) => log::info!(
                    "passthrough: {} released (release domain, then fds closed)",
                    a.name
                ),
                Err(e) => log::error!("passthrough: releasing {}: {e}{}", a.name, source_chain(&e)),
            }
        }
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

impl Drop for Passthrough {
    fn drop(&mut self) {
        self.release();
    }
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
