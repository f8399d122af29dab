//! The `vfio` driver of the component: the host kernel's IOMMU through VFIO's legacy type1 container.
//!
//! # Shape
//! - One instance ([`VfioIommu`]) per VMM. A device is named by its sysfs path
//!   (`/sys/bus/pci/devices/<BDF>`, or just the BDF) in its [`DeviceDesc`]; its group is its host IOMMU
//!   group (`/dev/vfio/<N>`).
//! - **Each group gets a type1 container of its own.** A paging domain is a set of mappings (IOVA ->
//!   host virtual address) that is replayed into the container of every group attached to it; so one
//!   guest-RAM domain attached to two groups pins guest RAM twice (type1 accounts pinned pages per
//!   container: RLIMIT_MEMLOCK must cover RAM x groups).
//! - **The blocked domain is an empty container with the device fd still open.** Attaching it opens
//!   the device if it is not open yet (container + group + device fd: the claim from the host) and
//!   removes every mapping from the group's container. This is also the release domain, so parking a
//!   group empties its container; nothing here ever calls VFIO_GROUP_UNSET_CONTAINER while a device fd
//!   is open (the kernel refuses it with EBUSY, and leaving the container would put the group back in
//!   its host default domain, which is identity on `iommu=pt` hosts: it would reach all host memory).
//! - **No default domain** ([`IommuOps::uses_platform_dma`]): before the VMM opens it, the group sits
//!   in the host kernel's own domain. Giving it back (`set_platform_dma`) and `release_device` close the
//!   device fd first; only then does the group leave its container (vfio-ioctls does that on drop).
//!
//! # Map calls
//! The paging domain announces 4 KiB pages only, so the core hands it each contiguous range in one
//! `map_pages` call, which is one `VFIO_IOMMU_MAP_DMA` per attached container: one call per contiguous
//! guest-RAM region. The host kernel picks the IOMMU page size itself: 2 MiB / 1 GiB entries when the
//! pinned pages are physically contiguous (hugepage-backed guest RAM). [`VfioIommu::stats`] counts the
//! calls and bytes.
//!
//! # Output addresses
//! For this driver the "physical" address of a mapping is the host *virtual* address of the memory
//! (what VFIO_IOMMU_MAP_DMA takes); [`PagingDomainOps::iova_to_phys`] answers in those terms.
//!
//! # Safety contract
//! Mapping host memory into a device's reach is `unsafe` in vfio-ioctls: the memory must stay mapped
//! in this process for as long as the mapping exists, and no Rust reference may alias it while a
//! device can write it. The caller of [`IommuCore::map`](crate::core::IommuCore::map) on a domain of
//! this driver upholds that (the VMM maps guest RAM, which lives until the VM ends and is only
//! accessed through volatile guest-memory accessors).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, vfio_iommu_type1_info, VFIO_BASE,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_PGSIZES, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::ioctl_io_nr;

use crate::core::{
    DeviceDesc, DeviceId, DomainOps, DriverError, IommuOps, IotlbGather, PagingDomainOps,
    ProbeInfo, Prot, StaticDomain,
};

ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);

/// The page size this driver announces (see the module docs: one map call per contiguous range).
const PAGE: u64 = 4096;
/// IOVA bits: type1 on x86 VT-d/AMD-Vi translates at least 48 bits.
const IAS_BITS: u32 = 48;

/// Errors of the vfio driver (wrapped in [`DriverError`] towards the core).
#[derive(Debug, thiserror::Error)]
pub enum VfioDriverError {
    /// The device's sysfs entry has no IOMMU group.
    #[error("{path}: no iommu_group link: is the host IOMMU on (intel_iommu=on) and the device bound to vfio-pci?")]
    NoGroup {
        /// The sysfs path.
        path: String,
    },
    /// Opening the container, group or device failed.
    #[error("{path}: cannot open through VFIO (group {group}): {source}. Check that it is bound to vfio-pci, that every device of its group is, and that /dev/vfio/{group} is accessible")]
    Open {
        /// The sysfs path.
        path: String,
        /// The group.
        group: u32,
        /// vfio-ioctls' error.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// VFIO_IOMMU_MAP_DMA failed.
    #[error("VFIO_IOMMU_MAP_DMA of {size:#x} bytes at IOVA {iova:#x} for group {group} failed: {source}{hint}")]
    Map {
        /// Group.
        group: u32,
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// errno.
        #[source]
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// VFIO_IOMMU_UNMAP_DMA failed or unmapped less than asked.
    #[error("VFIO_IOMMU_UNMAP_DMA of {size:#x} bytes at IOVA {iova:#x} for group {group} failed: {reason}")]
    Unmap {
        /// Group.
        group: u32,
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: String,
    },
}

/// Counters of the driver's DMA map work (all containers together).
#[derive(Debug, Default)]
pub struct VfioStats {
    /// VFIO_IOMMU_MAP_DMA calls that succeeded.
    pub map_calls: AtomicU64,
    /// Bytes they mapped.
    pub map_bytes: AtomicU64,
    /// VFIO_IOMMU_UNMAP_DMA calls that succeeded.
    pub unmap_calls: AtomicU64,
    /// Bytes they unmapped.
    pub unmap_bytes: AtomicU64,
}

/// A snapshot of [`VfioStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioStatsSnapshot {
    /// VFIO_IOMMU_MAP_DMA calls.
    pub map_calls: u64,
    /// Bytes mapped.
    pub map_bytes: u64,
    /// VFIO_IOMMU_UNMAP_DMA calls.
    pub unmap_calls: u64,
    /// Bytes unmapped.
    pub unmap_bytes: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One group's container.
struct GroupState {
    container: Arc<VfioContainer>,
    /// The paging domain whose mappings the container holds (None: empty, i.e. blocked).
    domain: Option<Arc<PagingInner>>,
    /// Host IOMMU page sizes the container reports.
    pgsizes: u64,
}

struct DevState {
    sysfs: PathBuf,
    group: u32,
    device: Option<Arc<VfioDevice>>,
}

struct Shared {
    devices: Mutex<HashMap<DeviceId, DevState>>,
    groups: Mutex<HashMap<u32, GroupState>>,
    stats: VfioStats,
}

/// The `vfio` IOMMU instance (type1). See the module documentation.
pub struct VfioIommu {
    shared: Arc<Shared>,
    blocked: Arc<VfioBlocked>,
}

impl Default for VfioIommu {
    fn default() -> Self {
        Self::new()
    }
}

impl VfioIommu {
    /// A new instance; register it with [`IommuCore::register`](crate::core::IommuCore::register).
    pub fn new() -> Self {
        let shared = Arc::new(Shared {
            devices: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            stats: VfioStats::default(),
        });
        VfioIommu {
            blocked: Arc::new(VfioBlocked {
                shared: shared.clone(),
            }),
            shared,
        }
    }

    /// The opened VFIO device of `dev` (after its group was claimed: the blocked attach opens it).
    pub fn device(&self, dev: DeviceId) -> Option<Arc<VfioDevice>> {
        lock(&self.shared.devices)
            .get(&dev)
            .and_then(|d| d.device.clone())
    }

    /// The host IOMMU group of `dev`.
    pub fn host_group(&self, dev: DeviceId) -> Option<u32> {
        lock(&self.shared.devices).get(&dev).map(|d| d.group)
    }

    /// The host IOMMU page sizes (bitmap) of `dev`'s container, once open.
    pub fn host_page_sizes(&self, dev: DeviceId) -> Option<u64> {
        let g = self.host_group(dev)?;
        lock(&self.shared.groups).get(&g).map(|s| s.pgsizes)
    }

    /// Number of containers open (one per claimed group).
    pub fn open_containers(&self) -> usize {
        lock(&self.shared.groups).len()
    }

    /// Map/unmap counters.
    pub fn stats(&self) -> VfioStatsSnapshot {
        let s = &self.shared.stats;
        VfioStatsSnapshot {
            map_calls: s.map_calls.load(Ordering::Relaxed),
            map_bytes: s.map_bytes.load(Ordering::Relaxed),
            unmap_calls: s.unmap_calls.load(Ordering::Relaxed),
            unmap_bytes: s.unmap_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The sysfs path a device name stands for.
fn sysfs_path(name: &str) -> PathBuf {
    if name.starts_with('/') {
        PathBuf::from(name)
    } else {
        Path::new("/sys/bus/pci/devices").join(name)
    }
}

fn host_group_of(path: &Path) -> Result<u32, VfioDriverError> {
    std::fs::read_link(path.join("iommu_group"))
        .ok()
        .and_then(|l| l.file_name()?.to_str()?.parse().ok())
        .ok_or_else(|| VfioDriverError::NoGroup {
            path: path.display().to_string(),
        })
}

fn container_pgsizes(c: &VfioContainer) -> u64 {
    let mut info = vfio_iommu_type1_info {
        argsz: std::mem::size_of::<vfio_iommu_type1_info>() as u32,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most argsz bytes into `info`, which lives for the call.
    let r = unsafe { ioctl_with_mut_ref(c, VFIO_IOMMU_GET_INFO(), &mut info) };
    if r < 0 || info.flags & VFIO_IOMMU_INFO_PGSIZES == 0 {
        0
    } else {
        info.iova_pgsizes
    }
}

fn dma_map(
    shared: &Shared,
    group: u32,
    c: &VfioContainer,
    iova: u64,
    size: u64,
    vaddr: u64,
    prot: Prot,
) -> Result<(), VfioDriverError> {
    let mut flags = 0;
    if prot.read {
        flags |= VFIO_DMA_MAP_FLAG_READ;
    }
    if prot.write {
        flags |= VFIO_DMA_MAP_FLAG_WRITE;
    }
    let m = vfio_iommu_type1_dma_map {
        argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
        flags,
        vaddr,
        iova,
        size,
    };
    // SAFETY: the ioctl reads `m`, which lives for the call. That the host range stays valid while it
    // is mapped is the contract of the map caller (module docs).
    let r = unsafe { ioctl_with_ref(c, VFIO_IOMMU_MAP_DMA(), &m) };
    if r < 0 {
        let source = std::io::Error::last_os_error();
        let hint = match source.raw_os_error() {
            Some(libc::ENOMEM) => ": the memlock limit is probably too low (pinned pages are counted per container): raise it with `ulimit -l` or prlimit",
            Some(libc::ENOSPC) => ": the container has no mapping slots left (type1's dma_entry_limit, 65535 by default): map larger ranges",
            Some(libc::EEXIST) => ": the range overlaps an existing mapping",
            _ => "",
        };
        return Err(VfioDriverError::Map {
            group,
            iova,
            size,
            source,
            hint,
        });
    }
    shared.stats.map_calls.fetch_add(1, Ordering::Relaxed);
    shared.stats.map_bytes.fetch_add(size, Ordering::Relaxed);
    log::debug!("vfio: group {group}: MAP_DMA iova {iova:#x} size {size:#x} vaddr {vaddr:#x}");
    Ok(())
}

fn dma_unmap(
    shared: &Shared,
    group: u32,
    c: &VfioContainer,
    iova: u64,
    size: u64,
) -> Result<(), VfioDriverError> {
    let mut u = vfio_iommu_type1_dma_unmap {
        argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
        flags: 0,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: the kernel reads and updates `u` (the size unmapped), which lives for the call.
    let r = unsafe { ioctl_with_mut_ref(c, VFIO_IOMMU_UNMAP_DMA(), &mut u) };
    if r < 0 {
        return Err(VfioDriverError::Unmap {
            group,
            iova,
            size,
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
    if u.size != size {
        return Err(VfioDriverError::Unmap {
            group,
            iova,
            size,
            reason: format!("the kernel unmapped {:#x} bytes", u.size),
        });
    }
    shared.stats.unmap_calls.fetch_add(1, Ordering::Relaxed);
    shared.stats.unmap_bytes.fetch_add(size, Ordering::Relaxed);
    log::debug!("vfio: group {group}: UNMAP_DMA iova {iova:#x} size {size:#x}");
    Ok(())
}

impl Shared {
    /// Opens `dev` (its group's container first, if the group has none yet). The container is empty
    /// when it is created, so an opened device reaches nothing until a paging domain is attached.
    fn open(&self, dev: DeviceId) -> Result<u32, DriverError> {
        let (sysfs, group, open) = {
            let devs = lock(&self.devices);
            let d = devs.get(&dev).ok_or_else(|| {
                DriverError::Invalid(format!("vfio: {dev} was not probed by this instance"))
            })?;
            (d.sysfs.clone(), d.group, d.device.is_some())
        };
        if open {
            return Ok(group);
        }
        let container = {
            let mut groups = lock(&self.groups);
            match groups.get(&group) {
                Some(g) => g.container.clone(),
                None => {
                    let c = VfioContainer::new(None).map_err(|source| {
                        DriverError::failed(VfioDriverError::Open {
                            path: sysfs.display().to_string(),
                            group,
                            source,
                        })
                    })?;
                    let c = Arc::new(c);
                    groups.insert(
                        group,
                        GroupState {
                            container: c.clone(),
                            domain: None,
                            pgsizes: 0,
                        },
                    );
                    c
                }
            }
        };
        let device = match VfioDevice::new(&sysfs, container.clone(), false) {
            Ok(d) => Arc::new(d),
            Err(source) => {
                // Nothing of this group is open: forget the container again.
                let others = lock(&self.devices)
                    .values()
                    .any(|d| d.group == group && d.device.is_some());
                if !others {
                    lock(&self.groups).remove(&group);
                }
                return Err(DriverError::failed(VfioDriverError::Open {
                    path: sysfs.display().to_string(),
                    group,
                    source,
                }));
            }
        };
        let pgsizes = container_pgsizes(&container);
        if let Some(g) = lock(&self.groups).get_mut(&group) {
            g.pgsizes = pgsizes;
        }
        log::info!(
            "vfio: opened {} (group {group}) in a container of its own; host IOMMU page sizes {pgsizes:#x}",
            sysfs.display()
        );
        if let Some(d) = lock(&self.devices).get_mut(&dev) {
            d.device = Some(device);
        }
        Ok(group)
    }

    /// Empties `group`'s container (the blocked state).
    fn empty_container(&self, group: u32) -> Result<(), DriverError> {
        let (container, old) = {
            let mut groups = lock(&self.groups);
            let Some(g) = groups.get_mut(&group) else {
                return Ok(());
            };
            (g.container.clone(), g.domain.take())
        };
        if let Some(d) = old {
            if let Err(e) = d.remove_container(self, group, &container) {
                // Put the record back so nothing believes the group is blocked while it is not.
                if let Some(g) = lock(&self.groups).get_mut(&group) {
                    g.domain = Some(d);
                }
                return Err(e);
            }
            log::info!("vfio: group {group}: container emptied (blocked)");
        }
        Ok(())
    }

    /// Closes `dev`'s fd; when it was the last open device of its group, the group leaves its container
    /// (after the fd is closed, as the kernel requires) and the container is closed.
    fn close(&self, dev: DeviceId) {
        let (group, device) = {
            let mut devs = lock(&self.devices);
            let Some(d) = devs.get_mut(&dev) else { return };
            (d.group, d.device.take())
        };
        let Some(device) = device else { return };
        if Arc::strong_count(&device) > 1 {
            log::warn!("vfio: group {group}: device fd still shared at close; it closes when its last user drops it");
        }
        drop(device);
        let others = lock(&self.devices)
            .values()
            .any(|d| d.group == group && d.device.is_some());
        if !others {
            if let Some(g) = lock(&self.groups).remove(&group) {
                if g.domain.is_some() {
                    log::warn!("vfio: group {group}: closing a container that still had mappings");
                }
            }
            log::info!("vfio: group {group}: device closed, container released");
        }
    }
}

impl IommuOps for VfioIommu {
    fn name(&self) -> &str {
        "vfio-type1"
    }

    /// Records the device's sysfs path and host group. Opens nothing: the host keeps the device until
    /// its group is claimed (the blocked attach opens it).
    fn probe_device(&self, dev: DeviceId, desc: &DeviceDesc) -> Result<ProbeInfo, DriverError> {
        let sysfs = sysfs_path(&desc.name);
        let group = host_group_of(&sysfs).map_err(DriverError::failed)?;
        lock(&self.shared.devices).insert(
            dev,
            DevState {
                sysfs,
                group,
                device: None,
            },
        );
        Ok(ProbeInfo::default())
    }

    fn release_device(&self, dev: DeviceId) {
        self.shared.close(dev);
        lock(&self.shared.devices).remove(&dev);
    }

    fn device_group(&self, dev: DeviceId, desc: &DeviceDesc) -> u64 {
        lock(&self.shared.devices)
            .get(&dev)
            .map(|d| u64::from(d.group))
            .unwrap_or_else(|| {
                host_group_of(&sysfs_path(&desc.name))
                    .map(u64::from)
                    .unwrap_or(u64::MAX)
            })
    }

    fn domain_alloc_paging(&self) -> Result<Arc<dyn PagingDomainOps>, DriverError> {
        Ok(Arc::new(VfioPaging {
            inner: Arc::new(PagingInner {
                shared: self.shared.clone(),
                state: Mutex::new(PagingState::default()),
            }),
        }))
    }

    fn blocked_domain(&self) -> Option<Arc<dyn DomainOps>> {
        Some(self.blocked.clone())
    }

    fn release_domain(&self) -> Option<StaticDomain> {
        Some(StaticDomain::Blocked)
    }

    fn uses_platform_dma(&self) -> bool {
        true
    }

    /// Gives the device back to the host: closes its fd; the group leaves its (empty) container after
    /// its last fd is closed.
    fn set_platform_dma(&self, dev: DeviceId) -> Result<(), DriverError> {
        let group = self.host_group(dev);
        if let Some(g) = group {
            self.shared.empty_container(g)?;
        }
        self.shared.close(dev);
        Ok(())
    }
}

/// The static blocked domain: an empty container, device fd open. Also the release domain.
pub struct VfioBlocked {
    shared: Arc<Shared>,
}

impl DomainOps for VfioBlocked {
    /// Opens the device if needed (the claim), then empties its group's container.
    fn attach_dev(&self, dev: DeviceId) -> Result<(), DriverError> {
        let group = self.shared.open(dev)?;
        self.shared.empty_container(group)
    }
}

#[derive(Clone, Copy, Debug)]
struct Run {
    len: u64,
    vaddr: u64,
    prot: Prot,
}

#[derive(Default)]
struct PagingState {
    runs: BTreeMap<u64, Run>,
    /// Containers holding this domain's mappings: (group, container).
    attached: Vec<(u32, Arc<VfioContainer>)>,
}

struct PagingInner {
    shared: Arc<Shared>,
    state: Mutex<PagingState>,
}

impl PagingInner {
    /// Replays every mapping into `c`; on failure, removes what it added.
    fn add_container(
        &self,
        shared: &Shared,
        group: u32,
        c: &Arc<VfioContainer>,
    ) -> Result<(), DriverError> {
        let mut st = lock(&self.state);
        let runs: Vec<(u64, Run)> = st.runs.iter().map(|(i, r)| (*i, *r)).collect();
        for (k, (iova, r)) in runs.iter().enumerate() {
            if let Err(e) = dma_map(shared, group, c, *iova, r.len, r.vaddr, r.prot) {
                for (iova, r) in &runs[..k] {
                    let _ = dma_unmap(shared, group, c, *iova, r.len);
                }
                return Err(DriverError::failed(e));
            }
        }
        st.attached.push((group, c.clone()));
        if !runs.is_empty() {
            log::info!(
                "vfio: group {group}: {} mapping(s), {} bytes replayed into its container",
                runs.len(),
                runs.iter().map(|(_, r)| r.len).sum::<u64>()
            );
        }
        Ok(())
    }

    /// Removes every mapping from `c` and forgets it.
    fn remove_container(
        &self,
        shared: &Shared,
        group: u32,
        c: &Arc<VfioContainer>,
    ) -> Result<(), DriverError> {
        let mut st = lock(&self.state);
        for (iova, r) in &st.runs {
            dma_unmap(shared, group, c, *iova, r.len).map_err(DriverError::failed)?;
        }
        st.attached.retain(|(g, _)| *g != group);
        Ok(())
    }
}

/// A paging domain of the vfio driver: mappings replayed into every attached group's container.
pub struct VfioPaging {
    inner: Arc<PagingInner>,
}

impl DomainOps for VfioPaging {
    /// Opens the device if needed, then makes its group's container hold exactly this domain's
    /// mappings (the previous domain's are removed first; there is no detach).
    fn attach_dev(&self, dev: DeviceId) -> Result<(), DriverError> {
        let shared = &self.inner.shared;
        let group = shared.open(dev)?;
        let current = lock(&shared.groups)
            .get(&group)
            .and_then(|g| g.domain.clone());
        if current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &self.inner))
        {
            return Ok(());
        }
        shared.empty_container(group)?;
        let container = lock(&shared.groups)
            .get(&group)
            .map(|g| g.container.clone())
            .ok_or_else(|| DriverError::Invalid(format!("vfio: group {group} has no container")))?;
        self.inner.add_container(shared, group, &container)?;
        if let Some(g) = lock(&shared.groups).get_mut(&group) {
            g.domain = Some(self.inner.clone());
        }
        Ok(())
    }

    fn free(&self) {
        let st = lock(&self.inner.state);
        if !st.attached.is_empty() {
            log::error!(
                "vfio: a paging domain freed while attached to {} container(s)",
                st.attached.len()
            );
        }
    }
}

impl PagingDomainOps for VfioPaging {
    fn pgsize_bitmap(&self) -> u64 {
        PAGE
    }

    fn ias_bits(&self) -> u32 {
        IAS_BITS
    }

    /// One VFIO_IOMMU_MAP_DMA per attached container for the whole run.
    fn map_pages(
        &self,
        iova: u64,
        paddr: u64,
        pgsize: u64,
        pgcount: u64,
        prot: Prot,
        _gather: &mut IotlbGather,
    ) -> Result<u64, DriverError> {
        let len = pgsize
            .checked_mul(pgcount)
            .ok_or_else(|| DriverError::Invalid("map length overflows".into()))?;
        let end = iova
            .checked_add(len)
            .ok_or_else(|| DriverError::Invalid("map range overflows".into()))?;
        if !prot.read && !prot.write {
            return Err(DriverError::Invalid(
                "a VFIO mapping needs read or write permission".into(),
            ));
        }
        let shared = &self.inner.shared;
        let mut st = lock(&self.inner.state);
        let overlaps = st
            .runs
            .range(..end)
            .next_back()
            .is_some_and(|(s, r)| s + r.len > iova);
        if overlaps {
            return Err(DriverError::Invalid(format!(
                "[{iova:#x}, {end:#x}) overlaps an existing mapping"
            )));
        }
        let attached = st.attached.clone();
        for (k, (g, c)) in attached.iter().enumerate() {
            if let Err(e) = dma_map(shared, *g, c, iova, len, paddr, prot) {
                for (g, c) in &attached[..k] {
                    let _ = dma_unmap(shared, *g, c, iova, len);
                }
                return Err(DriverError::failed(e));
            }
        }
        st.runs.insert(
            iova,
            Run {
                len,
                vaddr: paddr,
                prot,
            },
        );
        Ok(len)
    }

    /// Unmaps the runs inside the range (holes are skipped); a run that the range cuts is refused
    /// (type1 cannot split a mapping, and we never split silently).
    fn unmap_pages(
        &self,
        iova: u64,
        pgsize: u64,
        pgcount: u64,
        _gather: &mut IotlbGather,
    ) -> Result<u64, DriverError> {
        let len = pgsize.saturating_mul(pgcount);
        let end = iova.saturating_add(len);
        let shared = &self.inner.shared;
        let mut st = lock(&self.inner.state);
        let hit: Vec<(u64, Run)> = st
            .runs
            .range(..end)
            .filter(|(s, r)| **s + r.len > iova)
            .map(|(s, r)| (*s, *r))
            .collect();
        if let Some((s, r)) = hit.iter().find(|(s, r)| *s < iova || s + r.len > end) {
            return Err(DriverError::Invalid(format!(
                "unmapping [{iova:#x}, {end:#x}) would split the mapping [{s:#x}, {:#x})",
                s + r.len
            )));
        }
        let mut done = 0;
        for (s, r) in hit {
            for (g, c) in &st.attached {
                dma_unmap(shared, *g, c, s, r.len).map_err(DriverError::failed)?;
            }
            st.runs.remove(&s);
            done += r.len;
        }
        Ok(done)
    }

    /// type1's unmap is synchronous (the kernel flushes the IOTLB before it returns).
    fn iotlb_sync(&self, _gather: &mut IotlbGather) {}

    fn flush_iotlb_all(&self) {}

    /// The host virtual address `iova` maps to.
    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        let st = lock(&self.inner.state);
        st.runs
            .range(..=iova)
            .next_back()
            .filter(|(s, r)| iova < *s + r.len)
            .map(|(s, r)| r.vaddr + (iova - s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{IommuCore, OwnerId};

    #[test]
    fn names_map_to_sysfs_paths() {
        assert_eq!(
            sysfs_path("0000:00:02.0"),
            PathBuf::from("/sys/bus/pci/devices/0000:00:02.0")
        );
        assert_eq!(sysfs_path("/sys/x"), PathBuf::from("/sys/x"));
    }

    #[test]
    fn a_device_without_a_group_is_refused_at_probe_and_nothing_is_opened() {
        let core = IommuCore::new();
        let vfio = Arc::new(VfioIommu::new());
        let inst = core.register(vfio.clone()).unwrap();
        let err = core
            .probe_device(inst, DeviceDesc::new("/nonexistent/0000:00:1f.7"))
            .unwrap_err();
        let mut chain = err.to_string();
        let mut src = std::error::Error::source(&err);
        while let Some(e) = src {
            chain += &format!(": {e}");
            src = e.source();
        }
        assert!(chain.contains("iommu_group"), "{chain}");
        assert_eq!(vfio.open_containers(), 0);
    }

    #[test]
    fn paging_domains_keep_their_runs_without_containers() {
        // A domain with no container attached only records: map, translate, refuse overlap and splits.
        let core = IommuCore::new();
        let vfio = Arc::new(VfioIommu::new());
        let inst = core.register(vfio.clone()).unwrap();
        let d = core.alloc_paging(inst).unwrap();
        core.map(&d, 0, 0x7f00_0000_0000, 1 << 30, Prot::RW)
            .unwrap();
        core.map(&d, 1 << 32, 0x7f80_0000_0000, 2 << 20, Prot::RW)
            .unwrap();
        assert_eq!(
            core.iova_to_phys(&d, 0x1234).unwrap(),
            Some(0x7f00_0000_1234)
        );
        assert_eq!(core.iova_to_phys(&d, 1 << 31).unwrap(), None);
        assert!(core.map(&d, 4096, 0, 4096, Prot::RW).is_err(), "overlap");
        assert!(core.unmap(&d, 0, 4096).is_err(), "split");
        assert_eq!(core.unmap(&d, 0, 1 << 33).unwrap(), (1 << 30) + (2 << 20));
        assert_eq!(core.iova_to_phys(&d, 0).unwrap(), None);
        // No container: no VFIO call was made.
        assert_eq!(vfio.stats(), VfioStatsSnapshot::default());
        let _ = OwnerId(1);
    }
}
