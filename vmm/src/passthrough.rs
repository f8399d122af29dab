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

/// Drivers that do not make an IOMMU group unviable (the kernel's own allow-list plus vfio-pci).
const VIABLE_DRIVERS: &[&str] = &[VFIO_PCI_DRIVER, "pci-stub"];

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
    /// /dev/vfio/<group> is missing.
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

/// Checks one device: exists, is PCI, bound to vfio-pci, its group viable, /dev/vfio/<group> present.
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
                if !VIABLE_DRIVERS.contains(&d.as_str()) {
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
