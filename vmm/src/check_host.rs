//! `vmm check-host`: what a user needs to know before passthrough.
//!
//! The report covers, in this order:
//! - KVM: `/dev/kvm`, its API version and the capabilities this VMM relies on (through kvm-ioctls);
//! - VFIO: `/dev/vfio/vfio`, the VFIO API version and the type1 IOMMU extensions;
//! - every IOMMU group under `/sys/kernel/iommu_groups`, its devices (BDF, vendor:device, class, current
//!   driver) and whether the group is *viable* for VFIO, judged from sysfs the way the kernel judges it (every
//!   device unbound or bound to a driver that leaves DMA to its user: vfio-pci, pci-stub, pcieport; bridges
//!   excepted) and, when the group's `/dev/vfio/N` node exists, as the kernel itself reports it;
//! - the IOMMU page sizes, from `VFIO_IOMMU_GET_INFO` on a type1 container with a viable group in it
//!   (unknown, with the reason, when no such group can be opened);
//! - hugepages (`/proc/meminfo` and `/sys/kernel/mm/hugepages`) and the memlock limit (`RLIMIT_MEMLOCK`).
//!
//! Nothing read from the system may panic this command: every missing file or refused ioctl becomes a line
//! of the report. The command fails (non-zero exit, with what to do) only when something required for
//! passthrough is missing: `/dev/kvm`, `/dev/vfio/vfio`, or any IOMMU group at all.
//!
//! The file system roots are parameters ([`HostPaths`]) so that the parsing is tested on sample trees.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;
use vfio_bindings::bindings::vfio::{
    vfio_group_status, vfio_iommu_type1_info, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_BASE,
    VFIO_GROUP_FLAGS_VIABLE, VFIO_IOMMU_INFO_PGSIZES, VFIO_TYPE, VFIO_TYPE1_IOMMU,
};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

use crate::cli::CheckHostArgs;

ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE as u32, VFIO_BASE);
ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE as u32, VFIO_BASE + 1);
ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE as u32, VFIO_BASE + 2);
ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE as u32, VFIO_BASE + 3);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE as u32, VFIO_BASE + 4);
ioctl_io_nr!(VFIO_GROUP_UNSET_CONTAINER, VFIO_TYPE as u32, VFIO_BASE + 5);
ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);

/// Errors of `check-host`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something that passthrough cannot do without is missing; the report above says more.
    #[error("this host cannot pass devices through yet:\n{0}")]
    Missing(String),
    /// The JSON report could not be written.
    #[error("cannot write the JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

/// Where the host's file systems are; `/sys`, `/proc` and `/dev` except in tests.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// sysfs root (`/sys`).
    pub sys: PathBuf,
    /// procfs root (`/proc`).
    pub proc: PathBuf,
    /// devtmpfs root (`/dev`).
    pub dev: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// The whole report, as printed (plain or `--json`).
#[derive(Debug, Serialize)]
pub struct Report {
    /// KVM.
    pub kvm: KvmReport,
    /// The VFIO container device.
    pub vfio: VfioReport,
    /// IOMMU groups, sorted by number.
    pub groups: Vec<Group>,
    /// Why the groups could not be listed, if they could not.
    pub groups_error: Option<String>,
    /// IOMMU page sizes.
    pub iommu_page_sizes: PageSizes,
    /// Hugepages.
    pub hugepages: Hugepages,
    /// RLIMIT_MEMLOCK of this process.
    pub memlock: Memlock,
    /// Required things that are missing, each with what to do. Empty when the host is ready.
    pub missing: Vec<String>,
}

/// What `/dev/kvm` offers.
#[derive(Debug, Serialize, Default)]
pub struct KvmReport {
    /// `/dev/kvm` could be opened.
    pub available: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// KVM_GET_API_VERSION (12 on every kernel since 2.6.22).
    pub api_version: Option<i32>,
    /// Capabilities and their values, in a fixed order.
    pub capabilities: Vec<Capability>,
}

/// One KVM capability as KVM_CHECK_EXTENSION answers it.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct Capability {
    /// KVM's name without the `KVM_CAP_` prefix.
    pub name: String,
    /// 0: absent; 1: present; more: a count (vCPUs, memory slots, routes).
    pub value: i32,
}

/// What `/dev/vfio/vfio` offers.
#[derive(Debug, Serialize, Default)]
pub struct VfioReport {
    /// `/dev/vfio/vfio` could be opened.
    pub available: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// VFIO_GET_API_VERSION.
    pub api_version: Option<i32>,
    /// The type1v2 IOMMU backend is there.
    pub type1v2: bool,
    /// The type1 IOMMU backend is there.
    pub type1: bool,
}

/// One IOMMU group.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group number (the N of `/dev/vfio/N`).
    pub id: u32,
    /// Its devices, sorted by address.
    pub devices: Vec<Device>,
    /// Viable as judged from sysfs (see [`group_viability`]).
    pub viable: bool,
    /// Why not viable, when not.
    pub not_viable_because: Option<String>,
    /// `/dev/vfio/N` exists (at least one device of the group is bound to vfio-pci).
    pub dev_node: bool,
    /// What the kernel says (VFIO_GROUP_GET_STATUS), when the node could be opened.
    pub kernel_viable: Option<bool>,
    /// Why the kernel could not be asked, when it could not.
    pub kernel_error: Option<String>,
}

/// One device of a group.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its name in the group: the PCI address (domain:bus:device.function) for PCI devices.
    pub address: String,
    /// PCI vendor id, if it is a PCI device.
    pub vendor: Option<u16>,
    /// PCI device id.
    pub device: Option<u16>,
    /// PCI class code (24 bits: class, subclass, programming interface).
    pub class: Option<u32>,
    /// The driver it is bound to, if any.
    pub driver: Option<String>,
}

impl Device {
    /// A PCI-to-PCI bridge (class 0x0604): the kernel does not count a bridge's driver against viability.
    pub fn is_bridge(&self) -> bool {
        matches!(self.class, Some(c) if c >> 8 == 0x0604)
    }
}

/// The IOMMU page sizes, or why they are unknown.
#[derive(Debug, Serialize, Default)]
pub struct PageSizes {
    /// The iova_pgsizes bitmap.
    pub bitmap: Option<u64>,
    /// The group whose container answered.
    pub from_group: Option<u32>,
    /// Why unknown.
    pub unknown_because: Option<String>,
}

/// Hugepage facts.
#[derive(Debug, Serialize, Default, PartialEq, Eq)]
pub struct Hugepages {
    /// From /proc/meminfo: HugePages_Total.
    pub total: Option<u64>,
    /// HugePages_Free.
    pub free: Option<u64>,
    /// HugePages_Rsvd.
    pub reserved: Option<u64>,
    /// HugePages_Surp.
    pub surplus: Option<u64>,
    /// Hugepagesize in KiB.
    pub default_size_kib: Option<u64>,
    /// Per-size pools from /sys/kernel/mm/hugepages.
    pub pools: Vec<HugepagePool>,
}

/// One pool of `/sys/kernel/mm/hugepages/hugepages-<size>kB`.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct HugepagePool {
    /// Page size in KiB.
    pub size_kib: u64,
    /// nr_hugepages.
    pub nr: Option<u64>,
    /// free_hugepages.
    pub free: Option<u64>,
}

/// RLIMIT_MEMLOCK (bytes; `None` means unlimited).
#[derive(Debug, Serialize, Default)]
pub struct Memlock {
    /// Soft limit.
    pub soft: Option<u64>,
    /// Hard limit.
    pub hard: Option<u64>,
    /// getrlimit failed.
    pub error: Option<String>,
}

/// Runs the checks and prints the report.
pub fn run(args: &CheckHostArgs) -> Result<ExitCode, Error> {
    let report = collect(&HostPaths::default());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    if report.missing.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(Error::Missing(
            report
                .missing
                .iter()
                .map(|m| format!("  - {m}"))
                .collect::<Vec<_>>()
                .join("\n"),
        ))
    }
}

/// Gathers the whole report from the host at `paths`.
pub fn collect(paths: &HostPaths) -> Report {
    let kvm = probe_kvm(&paths.dev.join("kvm"));
    let vfio = probe_vfio(&paths.dev.join("vfio/vfio"));
    let (mut groups, groups_error) = match read_groups(&paths.sys) {
        Ok(g) => (g, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    for g in &mut groups {
        let node = paths.dev.join("vfio").join(g.id.to_string());
        g.dev_node = node.exists();
        if g.dev_node {
            match group_kernel_viable(&node) {
                Ok(v) => g.kernel_viable = Some(v),
                Err(e) => g.kernel_error = Some(e),
            }
        }
    }
    let iommu_page_sizes = probe_page_sizes(paths, &vfio, &groups);
    let hugepages = read_hugepages(paths);
    let memlock = read_memlock();

    let mut missing = Vec::new();
    if !kvm.available {
        missing.push(format!(
            "{}: {} (load kvm_intel or kvm_amd with virtualization enabled, and run as a user that may open it)",
            paths.dev.join("kvm").display(),
            kvm.error.as_deref().unwrap_or("not available")
        ));
    }
    if !vfio.available {
        missing.push(format!(
            "{}: {} (modprobe vfio-pci)",
            paths.dev.join("vfio/vfio").display(),
            vfio.error.as_deref().unwrap_or("not available")
        ));
    }
    if groups.is_empty() {
        missing.push(format!(
            "no IOMMU groups in {}: {} (enable the IOMMU in the firmware and boot with intel_iommu=on or amd_iommu=on)",
            paths.sys.join("kernel/iommu_groups").display(),
            groups_error.as_deref().unwrap_or("the folder is empty")
        ));
    }
    Report {
        kvm,
        vfio,
        groups,
        groups_error,
        iommu_page_sizes,
        hugepages,
        memlock,
        missing,
    }
}

/// The capabilities shown, in this order.
const KVM_CAPS: &[(&str, Cap)] = &[
    ("IRQCHIP", Cap::Irqchip),
    ("SPLIT_IRQCHIP", Cap::SplitIrqchip),
    ("PIT2", Cap::Pit2),
    ("USER_MEMORY", Cap::UserMemory),
    ("SET_TSS_ADDR", Cap::SetTssAddr),
    ("SET_IDENTITY_MAP_ADDR", Cap::SetIdentityMapAddr),
    ("EXT_CPUID", Cap::ExtCpuid),
    ("IRQ_ROUTING", Cap::IrqRouting),
    ("IRQFD", Cap::Irqfd),
    ("IOEVENTFD", Cap::Ioeventfd),
    ("SIGNAL_MSI", Cap::SignalMsi),
    ("MSI_DEVID", Cap::MsiDevid),
    ("IMMEDIATE_EXIT", Cap::ImmediateExit),
    ("TSC_DEADLINE_TIMER", Cap::TscDeadlineTimer),
    ("XSAVE", Cap::Xsave),
    ("NR_VCPUS", Cap::NrVcpus),
    ("MAX_VCPUS", Cap::MaxVcpus),
    ("NR_MEMSLOTS", Cap::NrMemslots),
];

fn probe_kvm(path: &Path) -> KvmReport {
    let cpath = match std::ffi::CString::new(path.as_os_str().as_bytes()) {
        Ok(c) => c,
        Err(e) => {
            return KvmReport {
                error: Some(format!("bad path {}: {e}", path.display())),
                ..Default::default()
            }
        }
    };
    match Kvm::new_with_path(cpath) {
        Ok(kvm) => KvmReport {
            available: true,
            error: None,
            api_version: Some(kvm.get_api_version()),
            capabilities: KVM_CAPS
                .iter()
                .map(|(name, cap)| Capability {
                    name: (*name).to_string(),
                    value: kvm.check_extension_int(*cap),
                })
                .collect(),
        },
        Err(e) => KvmReport {
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}

fn probe_vfio(path: &Path) -> VfioReport {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            return VfioReport {
                error: Some(e.to_string()),
                ..Default::default()
            }
        }
    };
    // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns a number; `file` is open.
    let api = unsafe { ioctl(&file, VFIO_GET_API_VERSION()) };
    let ext = |which: u32| {
        // SAFETY: VFIO_CHECK_EXTENSION takes an integer by value and returns a number.
        unsafe { ioctl_with_val(&file, VFIO_CHECK_EXTENSION(), which.into()) > 0 }
    };
    VfioReport {
        available: true,
        error: (api != VFIO_API_VERSION as i32).then(|| {
            format!("unexpected VFIO API version {api} (this VMM knows {VFIO_API_VERSION})")
        }),
        api_version: Some(api),
        type1v2: ext(VFIO_TYPE1v2_IOMMU),
        type1: ext(VFIO_TYPE1_IOMMU),
    }
}

/// Reads a sysfs attribute such as `0x8086` or `0x020000` as hex.
pub fn parse_hex(text: &str) -> Option<u32> {
    let t = text.trim();
    u32::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

/// Lists the IOMMU groups under `<sys>/kernel/iommu_groups`, with their devices read through
/// `<group>/devices/<name>` (symlinks to the device folders).
pub fn read_groups(sys: &Path) -> Result<Vec<Group>, String> {
    let root = sys.join("kernel/iommu_groups");
    let entries =
        fs::read_dir(&root).map_err(|e| format!("cannot read {}: {e}", root.display()))?;
    let mut groups = Vec::new();
    for entry in entries.flatten() {
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let mut devices = Vec::new();
        if let Ok(devs) = fs::read_dir(entry.path().join("devices")) {
            for d in devs.flatten() {
                devices.push(read_device(&d.path(), &d.file_name().to_string_lossy()));
            }
        }
        devices.sort_by(|a, b| a.address.cmp(&b.address));
        let (viable, why) = group_viability(&devices);
        groups.push(Group {
            id,
            devices,
            viable,
            not_viable_because: why,
            dev_node: false,
            kernel_viable: None,
            kernel_error: None,
        });
    }
    groups.sort_by_key(|g| g.id);
    Ok(groups)
}

fn read_attr(dir: &Path, name: &str) -> Option<String> {
    fs::read_to_string(dir.join(name)).ok()
}

fn read_device(dir: &Path, name: &str) -> Device {
    let hex16 = |attr: &str| {
        read_attr(dir, attr)
            .and_then(|t| parse_hex(&t))
            .and_then(|v| u16::try_from(v).ok())
    };
    Device {
        address: name.to_string(),
        vendor: hex16("vendor"),
        device: hex16("device"),
        class: read_attr(dir, "class").and_then(|t| parse_hex(&t)),
        driver: fs::read_link(dir.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
    }
}

/// Drivers that leave the device's DMA to its user (the kernel's `driver_managed_dma`): a device bound to
/// one of them does not stop its group from being used by VFIO.
pub fn driver_allows_vfio(driver: &str) -> bool {
    matches!(driver, "pci-stub" | "pcieport")
        || driver.starts_with("vfio")
        || driver.ends_with("vfio-pci")
        || driver.ends_with("vfio_pci")
}

/// Whether a group can be handed to VFIO: every device is unbound, bound to vfio-pci or another driver
/// that leaves DMA to its user ([`driver_allows_vfio`]), or is a bridge. Returns the reason when not.
pub fn group_viability(devices: &[Device]) -> (bool, Option<String>) {
    let blockers: Vec<String> = devices
        .iter()
        .filter(|d| !d.is_bridge())
        .filter_map(|d| {
            d.driver
                .as_deref()
                .filter(|drv| !driver_allows_vfio(drv))
                .map(|drv| format!("{} is bound to {drv}", d.address))
        })
        .collect();
    if devices.is_empty() {
        (false, Some("the group has no devices".to_string()))
    } else if blockers.is_empty() {
        (true, None)
    } else {
        (
            false,
            Some(format!(
                "{} (unbind it or bind it to vfio-pci)",
                blockers.join(", ")
            )),
        )
    }
}

fn open_rw(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn group_status(group: &File) -> Result<bool, String> {
    let mut status = vfio_group_status {
        argsz: std::mem::size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: the kernel writes at most argsz bytes into `status`, which lives for the call.
    let r = unsafe { ioctl_with_mut_ref(group, VFIO_GROUP_GET_STATUS(), &mut status) };
    if r < 0 {
        return Err(format!(
            "VFIO_GROUP_GET_STATUS: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(status.flags & VFIO_GROUP_FLAGS_VIABLE != 0)
}

fn group_kernel_viable(node: &Path) -> Result<bool, String> {
    let group = open_rw(node).map_err(|e| {
        if e.contains("Device or resource busy") {
            format!("{e} (another process holds the group)")
        } else {
            e
        }
    })?;
    group_status(&group)
}

/// Puts the group at `node` into a fresh type1 container and asks for the IOMMU page sizes.
fn container_page_sizes(vfio: &Path, node: &Path) -> Result<u64, String> {
    let container = open_rw(vfio)?;
    let group = open_rw(node)?;
    if !group_status(&group)? {
        return Err(format!("{} is not viable", node.display()));
    }
    let fd = container.as_raw_fd();
    // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd) that lives for the call.
    if unsafe { ioctl_with_ref(&group, VFIO_GROUP_SET_CONTAINER(), &fd) } < 0 {
        return Err(format!(
            "VFIO_GROUP_SET_CONTAINER: {}",
            std::io::Error::last_os_error()
        ));
    }
    let result = (|| {
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        let mut r =
            unsafe { ioctl_with_val(&container, VFIO_SET_IOMMU(), VFIO_TYPE1v2_IOMMU.into()) };
        if r < 0 {
            // SAFETY: as above, with the older type1 backend.
            r = unsafe { ioctl_with_val(&container, VFIO_SET_IOMMU(), VFIO_TYPE1_IOMMU.into()) };
        }
        if r < 0 {
            return Err(format!(
                "VFIO_SET_IOMMU (type1): {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut info = vfio_iommu_type1_info {
            argsz: std::mem::size_of::<vfio_iommu_type1_info>() as u32,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most argsz bytes into `info`, which lives for the call.
        if unsafe { ioctl_with_mut_ref(&container, VFIO_IOMMU_GET_INFO(), &mut info) } < 0 {
            return Err(format!(
                "VFIO_IOMMU_GET_INFO: {}",
                std::io::Error::last_os_error()
            ));
        }
        if info.flags & VFIO_IOMMU_INFO_PGSIZES == 0 {
            return Err("VFIO_IOMMU_GET_INFO did not report page sizes".to_string());
        }
        Ok(info.iova_pgsizes)
    })();
    // SAFETY: VFIO_GROUP_UNSET_CONTAINER takes no argument; closing the fds would do the same.
    unsafe { ioctl(&group, VFIO_GROUP_UNSET_CONTAINER()) };
    result
}

fn probe_page_sizes(paths: &HostPaths, vfio: &VfioReport, groups: &[Group]) -> PageSizes {
    let unknown = |why: String| PageSizes {
        unknown_because: Some(why),
        ..Default::default()
    };
    if !vfio.available {
        return unknown("no VFIO container device".to_string());
    }
    let candidates: Vec<&Group> = groups
        .iter()
        .filter(|g| g.dev_node && g.kernel_viable.unwrap_or(g.viable))
        .collect();
    if candidates.is_empty() {
        return unknown(
            "no viable VFIO group to ask (bind a device to vfio-pci, all of its group, then run check-host again)"
                .to_string(),
        );
    }
    let mut errors = Vec::new();
    for g in candidates {
        let node = paths.dev.join("vfio").join(g.id.to_string());
        match container_page_sizes(&paths.dev.join("vfio/vfio"), &node) {
            Ok(bitmap) => {
                return PageSizes {
                    bitmap: Some(bitmap),
                    from_group: Some(g.id),
                    unknown_because: None,
                }
            }
            Err(e) => errors.push(format!("group {}: {e}", g.id)),
        }
    }
    unknown(errors.join("; "))
}

/// The page sizes of an iova_pgsizes bitmap, smallest first, in bytes. A bit set is a size the IOMMU maps.
pub fn page_sizes(bitmap: u64) -> Vec<u64> {
    (0..64)
        .filter(|b| bitmap & (1u64 << b) != 0)
        .map(|b| 1u64 << b)
        .collect()
}

/// "4 KiB", "2 MiB", "1 GiB", ...
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024 && v.is_multiple_of(1024) && u < UNITS.len() - 1 {
        v /= 1024;
        u += 1;
    }
    format!("{v} {}", UNITS[u])
}

/// Parses the HugePages_* and Hugepagesize lines of /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Hugepages {
    let mut h = Hugepages::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(val)) = (it.next(), it.next()) else {
            continue;
        };
        let val = val.parse::<u64>().ok();
        match key {
            "HugePages_Total:" => h.total = val,
            "HugePages_Free:" => h.free = val,
            "HugePages_Rsvd:" => h.reserved = val,
            "HugePages_Surp:" => h.surplus = val,
            "Hugepagesize:" => h.default_size_kib = val,
            _ => {}
        }
    }
    h
}

/// Reads the pools of `<sys>/kernel/mm/hugepages/hugepages-<N>kB/`, sorted by size.
pub fn read_hugepage_pools(sys: &Path) -> Vec<HugepagePool> {
    let num = |p: PathBuf| {
        fs::read_to_string(p)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let mut pools: Vec<HugepagePool> = fs::read_dir(sys.join("kernel/mm/hugepages"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let size_kib = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            Some(HugepagePool {
                size_kib,
                nr: num(e.path().join("nr_hugepages")),
                free: num(e.path().join("free_hugepages")),
            })
        })
        .collect();
    pools.sort_by_key(|p| p.size_kib);
    pools
}

fn read_hugepages(paths: &HostPaths) -> Hugepages {
    let mut h = fs::read_to_string(paths.proc.join("meminfo"))
        .map(|t| parse_meminfo(&t))
        .unwrap_or_default();
    h.pools = read_hugepage_pools(&paths.sys);
    h
}

fn read_memlock() -> Memlock {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Memlock {
            error: Some(std::io::Error::last_os_error().to_string()),
            ..Default::default()
        };
    }
    let conv = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    Memlock {
        soft: conv(lim.rlim_cur),
        hard: conv(lim.rlim_max),
        error: None,
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "?".to_string(), |v| v.to_string())
}

fn limit(v: Option<u64>) -> String {
    v.map_or_else(|| "unlimited".to_string(), human_size)
}

/// The plain-text report. Lines are stable enough to grep: `kvm: ...`, `group N: viable|NOT viable`,
/// `  device BDF VVVV:DDDD class CCCCCC driver D`, `iommu page sizes: ...`, `hugepages: ...`, `memlock: ...`.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    // Writing into a String cannot fail; the results are ignored on purpose.
    match (&r.kvm.api_version, &r.kvm.error) {
        (Some(v), _) => {
            let _ = writeln!(s, "kvm: /dev/kvm API version {v}");
            let caps: Vec<String> = r
                .kvm
                .capabilities
                .iter()
                .map(|c| format!("{}={}", c.name, c.value))
                .collect();
            let _ = writeln!(s, "kvm capabilities: {}", caps.join(" "));
        }
        (None, e) => {
            let _ = writeln!(
                s,
                "kvm: NOT available: {}",
                e.as_deref().unwrap_or("unknown error")
            );
        }
    }
    if r.vfio.available {
        let _ = writeln!(
            s,
            "vfio: /dev/vfio/vfio API version {}, type1v2 {}, type1 {}{}",
            opt(r.vfio.api_version),
            if r.vfio.type1v2 { "yes" } else { "no" },
            if r.vfio.type1 { "yes" } else { "no" },
            r.vfio
                .error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    } else {
        let _ = writeln!(
            s,
            "vfio: NOT available: {}",
            r.vfio.error.as_deref().unwrap_or("unknown error")
        );
    }
    if let Some(e) = &r.groups_error {
        let _ = writeln!(s, "iommu groups: none ({e})");
    } else {
        let _ = writeln!(s, "iommu groups: {}", r.groups.len());
    }
    for g in &r.groups {
        let kernel = match (g.kernel_viable, &g.kernel_error) {
            (Some(true), _) => ", kernel: viable".to_string(),
            (Some(false), _) => ", kernel: NOT viable".to_string(),
            (None, Some(e)) => format!(", kernel: unknown ({e})"),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            s,
            "group {}: {}{}{}{}",
            g.id,
            if g.viable { "viable" } else { "NOT viable" },
            g.not_viable_because
                .as_ref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default(),
            if g.dev_node {
                format!(", /dev/vfio/{}", g.id)
            } else {
                String::new()
            },
            kernel
        );
        for d in &g.devices {
            let id = match (d.vendor, d.device) {
                (Some(v), Some(dv)) => format!("{v:04x}:{dv:04x}"),
                _ => "?:?".to_string(),
            };
            let class = d
                .class
                .map_or_else(|| "?".to_string(), |c| format!("{c:06x}"));
            let _ = writeln!(
                s,
                "  device {} {id} class {class}{} driver {}",
                d.address,
                if d.is_bridge() { " (bridge)" } else { "" },
                d.driver.as_deref().unwrap_or("none")
            );
        }
    }
    match (
        r.iommu_page_sizes.bitmap,
        &r.iommu_page_sizes.unknown_because,
    ) {
        (Some(b), _) => {
            let sizes: Vec<String> = page_sizes(b).into_iter().map(human_size).collect();
            let _ = writeln!(
                s,
                "iommu page sizes: {} (bitmap {b:#x}, from group {})",
                sizes.join(", "),
                opt(r.iommu_page_sizes.from_group)
            );
        }
        (None, why) => {
            let _ = writeln!(
                s,
                "iommu page sizes: unknown ({})",
                why.as_deref().unwrap_or("no reason")
            );
        }
    }
    let h = &r.hugepages;
    let _ = writeln!(
        s,
        "hugepages: total {} free {} reserved {} surplus {} of {} KiB (default size)",
        opt(h.total),
        opt(h.free),
        opt(h.reserved),
        opt(h.surplus),
        opt(h.default_size_kib)
    );
    for p in &h.pools {
        let _ = writeln!(
            s,
            "hugepage pool {}: nr {} free {}",
            human_size(p.size_kib.saturating_mul(1024)),
            opt(p.nr),
            opt(p.free)
        );
    }
    match &r.memlock.error {
        Some(e) => {
            let _ = writeln!(s, "memlock: unknown ({e})");
        }
        None => {
            let _ = writeln!(
                s,
                "memlock: soft {} hard {}",
                limit(r.memlock.soft),
                limit(r.memlock.hard)
            );
        }
    }
    if r.missing.is_empty() {
        let _ = writeln!(s, "ready for passthrough: yes");
    } else {
        let _ = writeln!(s, "ready for passthrough: NO");
        for m in &r.missing {
            let _ = writeln!(s, "missing: {m}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A sample file-system tree in a temp folder, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Tree {
            let p = std::env::temp_dir()
                .join(format!("iovmm-check-host-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Tree(p)
        }
        fn write(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        fn link(&self, rel: &str, target: &str) {
            let p = self.0.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            symlink(target, p).unwrap();
        }
        /// A PCI device in sys/devices/pci0000:00/<bdf>, listed in group `group`, bound to `driver`.
        fn pci(
            &self,
            bdf: &str,
            vendor: &str,
            device: &str,
            class: &str,
            group: u32,
            driver: Option<&str>,
        ) {
            let dev = format!("sys/devices/pci0000:00/{bdf}");
            self.write(&format!("{dev}/vendor"), &format!("{vendor}\n"));
            self.write(&format!("{dev}/device"), &format!("{device}\n"));
            self.write(&format!("{dev}/class"), &format!("{class}\n"));
            if let Some(d) = driver {
                fs::create_dir_all(self.0.join(format!("sys/bus/pci/drivers/{d}"))).unwrap();
                self.link(
                    &format!("{dev}/driver"),
                    &format!("../../../bus/pci/drivers/{d}"),
                );
            }
            self.link(
                &format!("sys/kernel/iommu_groups/{group}/devices/{bdf}"),
                &format!("../../../../devices/pci0000:00/{bdf}"),
            );
        }
        fn paths(&self) -> HostPaths {
            HostPaths {
                sys: self.0.join("sys"),
                proc: self.0.join("proc"),
                dev: self.0.join("dev"),
            }
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn groups_devices_and_drivers_are_read_from_sysfs() {
        let t = Tree::new("groups");
        t.pci(
            "0000:00:02.0",
            "0x8086",
            "0x10c9",
            "0x020000",
            3,
            Some("vfio-pci"),
        );
        t.pci(
            "0000:00:01.0",
            "0x1234",
            "0x1111",
            "0x030000",
            1,
            Some("bochs-drm"),
        );
        t.pci("0000:00:1f.0", "0x8086", "0x2918", "0x060100", 12, None);
        t.write("sys/kernel/iommu_groups/not-a-group/x", "");
        let groups = read_groups(&t.paths().sys).unwrap();
        assert_eq!(
            groups.iter().map(|g| g.id).collect::<Vec<_>>(),
            vec![1, 3, 12]
        );
        let igb = &groups[1];
        assert_eq!(
            igb.devices,
            vec![Device {
                address: "0000:00:02.0".into(),
                vendor: Some(0x8086),
                device: Some(0x10c9),
                class: Some(0x020000),
                driver: Some("vfio-pci".into()),
            }]
        );
        assert!(igb.viable);
        assert!(!groups[0].viable);
        assert_eq!(
            groups[0].not_viable_because.as_deref(),
            Some("0000:00:01.0 is bound to bochs-drm (unbind it or bind it to vfio-pci)")
        );
        assert!(
            groups[2].viable,
            "a device with no driver does not block its group"
        );
    }

    #[test]
    fn one_kernel_driver_in_a_group_makes_it_not_viable_but_bridges_do_not() {
        let t = Tree::new("viability");
        t.pci(
            "0000:01:00.0",
            "0x8086",
            "0x10c9",
            "0x020000",
            7,
            Some("vfio-pci"),
        );
        t.pci(
            "0000:01:00.1",
            "0x8086",
            "0x10c9",
            "0x020000",
            7,
            Some("igb"),
        );
        t.pci(
            "0000:00:1c.0",
            "0x8086",
            "0x2948",
            "0x060400",
            8,
            Some("shpchp"),
        );
        t.pci(
            "0000:02:00.0",
            "0x8086",
            "0x10c9",
            "0x020000",
            8,
            Some("pci-stub"),
        );
        t.pci(
            "0000:03:00.0",
            "0x8086",
            "0x10c9",
            "0x020000",
            9,
            Some("mlx5_vfio_pci"),
        );
        let groups = read_groups(&t.paths().sys).unwrap();
        assert!(!groups[0].viable);
        assert!(groups[0]
            .not_viable_because
            .as_deref()
            .unwrap()
            .contains("0000:01:00.1 is bound to igb"));
        assert!(
            groups[1].viable,
            "bridge drivers and pci-stub leave the group viable"
        );
        assert!(
            groups[2].viable,
            "vfio-pci variant drivers count as vfio-pci"
        );
    }

    #[test]
    fn missing_or_garbled_attributes_do_not_panic() {
        let t = Tree::new("garbled");
        t.write("sys/devices/platform/foo/modalias", "x");
        t.link(
            "sys/kernel/iommu_groups/4/devices/foo",
            "../../../../devices/platform/foo",
        );
        t.pci("0000:00:03.0", "banana", "0x10c9", "", 5, None);
        t.write("sys/kernel/iommu_groups/6/reserved_regions", "");
        let groups = read_groups(&t.paths().sys).unwrap();
        assert_eq!(groups[0].devices[0].vendor, None);
        assert_eq!(groups[0].devices[0].class, None);
        assert_eq!(groups[1].devices[0].vendor, None);
        assert_eq!(groups[1].devices[0].device, Some(0x10c9));
        assert!(!groups[2].viable, "a group with no devices is not usable");
        assert!(read_groups(&t.0.join("nowhere")).is_err());
    }

    #[test]
    fn meminfo_hugepage_lines_are_parsed() {
        let text = "MemTotal:        3000000 kB\nHugePages_Total:      64\nHugePages_Free:       60\n\
                    HugePages_Rsvd:        2\nHugePages_Surp:        0\nHugepagesize:       2048 kB\nHugetlb: 131072 kB\n";
        let h = parse_meminfo(text);
        assert_eq!(
            (h.total, h.free, h.reserved, h.surplus, h.default_size_kib),
            (Some(64), Some(60), Some(2), Some(0), Some(2048))
        );
        assert_eq!(
            parse_meminfo("garbage\nHugePages_Total: x\n"),
            Hugepages::default()
        );
    }

    #[test]
    fn hugepage_pools_are_read_per_size() {
        let t = Tree::new("pools");
        t.write(
            "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
            "64\n",
        );
        t.write(
            "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
            "60\n",
        );
        t.write(
            "sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
            "0\n",
        );
        t.write("sys/kernel/mm/hugepages/weird/nr_hugepages", "1\n");
        t.write(
            "sys/kernel/mm/hugepages/hugepages-18446744073709551615kB/nr_hugepages",
            "x\n",
        );
        let pools = read_hugepage_pools(&t.paths().sys);
        assert_eq!(
            pools,
            vec![
                HugepagePool {
                    size_kib: 2048,
                    nr: Some(64),
                    free: Some(60)
                },
                HugepagePool {
                    size_kib: 1048576,
                    nr: Some(0),
                    free: None
                },
                HugepagePool {
                    size_kib: u64::MAX,
                    nr: None,
                    free: None
                },
            ]
        );
        // An absurd pool size must not overflow while the report is written.
        let report = Report {
            hugepages: Hugepages {
                pools,
                ..Default::default()
            },
            ..collect(&t.paths())
        };
        assert!(render(&report).contains("hugepage pool "));
    }

    #[test]
    fn page_size_bitmaps_and_sizes_read_as_people_say_them() {
        assert_eq!(page_sizes(0x4020_1000), vec![4096, 2 << 20, 1 << 30]);
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(2 << 20), "2 MiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1536), "1536 B");
        assert_eq!(parse_hex("0x020000\n"), Some(0x020000));
        assert_eq!(parse_hex("10c9"), Some(0x10c9));
        assert_eq!(parse_hex("zz"), None);
    }

    #[test]
    fn an_empty_host_reports_what_is_missing() {
        let t = Tree::new("empty");
        let r = collect(&t.paths());
        assert!(!r.kvm.available);
        assert!(!r.vfio.available);
        assert_eq!(r.missing.len(), 3, "{:?}", r.missing);
        assert!(r.missing[0].contains("kvm"));
        assert!(r.missing[1].contains("vfio/vfio"));
        assert!(r.missing[2].contains("no IOMMU groups"));
        assert!(r.iommu_page_sizes.unknown_because.is_some());
        let text = render(&r);
        assert!(text.contains("ready for passthrough: NO"));
        assert!(text.contains("iommu page sizes: unknown (no VFIO container device)"));
        assert!(serde_json::to_string(&r).is_ok());
    }

    #[test]
    fn groups_without_a_vfio_node_give_a_reason_for_unknown_page_sizes() {
        let t = Tree::new("nonode");
        t.pci(
            "0000:00:02.0",
            "0x8086",
            "0x10c9",
            "0x020000",
            3,
            Some("igb"),
        );
        let r = collect(&t.paths());
        assert_eq!(
            r.missing.len(),
            2,
            "groups exist, kvm and vfio do not: {:?}",
            r.missing
        );
        let text = render(&r);
        assert!(
            text.contains("group 3: NOT viable (0000:00:02.0 is bound to igb"),
            "{text}"
        );
        assert!(
            text.contains("  device 0000:00:02.0 8086:10c9 class 020000 driver igb"),
            "{text}"
        );
    }
}
