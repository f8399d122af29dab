//! `soft`: an IOMMU instance whose "hardware" is the VMM itself, for emulated devices.
//!
//! # What this module owns
//! - The device table: for each probed device, what its requests without PASID and with each PASID
//!   translate through (nothing yet, blocked, identity, a paging domain's [`IoPageTable`], an address
//!   space's table). It is changed only by the [`DomainOps`] the core calls: attach_dev, set_dev_pasid.
//! - The DMA path of emulated devices: [`SoftIommu::translate`] (and [`DmaPort`], its cached form
//!   for one device thread): IOVA to output address, or a [`Fault`] saying why not, recorded in a
//!   bounded [`FaultLog`] the VMM reads.
//! - Paging domains over [`IoPageTable`]: map/unmap/sync go straight to the page tables.
//!
//! # What it must not do
//! Decide policy. Which domain a device is in, whether a blocked attach is allowed, when a PASID goes:
//! all of that is the [`core`](crate::core)'s. This module only does what it is told, like hardware.
//!
//! Static domains: blocked, identity, and release = blocked. A host-owned device's default domain is
//! identity (an emulated device without a vIOMMU DMAs to guest-physical addresses untranslated).
//! Groups: functions of one PCI slot (requester ids that differ only in the function bits) share a
//! group, as functions of a multi-function device without ACS do; a device without a requester id is
//! alone in its group.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::core::{
    Access, AddressSpaceId, DeviceDesc, DeviceId, DomainOps, DomainType, DriverError, IommuOps,
    IotlbGather, PagingDomainOps, Pasid, ProbeInfo, Prot, ResvRegion, StaticDomain,
};
use crate::pt::{self, IoPageTable, TranslateFault, Translator};

/// Why a DMA through the soft IOMMU was refused.
///
/// Rule carried: a fault always says why, and is recorded ([`FaultLog`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Fault {
    /// The device (or PASID) is in the blocked domain: parked, claimed and not yet given a domain,
    /// or released.
    #[error("DMA blocked: the device is in the blocked domain (parked, or claimed by a guest that has not attached a domain)")]
    Blocked,
    /// Nothing is mapped at the IOVA in the device's paging domain.
    #[error("IOVA not mapped in the device's domain: the guest must map it before DMA")]
    NotMapped,
    /// The mapping does not allow this access.
    #[error("access not permitted by the mapping: the guest mapped it without this permission")]
    Permission,
    /// No domain was ever set for the device (or this PASID of it).
    #[error("no domain: the device (or this PASID) was never attached to a domain")]
    NoDomain,
    /// The device is not probed into this instance (never, or released).
    #[error("unknown device: not probed into the soft IOMMU, or already released")]
    UnknownDevice,
}

impl Fault {
    fn index(self) -> usize {
        self as usize
    }
}

impl From<TranslateFault> for Fault {
    fn from(f: TranslateFault) -> Self {
        match f {
            TranslateFault::NotMapped { .. } => Fault::NotMapped,
            TranslateFault::Permission { .. } => Fault::Permission,
        }
    }
}

/// One recorded fault: who, what, where, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Increases by one per fault over the instance's life.
    pub seq: u64,
    /// The device that issued the DMA.
    pub dev: DeviceId,
    /// Its PASID, if the request carried one.
    pub pasid: Option<Pasid>,
    /// The IOVA.
    pub iova: u64,
    /// The access.
    pub access: Access,
    /// Why it failed.
    pub fault: Fault,
}

/// Counters of a [`FaultLog`]: they count every fault, including those the ring dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Faults ever recorded.
    pub total: u64,
    /// Faults that fell out of the ring before being read.
    pub dropped: u64,
    /// [`Fault::Blocked`] faults.
    pub blocked: u64,
    /// [`Fault::NotMapped`] faults.
    pub not_mapped: u64,
    /// [`Fault::Permission`] faults.
    pub permission: u64,
    /// [`Fault::NoDomain`] faults.
    pub no_domain: u64,
    /// [`Fault::UnknownDevice`] faults.
    pub unknown_device: u64,
}

/// A bounded ring of the most recent faults plus counters of all of them: where the VMM reads why
/// DMA failed. The oldest records are dropped when it is full (counted in
/// [`FaultCounts::dropped`]).
pub struct FaultLog {
    capacity: usize,
    ring: Mutex<VecDeque<FaultRecord>>,
    total: AtomicU64,
    dropped: AtomicU64,
    per_kind: [AtomicU64; 5],
}

impl FaultLog {
    fn new(capacity: usize) -> Self {
        FaultLog {
            capacity,
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            total: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            per_kind: Default::default(),
        }
    }

    fn record(&self, dev: DeviceId, pasid: Option<Pasid>, iova: u64, access: Access, fault: Fault) {
        let seq = self.total.fetch_add(1, Ordering::Relaxed);
        self.per_kind[fault.index()].fetch_add(1, Ordering::Relaxed);
        log::debug!("soft iommu: fault {fault:?} {dev} {pasid:?} iova {iova:#x} {access:?}");
        if self.capacity == 0 {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == self.capacity {
            ring.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ring.push_back(FaultRecord {
            seq,
            dev,
            pasid,
            iova,
            access,
            fault,
        });
    }

    /// The recorded faults, oldest first, leaving them in the ring.
    pub fn recent(&self) -> Vec<FaultRecord> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().copied().collect()
    }

    /// The recorded faults, oldest first, emptying the ring (counters are kept).
    pub fn drain(&self) -> Vec<FaultRecord> {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.drain(..).collect()
    }

    /// The counters.
    pub fn counts(&self) -> FaultCounts {
        let k = |f: Fault| self.per_kind[f.index()].load(Ordering::Relaxed);
        FaultCounts {
            total: self.total.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            blocked: k(Fault::Blocked),
            not_mapped: k(Fault::NotMapped),
            permission: k(Fault::Permission),
            no_domain: k(Fault::NoDomain),
            unknown_device: k(Fault::UnknownDevice),
        }
    }
}

/// What one requester (a device's requests without PASID, or one PASID) translates through.
#[derive(Clone)]
enum Slot {
    Blocked,
    Identity,
    Tables(Arc<IoPageTable>),
}

#[derive(Default)]
struct Slots {
    rid: Option<Slot>,
    pasids: HashMap<Pasid, Slot>,
}

/// One device's entry in the soft device table ("context entry").
struct DevState {
    /// Bumped after every change of `slots`, so cached translators notice.
    gen: AtomicU64,
    slots: RwLock<Slots>,
}

impl DevState {
    fn update(&self, f: impl FnOnce(&mut Slots)) {
        let mut s = self.slots.write().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        self.gen.fetch_add(1, Ordering::Release);
    }

    fn slot(&self, pasid: Option<Pasid>) -> Option<Slot> {
        let s = self.slots.read().unwrap_or_else(|e| e.into_inner());
        match pasid {
            None => s.rid.clone(),
            Some(p) => s.pasids.get(&p).cloned(),
        }
    }
}

/// The soft IOMMU's "hardware": the device table and the fault log.
struct Hw {
    devices: RwLock<HashMap<DeviceId, Arc<DevState>>>,
    faults: FaultLog,
}

impl Hw {
    fn dev(&self, dev: DeviceId) -> Option<Arc<DevState>> {
        let t = self.devices.read().unwrap_or_else(|e| e.into_inner());
        t.get(&dev).cloned()
    }

    fn set(
        &self,
        dev: DeviceId,
        pasid: Option<Pasid>,
        slot: Option<Slot>,
    ) -> Result<(), DriverError> {
        let d = self.dev(dev).ok_or_else(|| {
            DriverError::Invalid(format!("{dev} is not probed into the soft IOMMU"))
        })?;
        d.update(|s| match (pasid, slot) {
            (None, slot) => s.rid = slot,
            (Some(p), Some(slot)) => {
                s.pasids.insert(p, slot);
            }
            (Some(p), None) => {
                s.pasids.remove(&p);
            }
        });
        Ok(())
    }
}

fn resolve(slot: Option<Slot>, iova: u64, access: Access) -> Result<u64, Fault> {
    match slot {
        None => Err(Fault::NoDomain),
        Some(Slot::Blocked) => Err(Fault::Blocked),
        Some(Slot::Identity) => Ok(iova),
        Some(Slot::Tables(t)) => t.translate(iova, access).map_err(Fault::from),
    }
}

/// The soft IOMMU instance. Register it with [`IommuCore::register`](crate::core::IommuCore::register)
/// and keep a clone of the `Arc` for the devices' DMA path ([`translate`](Self::translate),
/// [`port`](Self::port)) and the [`faults`](Self::faults) log.
///
/// Rule carried: a driver is a trait impl and nothing else; what a device reaches is exactly what
/// the core last attached to it.
pub struct SoftIommu {
    hw: Arc<Hw>,
    blocked: Arc<SoftBlocked>,
    identity: Arc<SoftIdentity>,
    spaces: Mutex<HashMap<AddressSpaceId, Arc<IoPageTable>>>,
    resv: Mutex<HashMap<String, Vec<ResvRegion>>>,
    dev_resv: Mutex<HashMap<DeviceId, Vec<ResvRegion>>>,
    next_solo_group: AtomicU64,
}

impl SoftIommu {
    /// Default capacity of the fault ring.
    pub const FAULT_LOG_CAPACITY: usize = 256;
    /// PASIDs each soft device supports.
    pub const MAX_PASIDS: u32 = 1 << 20;

    /// A soft IOMMU with an empty device table and a fault ring of
    /// [`FAULT_LOG_CAPACITY`](Self::FAULT_LOG_CAPACITY) records.
    pub fn new() -> Arc<Self> {
        Self::with_fault_log(Self::FAULT_LOG_CAPACITY)
    }

    /// A soft IOMMU whose fault ring keeps `capacity` records.
    pub fn with_fault_log(capacity: usize) -> Arc<Self> {
        let hw = Arc::new(Hw {
            devices: RwLock::new(HashMap::new()),
            faults: FaultLog::new(capacity),
        });
        Arc::new(SoftIommu {
            blocked: Arc::new(SoftBlocked { hw: hw.clone() }),
            identity: Arc::new(SoftIdentity { hw: hw.clone() }),
            hw,
            spaces: Mutex::new(HashMap::new()),
            resv: Mutex::new(HashMap::new()),
            dev_resv: Mutex::new(HashMap::new()),
            next_solo_group: AtomicU64::new(1 << 32),
        })
    }

    /// Declares a reserved region for the device that will be probed with this name (e.g. a
    /// [`Direct`](crate::core::ResvType::Direct) region firmware needs mapped 1:1).
    pub fn add_resv_region(&self, name: &str, region: ResvRegion) {
        let mut r = self.resv.lock().unwrap_or_else(|e| e.into_inner());
        r.entry(name.to_string()).or_default().push(region);
    }

    /// Makes the page tables of a process address space known to the hardware, so SVA domains for
    /// `space` can be allocated. Mappings in `tables` are the process's; nothing maps through the
    /// IOMMU API.
    pub fn bind_address_space(&self, space: AddressSpaceId, tables: Arc<IoPageTable>) {
        let mut s = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(space, tables);
    }

    /// Translates one DMA access of `dev` (with `pasid`, if the request carries one): the output
    /// address, or the [`Fault`], which is also recorded in the [`faults`](Self::faults) log.
    ///
    /// Identity: output = input. Blocked: [`Fault::Blocked`]. Paging: a lock-free walk of the
    /// domain's page tables. For a device's own thread, [`port`](Self::port) adds an IOTLB.
    pub fn translate(
        &self,
        dev: DeviceId,
        pasid: Option<Pasid>,
        iova: u64,
        access: Access,
    ) -> Result<u64, Fault> {
        let r = match self.hw.dev(dev) {
            None => Err(Fault::UnknownDevice),
            Some(d) => resolve(d.slot(pasid), iova, access),
        };
        if let Err(f) = r {
            self.hw.faults.record(dev, pasid, iova, access, f);
        }
        r
    }

    /// A cached DMA path for one device thread: the same answers as [`translate`](Self::translate),
    /// with a private IOTLB in front of the page tables, refreshed whenever the core attaches
    /// another domain to the device.
    pub fn port(&self, dev: DeviceId, pasid: Option<Pasid>) -> DmaPort {
        DmaPort {
            hw: self.hw.clone(),
            dev,
            pasid,
            state: None,
        }
    }

    /// The fault log.
    pub fn faults(&self) -> &FaultLog {
        &self.hw.faults
    }
}

/// One device's DMA path with a private IOTLB ([`SoftIommu::port`]). Not shared between threads.
///
/// Rule carried: a cached path reaches no more than the uncached one. The port re-reads the device
/// table whenever an attach changed it (so parking blocks it at once), and its IOTLB drops entries
/// older than the page tables' last sync (so an unmap is seen once the unmap call returns).
pub struct DmaPort {
    hw: Arc<Hw>,
    dev: DeviceId,
    pasid: Option<Pasid>,
    state: Option<PortState>,
}

struct PortState {
    dev: Arc<DevState>,
    gen: u64,
    kind: PortKind,
}

enum PortKind {
    NoDomain,
    Blocked,
    Identity,
    Tables(Box<Translator>),
}

impl DmaPort {
    fn refresh(&mut self) -> Option<&mut PortState> {
        let dev = match self.state.take() {
            Some(s) => s.dev,
            None => self.hw.dev(self.dev)?,
        };
        let gen = dev.gen.load(Ordering::Acquire);
        let kind = match dev.slot(self.pasid) {
            None => PortKind::NoDomain,
            Some(Slot::Blocked) => PortKind::Blocked,
            Some(Slot::Identity) => PortKind::Identity,
            Some(Slot::Tables(t)) => PortKind::Tables(Box::new(t.translator())),
        };
        self.state = Some(PortState { dev, gen, kind });
        self.state.as_mut()
    }

    /// Translates one DMA access (see [`SoftIommu::translate`]); faults are recorded the same way.
    pub fn translate(&mut self, iova: u64, access: Access) -> Result<u64, Fault> {
        let fresh = self
            .state
            .as_ref()
            .is_some_and(|s| s.gen == s.dev.gen.load(Ordering::Acquire));
        // A released device leaves the table: look it up again on every change.
        let still_there = fresh || self.hw.dev(self.dev).is_some();
        let r = if !still_there {
            self.state = None;
            Err(Fault::UnknownDevice)
        } else {
            let st = if fresh {
                self.state.as_mut()
            } else {
                self.state = None;
                self.refresh()
            };
            match st.map(|s| &mut s.kind) {
                None => Err(Fault::UnknownDevice),
                Some(PortKind::NoDomain) => Err(Fault::NoDomain),
                Some(PortKind::Blocked) => Err(Fault::Blocked),
                Some(PortKind::Identity) => Ok(iova),
                Some(PortKind::Tables(t)) => t.translate(iova, access).map_err(Fault::from),
            }
        };
        if let Err(f) = r {
            self.hw.faults.record(self.dev, self.pasid, iova, access, f);
        }
        r
    }
}

impl IommuOps for SoftIommu {
    fn name(&self) -> &str {
        "soft"
    }

    fn probe_device(&self, dev: DeviceId, desc: &DeviceDesc) -> Result<ProbeInfo, DriverError> {
        let resv = self.resv_for(&desc.name);
        self.dev_resv
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dev, resv);
        let mut t = self.hw.devices.write().unwrap_or_else(|e| e.into_inner());
        t.insert(
            dev,
            Arc::new(DevState {
                gen: AtomicU64::new(0),
                slots: RwLock::new(Slots::default()),
            }),
        );
        Ok(ProbeInfo {
            attach_deferred: false,
            max_pasids: Self::MAX_PASIDS,
        })
    }

    fn release_device(&self, dev: DeviceId) {
        self.dev_resv
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&dev);
        let mut t = self.hw.devices.write().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = t.remove(&dev) {
            // Wake cached ports so they see the device is gone.
            d.gen.fetch_add(1, Ordering::Release);
        }
    }

    fn device_group(&self, _dev: DeviceId, desc: &DeviceDesc) -> u64 {
        match desc.rid {
            Some(rid) => u64::from(rid >> 3),
            None => self.next_solo_group.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn get_resv_regions(&self, dev: DeviceId) -> Vec<ResvRegion> {
        let r = self.dev_resv.lock().unwrap_or_else(|e| e.into_inner());
        r.get(&dev).cloned().unwrap_or_default()
    }

    fn def_domain_type(&self, _dev: DeviceId) -> Option<DomainType> {
        Some(DomainType::Identity)
    }

    fn domain_alloc_paging(&self) -> Result<Arc<dyn PagingDomainOps>, DriverError> {
        Ok(Arc::new(SoftPaging {
            hw: self.hw.clone(),
            tables: Arc::new(IoPageTable::new()),
        }))
    }

    fn domain_alloc_sva(
        &self,
        _dev: DeviceId,
        space: AddressSpaceId,
    ) -> Result<Arc<dyn DomainOps>, DriverError> {
        let s = self.spaces.lock().unwrap_or_else(|e| e.into_inner());
        let tables = s.get(&space).cloned().ok_or_else(|| {
            DriverError::Invalid(format!(
                "{space} is not bound to the soft IOMMU; call bind_address_space first"
            ))
        })?;
        Ok(Arc::new(SoftSva {
            hw: self.hw.clone(),
            tables,
        }))
    }

    fn identity_domain(&self) -> Option<Arc<dyn DomainOps>> {
        Some(self.identity.clone())
    }

    fn blocked_domain(&self) -> Option<Arc<dyn DomainOps>> {
        Some(self.blocked.clone())
    }

    fn release_domain(&self) -> Option<StaticDomain> {
        Some(StaticDomain::Blocked)
    }
}

impl SoftIommu {
    fn resv_for(&self, name: &str) -> Vec<ResvRegion> {
        let r = self.resv.lock().unwrap_or_else(|e| e.into_inner());
        r.get(name).cloned().unwrap_or_default()
    }
}

/// The soft instance's static blocked domain: the device (or PASID) reaches nothing.
struct SoftBlocked {
    hw: Arc<Hw>,
}

impl DomainOps for SoftBlocked {
    fn attach_dev(&self, dev: DeviceId) -> Result<(), DriverError> {
        self.hw.set(dev, None, Some(Slot::Blocked))
    }

    fn set_dev_pasid(&self, dev: DeviceId, pasid: Pasid) -> Result<(), DriverError> {
        self.hw.set(dev, Some(pasid), Some(Slot::Blocked))
    }
}

/// The soft instance's static identity domain: output = input.
struct SoftIdentity {
    hw: Arc<Hw>,
}

impl DomainOps for SoftIdentity {
    fn attach_dev(&self, dev: DeviceId) -> Result<(), DriverError> {
        self.hw.set(dev, None, Some(Slot::Identity))
    }
}

/// A soft paging domain: one [`IoPageTable`].
struct SoftPaging {
    hw: Arc<Hw>,
    tables: Arc<IoPageTable>,
}

impl DomainOps for SoftPaging {
    fn attach_dev(&self, dev: DeviceId) -> Result<(), DriverError> {
        self.hw
            .set(dev, None, Some(Slot::Tables(self.tables.clone())))
    }

    fn set_dev_pasid(&self, dev: DeviceId, pasid: Pasid) -> Result<(), DriverError> {
        self.hw
            .set(dev, Some(pasid), Some(Slot::Tables(self.tables.clone())))
    }
}

impl PagingDomainOps for SoftPaging {
    fn pgsize_bitmap(&self) -> u64 {
        pt::PAGE_SIZES.iter().fold(0, |m, s| m | s)
    }

    fn ias_bits(&self) -> u32 {
        pt::IOVA_BITS
    }

    fn map_pages(
        &self,
        iova: u64,
        paddr: u64,
        pgsize: u64,
        pgcount: u64,
        prot: Prot,
        gather: &mut IotlbGather,
    ) -> Result<u64, DriverError> {
        let len = pgsize
            .checked_mul(pgcount)
            .ok_or_else(|| DriverError::Invalid("map length overflows".into()))?;
        self.tables
            .map(iova, paddr, len, prot, gather.driver_data::<pt::Gather>())
            .map_err(DriverError::failed)?;
        gather.add_range(iova, len);
        Ok(len)
    }

    fn unmap_pages(
        &self,
        iova: u64,
        pgsize: u64,
        pgcount: u64,
        gather: &mut IotlbGather,
    ) -> Result<u64, DriverError> {
        let len = pgsize
            .checked_mul(pgcount)
            .ok_or_else(|| DriverError::Invalid("unmap length overflows".into()))?;
        let n = self
            .tables
            .unmap(iova, len, gather.driver_data::<pt::Gather>())
            .map_err(DriverError::failed)?;
        gather.add_range(iova, len);
        Ok(n)
    }

    fn iotlb_sync_map(
        &self,
        _iova: u64,
        _size: u64,
        gather: &mut IotlbGather,
    ) -> Result<(), DriverError> {
        self.tables.sync(gather.driver_data::<pt::Gather>());
        Ok(())
    }

    fn iotlb_sync(&self, gather: &mut IotlbGather) {
        self.tables.sync(gather.driver_data::<pt::Gather>());
    }

    fn flush_iotlb_all(&self) {
        self.tables.flush_all();
    }

    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.tables.iova_to_phys(iova).map(|t| t.paddr)
    }
}

/// A soft SVA domain: a process's page tables, set on PASIDs only.
struct SoftSva {
    hw: Arc<Hw>,
    tables: Arc<IoPageTable>,
}

impl DomainOps for SoftSva {
    fn attach_dev(&self, _dev: DeviceId) -> Result<(), DriverError> {
        Err(DriverError::NotSupported {
            op: "attach_dev of an SVA domain",
        })
    }

    fn set_dev_pasid(&self, dev: DeviceId, pasid: Pasid) -> Result<(), DriverError> {
        self.hw
            .set(dev, Some(pasid), Some(Slot::Tables(self.tables.clone())))
    }
}
