//! [`IommuCore`]: the domain manager. Every rule of the model is enforced here, in one function per
//! rule that every path goes through.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, info, warn};

use super::calls::{CallLog, DriverCall, DriverOp};
use super::domain::{DomainInfo, OwnedDomain, PagingDomain, PasidTarget, SvaDomain, Target};
use super::error::{CoreError, FreeRefused};
use super::ops::{DomainOps, DriverError, IommuOps, IotlbGather, PagingDomainOps};
use super::types::{
    AddressSpaceId, DeviceDesc, DeviceId, DomainId, DomainType, GroupId, InstanceId, OwnerId,
    Pasid, Prot, ResvRegion, ResvType, StaticDomain,
};

/// What a PASID exit handler is told (seed 004): one PASID whose address space ended, or all of
/// the device's PASIDs (the device is released or parked; Linux's `IOMMU_PROCESS_EXIT_ALL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidExit {
    /// The address space on this PASID ends.
    Pasid(Pasid),
    /// Every PASID of the device is going away (release, park).
    All,
}

/// A device driver's PASID exit handler: after it returns, the device issues no transaction with
/// the PASID(s) it was given. An error is logged; the core removes the PASID's domain anyway (the
/// address space is gone).
///
/// Runs with the core's lock held: it must not call back into the [`IommuCore`].
pub type PasidExitHandler = dyn Fn(DeviceId, PasidExit) -> Result<(), String> + Send + Sync;

/// Who holds a group for DMA.
///
/// Rule carried: host-owned groups sit in their default domain (or the platform's DMA setup);
/// claiming for a guest attaches the blocked domain first; parking attaches the blocked domain and
/// keeps the group held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaOwner {
    /// The host: the group is in its default domain.
    Host,
    /// A guest (user) holds the group and may attach its domains.
    Guest(OwnerId),
    /// Released by its guest, attached to the blocked domain, still held by the owner, ready to be
    /// plugged again. A parked device reaches no memory at all.
    Parked(OwnerId),
}

/// One device as the VMM lists it.
///
/// Rule carried: the parked state is visible ([`DmaOwner::Parked`]), and so is everything the
/// rules depend on: the group, the domain of requests without PASID, the PASIDs, require_direct,
/// whether the deferred attach happened, the I/O page fault reference count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The device.
    pub id: DeviceId,
    /// Its name.
    pub name: String,
    /// Its IOMMU instance.
    pub instance: InstanceId,
    /// The driver's name.
    pub driver: String,
    /// Its group.
    pub group: GroupId,
    /// Who holds its group (shows the parked state).
    pub owner: DmaOwner,
    /// The domain its requests without PASID are in (`None`: the platform's DMA setup).
    pub domain: Option<DomainInfo>,
    /// Domains set on its PASIDs.
    pub pasids: Vec<(Pasid, DomainInfo)>,
    /// It has reserved regions that firmware requires mapped 1:1.
    pub require_direct: bool,
    /// Its deferred attach has not happened yet: the hardware still has its pre-probe setup.
    pub attach_deferred: bool,
    /// Its I/O page fault reference count.
    pub iopf_refcount: u32,
}

enum DomainImpl {
    Plain(Arc<dyn DomainOps>),
    Paging(Arc<dyn PagingDomainOps>),
}

impl DomainImpl {
    fn attach_dev(&self, dev: DeviceId) -> Result<(), DriverError> {
        match self {
            DomainImpl::Plain(o) => o.attach_dev(dev),
            DomainImpl::Paging(o) => o.attach_dev(dev),
        }
    }

    fn set_dev_pasid(&self, dev: DeviceId, pasid: Pasid) -> Result<(), DriverError> {
        match self {
            DomainImpl::Plain(o) => o.set_dev_pasid(dev, pasid),
            DomainImpl::Paging(o) => o.set_dev_pasid(dev, pasid),
        }
    }

    fn free(&self) {
        match self {
            DomainImpl::Plain(o) => o.free(),
            DomainImpl::Paging(o) => o.free(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Static,
    GroupDefault,
    GroupBlocking,
    User,
}

struct DomainEntry {
    instance: InstanceId,
    dtype: DomainType,
    imp: DomainImpl,
    origin: Origin,
    iopf: bool,
    space: Option<AddressSpaceId>,
}

struct Instance {
    ops: Arc<dyn IommuOps>,
    name: String,
    identity: Option<DomainId>,
    blocked: Option<DomainId>,
    release: Option<StaticDomain>,
    default: Option<StaticDomain>,
    platform_dma: bool,
}

impl Instance {
    fn static_domain(&self, s: StaticDomain) -> Option<DomainId> {
        match s {
            StaticDomain::Blocked => self.blocked,
            StaticDomain::Identity => self.identity,
        }
    }
}

struct DeviceEntry {
    desc: DeviceDesc,
    instance: InstanceId,
    group: GroupId,
    attach_deferred: bool,
    max_pasids: u32,
    require_direct: bool,
    resv: Vec<ResvRegion>,
    domain: Option<DomainId>,
    pasids: BTreeMap<Pasid, DomainId>,
    iopf_refcount: u32,
    iopf_users: u32,
    exit_handler: Option<Arc<PasidExitHandler>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ownership {
    Host,
    User { owner: OwnerId, parked: bool },
}

struct GroupEntry {
    instance: InstanceId,
    key: u64,
    devices: Vec<DeviceId>,
    domain: Option<DomainId>,
    default_domain: Option<DomainId>,
    blocking_domain: Option<DomainId>,
    owner: Ownership,
}

#[derive(Default)]
struct State {
    instances: Vec<Instance>,
    domains: HashMap<DomainId, DomainEntry>,
    devices: BTreeMap<DeviceId, DeviceEntry>,
    groups: BTreeMap<GroupId, GroupEntry>,
    next_domain: u32,
    next_device: u32,
    next_group: u32,
}

/// A planned attach of one device: checked against every rule, not yet applied.
struct AttachPlan {
    dev: DeviceId,
    domain: DomainId,
    skip_hw: bool,
    iopf_refcount: u32,
}

/// What an attach is for (only the IOPF rule tells them apart: see `plan_attach`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum AttachFor {
    /// A domain the device is to work in (attach, claim, give back, a deferred attach).
    Use,
    /// Taking the device away from its guest: release and park.
    Leaving,
}

static NEXT_CORE: AtomicU64 = AtomicU64::new(1);

/// The domain manager: devices, groups, domains, DMA ownership and PASIDs of every registered IOMMU
/// instance, modelled on Linux drivers/iommu/iommu.c.
///
/// Rules it carries, each in one function every path goes through:
/// - **attach** (`plan_attach`): domains attach only to devices of their instance; SVA never on a
///   device's requests without PASID; a device that requires direct mappings is never attached to a
///   blocked domain (refused with [`CoreError::RequireDirect`]); a blocked or identity attach with no
///   PASID attached requires an I/O page fault reference count of zero
///   ([`CoreError::IopfRefcount`]; release and park, which take a device away from its guest, log a
///   leaked reference instead of refusing, so the device still ends up reaching no memory); a deferred
///   device's first attach of its default domain touches no hardware.
/// - **groups** (`set_group_domain`): attach is per group; all policy checks run for every device
///   before any hardware is touched, and a driver error midway rolls the attached devices back, so
///   all devices of a group are always in the same domain.
/// - **no detach**: the only way out of a domain is attaching another:
///   [`release_dma_owner`](Self::release_dma_owner) restores the default domain (or calls
///   `set_platform_dma`), [`claim_dma_owner`](Self::claim_dma_owner) and [`park`](Self::park) attach
///   the blocked domain, PASIDs are removed by setting the blocked domain on them.
/// - **release** ([`release_device`](Self::release_device)): no hardware touched if the deferred
///   attach never happened; otherwise the release domain (identity instead of blocked for
///   require_direct devices); then the driver's `release_device`.
/// - **PASID exit** (`exit_pasids`): the device's own exit handler runs before the core removes a
///   PASID's domain.
/// - **free** ([`free`](Self::free)): refused while attached.
///
/// Every driver call is recorded ([`driver_calls`](Self::driver_calls)).
///
/// All methods take `&self`; the state sits behind one lock. Map and unmap take it only to look up
/// the domain, then call the driver without it.
pub struct IommuCore {
    tag: u64,
    state: Mutex<State>,
    calls: CallLog,
}

impl Default for IommuCore {
    fn default() -> Self {
        Self::new()
    }
}

/// Picks the page size and count for the next chunk of a map or unmap, as Linux `iommu_pgsize`:
/// the largest size allowed by the alignment of `iova | paddr` and the remaining length, and as many
/// pages of it as fit before a larger size becomes usable.
fn pgsize_for(bitmap: u64, iova: u64, paddr: u64, size: u64) -> (u64, u64) {
    let addr_merge = iova | paddr;
    // sizes no larger than `size`
    let mut pgsizes = if size >= 1 << 63 {
        bitmap
    } else {
        bitmap & ((1u64 << (64 - size.leading_zeros())) - 1)
    };
    if addr_merge != 0 {
        let align = addr_merge.trailing_zeros();
        if align < 63 {
            pgsizes &= (1u64 << (align + 1)) - 1;
        }
    }
    if pgsizes == 0 {
        // Callers check alignment against the smallest size first; stay safe anyway.
        let min = 1u64 << bitmap.trailing_zeros().min(63);
        return (min, 1);
    }
    let idx = 63 - pgsizes.leading_zeros();
    let pgsize = 1u64 << idx;
    let mut count_size = size;
    let larger = if idx >= 63 {
        0
    } else {
        bitmap & !((1u64 << (idx + 1)) - 1)
    };
    if larger != 0 {
        let next = 1u64 << larger.trailing_zeros();
        if (iova ^ paddr) & (next - 1) == 0 {
            let offset = next - (addr_merge & (next - 1));
            if offset.saturating_add(next) <= size {
                count_size = offset;
            }
        }
    }
    (pgsize, count_size >> idx)
}

impl IommuCore {
    /// An empty core, recording the last 4096 driver calls.
    pub fn new() -> Self {
        Self::with_call_log(4096)
    }

    /// An empty core whose driver call log keeps the last `capacity` calls (counters count all).
    pub fn with_call_log(capacity: usize) -> Self {
        IommuCore {
            tag: NEXT_CORE.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(State::default()),
            calls: CallLog::new(capacity),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, instance: InstanceId, op: DriverOp, ok: bool) {
        self.calls.record(instance, op, ok);
    }

    /// The driver calls recorded so far (oldest first), leaving them in the log.
    pub fn driver_calls(&self) -> Vec<DriverCall> {
        self.calls.snapshot()
    }

    /// The driver calls recorded so far (oldest first), emptying the log.
    pub fn take_driver_calls(&self) -> Vec<DriverCall> {
        self.calls.take()
    }

    /// How many times each driver operation was called over the core's life.
    pub fn driver_call_counts(&self) -> Vec<(&'static str, u64)> {
        self.calls.counts()
    }

    // ---------------------------------------------------------------- instances

    /// Registers an IOMMU instance: asks once for its static domains and capabilities.
    ///
    /// Refused if its release or default domain names a static domain it does not provide, or if it
    /// says it uses platform DMA and also provides a static default domain.
    pub fn register(&self, ops: Arc<dyn IommuOps>) -> Result<InstanceId, CoreError> {
        let mut st = self.lock();
        let id = InstanceId(st.instances.len() as u32);
        let (identity, blocked) = (ops.identity_domain(), ops.blocked_domain());
        let (release, default) = (ops.release_domain(), ops.default_domain());
        let provided = |s: StaticDomain| match s {
            StaticDomain::Blocked => blocked.is_some(),
            StaticDomain::Identity => identity.is_some(),
        };
        if release.is_some_and(|s| !provided(s)) {
            return Err(CoreError::Missing {
                instance: id,
                what: "static domain named as its release domain",
            });
        }
        if default.is_some_and(|s| !provided(s)) {
            return Err(CoreError::Missing {
                instance: id,
                what: "static domain named as its default domain",
            });
        }
        if ops.uses_platform_dma() && default.is_some() {
            return Err(CoreError::Missing {
                instance: id,
                what: "consistent default: it uses platform DMA yet names a static default domain",
            });
        }
        let mut add_static = |d: Option<Arc<dyn DomainOps>>, dtype: DomainType| {
            d.map(|imp| {
                let did = Self::new_domain_id(&mut st);
                st.domains.insert(
                    did,
                    DomainEntry {
                        instance: id,
                        dtype,
                        imp: DomainImpl::Plain(imp),
                        origin: Origin::Static,
                        iopf: false,
                        space: None,
                    },
                );
                did
            })
        };
        let identity = add_static(identity, DomainType::Identity);
        let blocked = add_static(blocked, DomainType::Blocked);
        let inst = Instance {
            name: ops.name().to_string(),
            identity,
            blocked,
            release,
            default,
            platform_dma: ops.uses_platform_dma(),
            ops,
        };
        info!("iommu: registered {id} ({})", inst.name);
        st.instances.push(inst);
        Ok(id)
    }

    fn instance(st: &State, id: InstanceId) -> Result<&Instance, CoreError> {
        st.instances
            .get(id.0 as usize)
            .ok_or(CoreError::UnknownInstance(id))
    }

    // ---------------------------------------------------------------- domains

    fn new_domain_id(st: &mut State) -> DomainId {
        let d = DomainId(st.next_domain);
        st.next_domain += 1;
        d
    }

    fn alloc_paging_locked(
        &self,
        st: &mut State,
        instance: InstanceId,
        origin: Origin,
        iopf: bool,
    ) -> Result<DomainId, CoreError> {
        let ops = Self::instance(st, instance)?.ops.clone();
        let id = Self::new_domain_id(st);
        let r = ops.domain_alloc_paging();
        self.record(
            instance,
            DriverOp::DomainAlloc {
                domain: id,
                dtype: DomainType::Paging,
            },
            r.is_ok(),
        );
        let imp = r.map_err(|source| CoreError::Driver {
            op: "domain_alloc_paging",
            instance,
            source,
        })?;
        st.domains.insert(
            id,
            DomainEntry {
                instance,
                dtype: DomainType::Paging,
                imp: DomainImpl::Paging(imp),
                origin,
                iopf,
                space: None,
            },
        );
        Ok(id)
    }

    /// Allocates an empty paging domain from `instance`.
    pub fn alloc_paging(&self, instance: InstanceId) -> Result<PagingDomain, CoreError> {
        let mut st = self.lock();
        let id = self.alloc_paging_locked(&mut st, instance, Origin::User, false)?;
        Ok(PagingDomain { id, core: self.tag })
    }

    /// Allocates an empty paging domain that handles I/O page faults: every device or PASID it is
    /// attached to holds one I/O page fault reference while it is.
    pub fn alloc_paging_iopf(&self, instance: InstanceId) -> Result<PagingDomain, CoreError> {
        let mut st = self.lock();
        let id = self.alloc_paging_locked(&mut st, instance, Origin::User, true)?;
        Ok(PagingDomain { id, core: self.tag })
    }

    /// Allocates an SVA domain sharing the address space `space`, for `dev`'s PASIDs. SVA domains
    /// handle I/O page faults (each PASID they are set on holds a reference).
    pub fn alloc_sva(&self, dev: DeviceId, space: AddressSpaceId) -> Result<SvaDomain, CoreError> {
        let mut st = self.lock();
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        if d.max_pasids == 0 {
            return Err(CoreError::PasidOutOfRange {
                dev,
                pasid: Pasid(0),
                max: 0,
            });
        }
        let instance = d.instance;
        let ops = Self::instance(&st, instance)?.ops.clone();
        let id = Self::new_domain_id(&mut st);
        let r = ops.domain_alloc_sva(dev, space);
        self.record(
            instance,
            DriverOp::DomainAlloc {
                domain: id,
                dtype: DomainType::Sva,
            },
            r.is_ok(),
        );
        let imp = r.map_err(|source| CoreError::Driver {
            op: "domain_alloc_sva",
            instance,
            source,
        })?;
        st.domains.insert(
            id,
            DomainEntry {
                instance,
                dtype: DomainType::Sva,
                imp: DomainImpl::Plain(imp),
                origin: Origin::User,
                iopf: true,
                space: Some(space),
            },
        );
        Ok(SvaDomain { id, core: self.tag })
    }

    fn users_of(st: &State, id: DomainId) -> (Vec<GroupId>, Vec<(DeviceId, Pasid)>) {
        // A group is a user when it is in the domain, or when one of its devices still is (left there by
        // a rollback that failed: the hardware points at the domain although the group moved on).
        let groups = st
            .groups
            .iter()
            .filter(|(_, g)| {
                g.domain == Some(id)
                    || g.devices
                        .iter()
                        .any(|d| st.devices.get(d).is_some_and(|d| d.domain == Some(id)))
            })
            .map(|(gid, _)| *gid)
            .collect();
        let pasids = st
            .devices
            .iter()
            .flat_map(|(dev, d)| {
                d.pasids
                    .iter()
                    .filter(move |(_, dom)| **dom == id)
                    .map(move |(p, _)| (*dev, *p))
            })
            .collect();
        (groups, pasids)
    }

    /// Ends a domain the caller owns: calls its `free` and forgets it.
    ///
    /// Rule carried: a domain still attached to a group or set on a PASID is not freed; the handle
    /// comes back in [`FreeRefused`] with [`CoreError::StillAttached`].
    pub fn free<D: OwnedDomain>(&self, domain: D) -> Result<(), FreeRefused<D>> {
        let id = domain.domain_id();
        let mut st = self.lock();
        if domain.core_tag() != self.tag || !st.domains.contains_key(&id) {
            return Err(FreeRefused {
                domain,
                error: CoreError::ForeignDomain(id),
            });
        }
        let (groups, pasids) = Self::users_of(&st, id);
        if !groups.is_empty() || !pasids.is_empty() {
            return Err(FreeRefused {
                domain,
                error: CoreError::StillAttached {
                    domain: id,
                    groups,
                    pasids,
                },
            });
        }
        self.free_locked(&mut st, id);
        Ok(())
    }

    fn free_locked(&self, st: &mut State, id: DomainId) {
        if let Some(e) = st.domains.remove(&id) {
            e.imp.free();
            self.record(e.instance, DriverOp::DomainFree { domain: id }, true);
            debug!("iommu: freed {id} ({})", e.dtype);
        }
    }

    fn domain_info(st: &State, id: DomainId) -> Option<DomainInfo> {
        st.domains
            .get(&id)
            .map(|e| DomainInfo { id, dtype: e.dtype })
    }

    fn check_handle(&self, st: &State, id: DomainId, tag: u64) -> Result<(), CoreError> {
        if tag != self.tag || !st.domains.contains_key(&id) {
            return Err(CoreError::ForeignDomain(id));
        }
        Ok(())
    }

    /// The group's blocking domain: the instance's static blocked domain, else an empty paging
    /// domain allocated for the group (never mapped).
    fn blocking_domain(&self, st: &mut State, gid: GroupId) -> Result<DomainId, CoreError> {
        let g = st.groups.get(&gid).ok_or(CoreError::UnknownGroup(gid))?;
        let instance = g.instance;
        if let Some(b) = Self::instance(st, instance)?.blocked {
            return Ok(b);
        }
        if let Some(b) = g.blocking_domain {
            return Ok(b);
        }
        let b = self.alloc_paging_locked(st, instance, Origin::GroupBlocking, false)?;
        if let Some(g) = st.groups.get_mut(&gid) {
            g.blocking_domain = Some(b);
        }
        Ok(b)
    }

    // ---------------------------------------------------------------- the attach rules

    /// Checks one device attach against every rule. Touches nothing.
    ///
    /// `why` only changes the IOPF rule: an attach that takes a device *away* from its guest (release,
    /// park) must not be refused for a leaked fault reference, because refusing would leave the device
    /// in the domain that still reaches memory; the leak is logged instead (Linux WARNs there too).
    fn plan_attach(
        st: &State,
        dev: DeviceId,
        new: DomainId,
        why: AttachFor,
    ) -> Result<AttachPlan, CoreError> {
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        let dom = st.domains.get(&new).ok_or(CoreError::ForeignDomain(new))?;
        if dom.instance != d.instance {
            return Err(CoreError::WrongInstance {
                domain: new,
                domain_instance: dom.instance,
                dev,
                dev_instance: d.instance,
            });
        }
        if dom.dtype == DomainType::Sva {
            return Err(CoreError::SvaOnRid(new));
        }
        let g = st
            .groups
            .get(&d.group)
            .ok_or(CoreError::UnknownGroup(d.group))?;
        let blocking = dom.dtype == DomainType::Blocked || g.blocking_domain == Some(new);
        if d.require_direct && blocking {
            warn!(
                "iommu: {dev} ({}): firmware has requested a 1:1 mapping for this device; refusing a blocked domain",
                d.desc.name
            );
            return Err(CoreError::RequireDirect {
                dev,
                name: d.desc.name.clone(),
            });
        }
        let iopf_of =
            |x: Option<DomainId>| x.and_then(|x| st.domains.get(&x)).is_some_and(|e| e.iopf) as u32;
        let iopf_refcount =
            (d.iopf_refcount + iopf_of(Some(new))).saturating_sub(iopf_of(d.domain));
        if (blocking || dom.dtype == DomainType::Identity)
            && d.pasids.is_empty()
            && iopf_refcount != 0
        {
            if why == AttachFor::Leaving {
                warn!(
                    "iommu: {dev} ({}): I/O page fault reference count is {iopf_refcount}, not zero, as it \
                     leaves for the {:?} domain: a fault reference leaked; attaching anyway so it reaches no memory",
                    d.desc.name, dom.dtype
                );
            } else {
                return Err(CoreError::IopfRefcount {
                    dev,
                    count: iopf_refcount,
                    // The group's empty paging domain blocks too: name what it stands for.
                    dtype: if blocking {
                        DomainType::Blocked
                    } else {
                        dom.dtype
                    },
                });
            }
        }
        let skip_hw = d.attach_deferred && g.default_domain == Some(new);
        Ok(AttachPlan {
            dev,
            domain: new,
            skip_hw,
            iopf_refcount,
        })
    }

    /// Applies a checked plan: the driver's attach_dev (unless the deferred attach skips it).
    fn apply_attach(&self, st: &mut State, p: &AttachPlan) -> Result<(), CoreError> {
        let dom = st
            .domains
            .get(&p.domain)
            .ok_or(CoreError::ForeignDomain(p.domain))?;
        let (instance, dtype) = (dom.instance, dom.dtype);
        if !p.skip_hw {
            let r = dom.imp.attach_dev(p.dev);
            self.record(
                instance,
                DriverOp::AttachDev {
                    dev: p.dev,
                    domain: p.domain,
                    dtype,
                },
                r.is_ok(),
            );
            r.map_err(|source| CoreError::Driver {
                op: "attach_dev",
                instance,
                source,
            })?;
        }
        let d = st
            .devices
            .get_mut(&p.dev)
            .ok_or(CoreError::UnknownDevice(p.dev))?;
        if !p.skip_hw {
            d.attach_deferred = false;
        }
        d.domain = Some(p.domain);
        d.iopf_refcount = p.iopf_refcount;
        Ok(())
    }

    fn apply_platform_dma(&self, st: &mut State, dev: DeviceId) -> Result<(), CoreError> {
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        let instance = d.instance;
        let old_iopf = d
            .domain
            .and_then(|x| st.domains.get(&x))
            .is_some_and(|e| e.iopf) as u32;
        let ops = Self::instance(st, instance)?.ops.clone();
        let r = ops.set_platform_dma(dev);
        self.record(instance, DriverOp::SetPlatformDma { dev }, r.is_ok());
        r.map_err(|source| CoreError::Driver {
            op: "set_platform_dma",
            instance,
            source,
        })?;
        if let Some(d) = st.devices.get_mut(&dev) {
            d.domain = None;
            d.attach_deferred = false;
            d.iopf_refcount = d.iopf_refcount.saturating_sub(old_iopf);
        }
        Ok(())
    }

    /// Moves every device of a group to `new` (`None`: the platform's DMA setup), or none of them.
    ///
    /// Rule carried: all devices of a group are always in the same domain. Policy checks run for all
    /// devices before any hardware is touched; a driver error midway rolls back the devices already
    /// moved.
    fn set_group_domain(
        &self,
        st: &mut State,
        gid: GroupId,
        new: Option<DomainId>,
        why: AttachFor,
    ) -> Result<(), CoreError> {
        let g = st.groups.get(&gid).ok_or(CoreError::UnknownGroup(gid))?;
        let devs = g.devices.clone();
        let old = g.domain;
        let plans = match new {
            Some(n) => devs
                .iter()
                .map(|d| Self::plan_attach(st, *d, n, why).map(Some))
                .collect::<Result<Vec<_>, _>>()?,
            None => devs.iter().map(|_| None).collect(),
        };
        for (i, p) in plans.iter().enumerate() {
            let r = match p {
                Some(p) => self.apply_attach(st, p),
                None => self.apply_platform_dma(st, devs[i]),
            };
            if let Err(e) = r {
                warn!(
                    "iommu: {gid}: attach failed at {}: {e}; rolling back",
                    devs[i]
                );
                let mut failed = Vec::new();
                for d in &devs[..i] {
                    let rb = match old {
                        Some(o) => Self::plan_attach(st, *d, o, why)
                            .and_then(|p| self.apply_attach(st, &p)),
                        None => self.apply_platform_dma(st, *d),
                    };
                    if rb.is_err() {
                        failed.push(*d);
                    }
                }
                if !failed.is_empty() {
                    log::error!("iommu: {gid}: rollback failed for {failed:?} after: {e}");
                    return Err(CoreError::RollbackFailed {
                        group: gid,
                        domain: old,
                        devices: failed,
                    });
                }
                return Err(e);
            }
        }
        if let Some(g) = st.groups.get_mut(&gid) {
            g.domain = new;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- devices

    /// Probes `desc` into `instance`: the driver's probe_device, its group (created with its default
    /// domain if new), reserved regions, then the attach of the group's domain (skipped while the
    /// driver defers it).
    pub fn probe_device(
        &self,
        instance: InstanceId,
        desc: DeviceDesc,
    ) -> Result<DeviceId, CoreError> {
        let mut st = self.lock();
        let ops = Self::instance(&st, instance)?.ops.clone();
        let dev = DeviceId(st.next_device);
        st.next_device += 1;
        let r = ops.probe_device(dev, &desc);
        self.record(instance, DriverOp::ProbeDevice { dev }, r.is_ok());
        let pinfo = r.map_err(|source| CoreError::Driver {
            op: "probe_device",
            instance,
            source,
        })?;
        let key = ops.device_group(dev, &desc);
        let resv = ops.get_resv_regions(dev);
        let require_direct = resv.iter().any(|r| r.kind == ResvType::Direct);
        let existing = st
            .groups
            .iter()
            .find(|(_, g)| g.instance == instance && g.key == key)
            .map(|(gid, _)| *gid);
        let (gid, new_group) = match existing {
            Some(g) => (g, false),
            None => match self.new_group(&mut st, instance, key, dev) {
                Ok(g) => (g, true),
                Err(e) => {
                    self.undo_probe(instance, &ops, dev);
                    return Err(e);
                }
            },
        };
        st.devices.insert(
            dev,
            DeviceEntry {
                desc,
                instance,
                group: gid,
                attach_deferred: pinfo.attach_deferred,
                max_pasids: pinfo.max_pasids,
                require_direct,
                resv,
                domain: None,
                pasids: BTreeMap::new(),
                iopf_refcount: 0,
                iopf_users: 0,
                exit_handler: None,
            },
        );
        if let Some(g) = st.groups.get_mut(&gid) {
            g.devices.push(dev);
        }
        let r = self.join_group_domain(&mut st, dev, gid);
        if let Err(e) = r {
            self.forget_device(&mut st, dev);
            if new_group {
                self.drop_group_if_empty(&mut st, gid);
            }
            self.undo_probe(instance, &ops, dev);
            return Err(e);
        }
        info!("iommu: probed {dev} into {gid} on {instance}");
        Ok(dev)
    }

    fn undo_probe(&self, instance: InstanceId, ops: &Arc<dyn IommuOps>, dev: DeviceId) {
        ops.release_device(dev);
        self.record(instance, DriverOp::ReleaseDevice { dev }, true);
    }

    fn new_group(
        &self,
        st: &mut State,
        instance: InstanceId,
        key: u64,
        first: DeviceId,
    ) -> Result<GroupId, CoreError> {
        let inst = Self::instance(st, instance)?;
        let ops = inst.ops.clone();
        let default = if inst.platform_dma {
            None
        } else if let Some(s) = inst.default {
            inst.static_domain(s)
        } else {
            let identity = inst.identity;
            match ops.def_domain_type(first) {
                Some(DomainType::Identity) => Some(identity.ok_or(CoreError::Missing {
                    instance,
                    what: "identity domain (its def_domain_type asked for one)",
                })?),
                _ => match self.alloc_paging_locked(st, instance, Origin::GroupDefault, false) {
                    Ok(d) => Some(d),
                    Err(e) => match identity {
                        Some(i) => {
                            debug!("iommu: no paging default domain ({e}); using identity");
                            Some(i)
                        }
                        None => return Err(e),
                    },
                },
            }
        };
        let gid = GroupId(st.next_group);
        st.next_group += 1;
        st.groups.insert(
            gid,
            GroupEntry {
                instance,
                key,
                devices: Vec::new(),
                domain: default,
                default_domain: default,
                blocking_domain: None,
                owner: Ownership::Host,
            },
        );
        Ok(gid)
    }

    /// A new device takes its group's current domain (the default one unless the group is held by
    /// a guest). Direct regions are mapped 1:1 into a paging default domain first.
    fn join_group_domain(
        &self,
        st: &mut State,
        dev: DeviceId,
        gid: GroupId,
    ) -> Result<(), CoreError> {
        let g = st.groups.get(&gid).ok_or(CoreError::UnknownGroup(gid))?;
        let (cur, default) = (g.domain, g.default_domain);
        if let Some(def) = default {
            self.map_direct_regions(st, dev, def)?;
        }
        match cur {
            Some(d) => {
                let p = Self::plan_attach(st, dev, d, AttachFor::Use)?;
                self.apply_attach(st, &p)
            }
            None => Ok(()),
        }
    }

    fn map_direct_regions(
        &self,
        st: &State,
        dev: DeviceId,
        domain: DomainId,
    ) -> Result<(), CoreError> {
        let Some(e) = st.domains.get(&domain) else {
            return Ok(());
        };
        let DomainImpl::Paging(ops) = &e.imp else {
            return Ok(());
        };
        let Some(d) = st.devices.get(&dev) else {
            return Ok(());
        };
        for r in d
            .resv
            .iter()
            .filter(|r| matches!(r.kind, ResvType::Direct | ResvType::DirectRelaxable) && r.len > 0)
        {
            let min = 1u64 << ops.pgsize_bitmap().trailing_zeros().min(63);
            let start = r.start & !(min - 1);
            let end = r.start.saturating_add(r.len).div_ceil(min) * min;
            // Skip what is already mapped (another device of the group may share the region).
            let mut iova = start;
            while iova < end {
                if ops.iova_to_phys(iova).is_none() {
                    self.do_map(e.instance, domain, ops, iova, iova, min, Prot::RW)?;
                }
                iova += min;
            }
        }
        Ok(())
    }

    /// Completes a deferred attach: the device's first real use. Attaches its group's current
    /// domain to it; a no-op if the attach was not deferred.
    pub fn deferred_attach(&self, dev: DeviceId) -> Result<(), CoreError> {
        let mut st = self.lock();
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        if !d.attach_deferred {
            return Ok(());
        }
        let Some(cur) = st.groups.get(&d.group).and_then(|g| g.domain) else {
            return Ok(());
        };
        if let Some(d) = st.devices.get_mut(&dev) {
            d.attach_deferred = false;
        }
        let r = Self::plan_attach(&st, dev, cur, AttachFor::Use)
            .and_then(|p| self.apply_attach(&mut st, &p));
        if r.is_err() {
            if let Some(d) = st.devices.get_mut(&dev) {
                d.attach_deferred = true;
            }
        }
        r
    }

    /// Releases a device (unplug for good, VM teardown), in the order the model requires:
    /// 1. its PASIDs: the device's exit handler is told `All`, then each PASID's domain is removed;
    /// 2. if its deferred attach never happened, no hardware is touched; otherwise the instance's
    ///    release domain is attached, the identity domain instead of a blocked one when the device
    ///    requires direct mappings;
    /// 3. the driver's `release_device`, which only undoes probe;
    /// 4. the device leaves its group (an emptied group and its default domain go away).
    pub fn release_device(&self, dev: DeviceId) -> Result<(), CoreError> {
        let mut st = self.lock();
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        let (instance, gid, deferred) = (d.instance, d.group, d.attach_deferred);
        self.exit_pasids(&mut st, dev, None)?;
        if !deferred {
            match self.release_domain_for(&st, dev)? {
                Some(rd) => {
                    let p = Self::plan_attach(&st, dev, rd, AttachFor::Leaving)?;
                    self.apply_attach(&mut st, &p)?;
                }
                None => {
                    // No release domain: release_device must quiesce the device itself; the
                    // domain's fault reference goes with it.
                    let old_iopf = st
                        .devices
                        .get(&dev)
                        .and_then(|d| d.domain)
                        .and_then(|x| st.domains.get(&x))
                        .is_some_and(|e| e.iopf) as u32;
                    if let Some(d) = st.devices.get_mut(&dev) {
                        d.iopf_refcount = d.iopf_refcount.saturating_sub(old_iopf);
                    }
                }
            }
        } else {
            debug!("iommu: {dev}: deferred attach never happened; touching no hardware");
        }
        let ops = Self::instance(&st, instance)?.ops.clone();
        ops.release_device(dev);
        self.record(instance, DriverOp::ReleaseDevice { dev }, true);
        self.forget_device(&mut st, dev);
        self.drop_group_if_empty(&mut st, gid);
        info!("iommu: released {dev}");
        Ok(())
    }

    /// The domain to attach before release_device (seeds 000, 002): the instance's release domain,
    /// replaced by its identity domain when the device requires direct mappings and the release
    /// domain is the blocked one. `None`: attach nothing.
    fn release_domain_for(&self, st: &State, dev: DeviceId) -> Result<Option<DomainId>, CoreError> {
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        let inst = Self::instance(st, d.instance)?;
        let Some(rel) = inst.release else {
            return Ok(None);
        };
        if rel == StaticDomain::Blocked && d.require_direct {
            if inst.identity.is_none() {
                warn!(
                    "iommu: {dev} requires direct mappings and {} has no identity domain; \
                     leaving its translation as is for release_device",
                    inst.name
                );
            }
            return Ok(inst.identity);
        }
        Ok(inst.static_domain(rel))
    }

    fn forget_device(&self, st: &mut State, dev: DeviceId) {
        if let Some(d) = st.devices.remove(&dev) {
            if let Some(g) = st.groups.get_mut(&d.group) {
                g.devices.retain(|x| *x != dev);
            }
        }
    }

    fn drop_group_if_empty(&self, st: &mut State, gid: GroupId) {
        let empty = st.groups.get(&gid).is_some_and(|g| g.devices.is_empty());
        if !empty {
            return;
        }
        if let Some(g) = st.groups.remove(&gid) {
            for d in [g.default_domain, g.blocking_domain].into_iter().flatten() {
                let core_owned = st.domains.get(&d).is_some_and(|e| {
                    matches!(e.origin, Origin::GroupDefault | Origin::GroupBlocking)
                });
                if core_owned {
                    self.free_locked(st, d);
                }
            }
            debug!("iommu: {gid} is empty and gone");
        }
    }

    // ---------------------------------------------------------------- queries

    /// The group of `dev`.
    pub fn group_of(&self, dev: DeviceId) -> Result<GroupId, CoreError> {
        let st = self.lock();
        st.devices
            .get(&dev)
            .map(|d| d.group)
            .ok_or(CoreError::UnknownDevice(dev))
    }

    /// The devices of `group`, in probe order.
    pub fn group_devices(&self, group: GroupId) -> Result<Vec<DeviceId>, CoreError> {
        let st = self.lock();
        st.groups
            .get(&group)
            .map(|g| g.devices.clone())
            .ok_or(CoreError::UnknownGroup(group))
    }

    /// The domain `group` is in (`None`: the platform's DMA setup).
    pub fn group_domain(&self, group: GroupId) -> Result<Option<DomainInfo>, CoreError> {
        let st = self.lock();
        let g = st
            .groups
            .get(&group)
            .ok_or(CoreError::UnknownGroup(group))?;
        Ok(g.domain.and_then(|d| Self::domain_info(&st, d)))
    }

    /// Who holds `group` for DMA.
    pub fn group_owner(&self, group: GroupId) -> Result<DmaOwner, CoreError> {
        let st = self.lock();
        let g = st
            .groups
            .get(&group)
            .ok_or(CoreError::UnknownGroup(group))?;
        Ok(Self::dma_owner(g))
    }

    fn dma_owner(g: &GroupEntry) -> DmaOwner {
        match g.owner {
            Ownership::Host => DmaOwner::Host,
            Ownership::User {
                owner,
                parked: false,
            } => DmaOwner::Guest(owner),
            Ownership::User {
                owner,
                parked: true,
            } => DmaOwner::Parked(owner),
        }
    }

    fn status_of(st: &State, id: DeviceId, d: &DeviceEntry) -> DeviceStatus {
        let g = st.groups.get(&d.group);
        DeviceStatus {
            id,
            name: d.desc.name.clone(),
            instance: d.instance,
            driver: st
                .instances
                .get(d.instance.0 as usize)
                .map(|i| i.name.clone())
                .unwrap_or_default(),
            group: d.group,
            owner: g.map(Self::dma_owner).unwrap_or(DmaOwner::Host),
            domain: d.domain.and_then(|x| Self::domain_info(st, x)),
            pasids: d
                .pasids
                .iter()
                .filter_map(|(p, x)| Self::domain_info(st, *x).map(|i| (*p, i)))
                .collect(),
            require_direct: d.require_direct,
            attach_deferred: d.attach_deferred,
            iopf_refcount: d.iopf_refcount,
        }
    }

    /// One device's status.
    pub fn device_status(&self, dev: DeviceId) -> Result<DeviceStatus, CoreError> {
        let st = self.lock();
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        Ok(Self::status_of(&st, dev, d))
    }

    /// Every device's status, by id (what the VMM's list-devices shows).
    pub fn devices(&self) -> Vec<DeviceStatus> {
        let st = self.lock();
        st.devices
            .iter()
            .map(|(id, d)| Self::status_of(&st, *id, d))
            .collect()
    }

    /// The domain type of a domain known to this core.
    pub fn domain_type(&self, domain: DomainId) -> Option<DomainType> {
        self.lock().domains.get(&domain).map(|e| e.dtype)
    }

    // ---------------------------------------------------------------- ownership and attach

    /// Claims `group` for DMA by `owner` (a guest): attaches the blocking domain first, so the
    /// group reaches no memory until its owner attaches a domain of its own.
    ///
    /// Refused for a group that another owner holds, and (by the attach rule) for groups with a
    /// device that requires direct mappings. Claiming again by the same owner is a no-op.
    pub fn claim_dma_owner(&self, group: GroupId, owner: OwnerId) -> Result<(), CoreError> {
        let mut st = self.lock();
        let g = st
            .groups
            .get(&group)
            .ok_or(CoreError::UnknownGroup(group))?;
        match g.owner {
            Ownership::Host => {}
            Ownership::User { owner: o, .. } if o == owner => return Ok(()),
            Ownership::User { owner: o, .. } => {
                return Err(CoreError::OwnedByOther { group, owner: o })
            }
        }
        let b = self.blocking_domain(&mut st, group)?;
        self.set_group_domain(&mut st, group, Some(b), AttachFor::Use)?;
        if let Some(g) = st.groups.get_mut(&group) {
            g.owner = Ownership::User {
                owner,
                parked: false,
            };
        }
        info!("iommu: {group} claimed by {owner}");
        Ok(())
    }

    fn check_owner(st: &State, group: GroupId, owner: OwnerId) -> Result<bool, CoreError> {
        let g = st
            .groups
            .get(&group)
            .ok_or(CoreError::UnknownGroup(group))?;
        match g.owner {
            Ownership::Host => Err(CoreError::NotOwned(group)),
            Ownership::User { owner: o, parked } if o == owner => Ok(parked),
            Ownership::User { owner: o, .. } => Err(CoreError::OwnedByOther { group, owner: o }),
        }
    }

    /// Gives `group` back to the host: restores its default domain, or, for an instance without
    /// default domains, calls `set_platform_dma` on each device. There is no detach.
    pub fn release_dma_owner(&self, group: GroupId, owner: OwnerId) -> Result<(), CoreError> {
        let mut st = self.lock();
        Self::check_owner(&st, group, owner)?;
        for dev in st
            .groups
            .get(&group)
            .map(|g| g.devices.clone())
            .unwrap_or_default()
        {
            self.exit_pasids(&mut st, dev, None)?;
        }
        let default = st.groups.get(&group).and_then(|g| g.default_domain);
        self.set_group_domain(&mut st, group, default, AttachFor::Use)?;
        if let Some(g) = st.groups.get_mut(&group) {
            g.owner = Ownership::Host;
        }
        info!("iommu: {group} given back to the host by {owner}");
        Ok(())
    }

    /// Attaches `group` (all its devices) to `target`, replacing its current domain.
    ///
    /// Only the group's owner may attach, and not while it is parked.
    pub fn attach(
        &self,
        group: GroupId,
        owner: OwnerId,
        target: Target<'_>,
    ) -> Result<(), CoreError> {
        let mut st = self.lock();
        if Self::check_owner(&st, group, owner)? {
            return Err(CoreError::Parked(group));
        }
        let instance = st
            .groups
            .get(&group)
            .map(|g| g.instance)
            .ok_or(CoreError::UnknownGroup(group))?;
        let new = match target {
            Target::Paging(d) => {
                self.check_handle(&st, d.id, d.core)?;
                d.id
            }
            Target::Blocked => self.blocking_domain(&mut st, group)?,
            Target::Identity => {
                Self::instance(&st, instance)?
                    .identity
                    .ok_or(CoreError::Missing {
                        instance,
                        what: "identity domain",
                    })?
            }
        };
        self.set_group_domain(&mut st, group, Some(new), AttachFor::Use)
    }

    /// Parks `group` (its guest unplugged it): every PASID goes (exit handlers told `All`), then
    /// the blocking domain is attached. The owner keeps the group; [`plug`](Self::plug) makes it
    /// attachable again.
    ///
    /// Rule carried: a parked device reaches no memory at all. Parking always uses the blocking
    /// domain, never an identity release domain.
    pub fn park(&self, group: GroupId, owner: OwnerId) -> Result<(), CoreError> {
        let mut st = self.lock();
        Self::check_owner(&st, group, owner)?;
        for dev in st
            .groups
            .get(&group)
            .map(|g| g.devices.clone())
            .unwrap_or_default()
        {
            self.exit_pasids(&mut st, dev, None)?;
        }
        let b = self.blocking_domain(&mut st, group)?;
        self.set_group_domain(&mut st, group, Some(b), AttachFor::Leaving)?;
        if let Some(g) = st.groups.get_mut(&group) {
            g.owner = Ownership::User {
                owner,
                parked: true,
            };
        }
        info!("iommu: {group} parked (held by {owner})");
        Ok(())
    }

    /// Plugs a parked `group` again: its owner may attach domains; until it does, the group stays in
    /// the blocking domain.
    pub fn plug(&self, group: GroupId, owner: OwnerId) -> Result<(), CoreError> {
        let mut st = self.lock();
        if !Self::check_owner(&st, group, owner)? {
            return Err(CoreError::NotParked(group));
        }
        if let Some(g) = st.groups.get_mut(&group) {
            g.owner = Ownership::User {
                owner,
                parked: false,
            };
        }
        info!("iommu: {group} plugged again for {owner}");
        Ok(())
    }

    // ---------------------------------------------------------------- I/O page faults

    /// Takes an I/O page fault reference for `dev` (a device driver that relies on page faults on
    /// its own, outside fault-capable domains).
    pub fn iopf_get(&self, dev: DeviceId) -> Result<u32, CoreError> {
        let mut st = self.lock();
        let d = st
            .devices
            .get_mut(&dev)
            .ok_or(CoreError::UnknownDevice(dev))?;
        d.iopf_users += 1;
        d.iopf_refcount += 1;
        Ok(d.iopf_refcount)
    }

    /// Drops a reference taken by [`iopf_get`](Self::iopf_get). Extra puts are ignored.
    pub fn iopf_put(&self, dev: DeviceId) -> Result<u32, CoreError> {
        let mut st = self.lock();
        let d = st
            .devices
            .get_mut(&dev)
            .ok_or(CoreError::UnknownDevice(dev))?;
        if d.iopf_users > 0 {
            d.iopf_users -= 1;
            d.iopf_refcount = d.iopf_refcount.saturating_sub(1);
        }
        Ok(d.iopf_refcount)
    }

    // ---------------------------------------------------------------- PASIDs

    /// Registers `dev`'s PASID exit handler (one per device, replacing any earlier one), called
    /// before the core removes a PASID's domain because its address space ends.
    ///
    /// Per device, not per domain (seed 004): devices of one group, driven by different drivers,
    /// may share a domain, and each driver must stop its own device.
    pub fn set_pasid_exit_handler(
        &self,
        dev: DeviceId,
        handler: Arc<PasidExitHandler>,
    ) -> Result<(), CoreError> {
        let mut st = self.lock();
        let d = st
            .devices
            .get_mut(&dev)
            .ok_or(CoreError::UnknownDevice(dev))?;
        d.exit_handler = Some(handler);
        Ok(())
    }

    /// Sets `target` on `dev`'s `pasid`, replacing the PASID's previous domain.
    pub fn set_dev_pasid(
        &self,
        dev: DeviceId,
        pasid: Pasid,
        target: PasidTarget<'_>,
    ) -> Result<(), CoreError> {
        let mut st = self.lock();
        let (id, tag) = match target {
            PasidTarget::Sva(d) => (d.id, d.core),
            PasidTarget::Paging(d) => (d.id, d.core),
        };
        self.check_handle(&st, id, tag)?;
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        if pasid.0 >= d.max_pasids {
            return Err(CoreError::PasidOutOfRange {
                dev,
                pasid,
                max: d.max_pasids,
            });
        }
        let dom = st.domains.get(&id).ok_or(CoreError::ForeignDomain(id))?;
        if dom.instance != d.instance {
            return Err(CoreError::WrongInstance {
                domain: id,
                domain_instance: dom.instance,
                dev,
                dev_instance: d.instance,
            });
        }
        let old_iopf = d
            .pasids
            .get(&pasid)
            .and_then(|x| st.domains.get(x))
            .is_some_and(|e| e.iopf) as u32;
        let new_iopf = dom.iopf as u32;
        self.call_set_dev_pasid(&st, dev, pasid, id)?;
        if let Some(d) = st.devices.get_mut(&dev) {
            d.pasids.insert(pasid, id);
            d.iopf_refcount = (d.iopf_refcount + new_iopf).saturating_sub(old_iopf);
        }
        Ok(())
    }

    fn call_set_dev_pasid(
        &self,
        st: &State,
        dev: DeviceId,
        pasid: Pasid,
        domain: DomainId,
    ) -> Result<(), CoreError> {
        let e = st
            .domains
            .get(&domain)
            .ok_or(CoreError::ForeignDomain(domain))?;
        let r = e.imp.set_dev_pasid(dev, pasid);
        self.record(
            e.instance,
            DriverOp::SetDevPasid {
                dev,
                pasid,
                domain,
                dtype: e.dtype,
            },
            r.is_ok(),
        );
        r.map_err(|source| CoreError::Driver {
            op: "set_dev_pasid",
            instance: e.instance,
            source,
        })
    }

    /// Removes a PASID's domain by setting the blocking domain on it (no detach, for PASIDs too).
    fn remove_pasid_locked(
        &self,
        st: &mut State,
        dev: DeviceId,
        pasid: Pasid,
    ) -> Result<(), CoreError> {
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        let Some(old) = d.pasids.get(&pasid).copied() else {
            return Err(CoreError::PasidNotAttached { dev, pasid });
        };
        let gid = d.group;
        let b = self.blocking_domain(st, gid)?;
        self.call_set_dev_pasid(st, dev, pasid, b)?;
        let old_iopf = st.domains.get(&old).is_some_and(|e| e.iopf) as u32;
        if let Some(d) = st.devices.get_mut(&dev) {
            d.pasids.remove(&pasid);
            d.iopf_refcount = d.iopf_refcount.saturating_sub(old_iopf);
        }
        Ok(())
    }

    /// Removes the domain of `dev`'s `pasid` at the request of the device's own driver (which has
    /// already stopped using it, so the exit handler is not called).
    pub fn remove_dev_pasid(&self, dev: DeviceId, pasid: Pasid) -> Result<(), CoreError> {
        let mut st = self.lock();
        self.remove_pasid_locked(&mut st, dev, pasid)
    }

    /// Calls `dev`'s exit handler, then removes the PASIDs' domains: one PASID, or all of them
    /// (`None`, the handler is told [`PasidExit::All`]).
    ///
    /// Rule carried (seed 004): the handler is the device's, and it runs before the domain goes.
    fn exit_pasids(
        &self,
        st: &mut State,
        dev: DeviceId,
        which: Option<Pasid>,
    ) -> Result<(), CoreError> {
        let d = st.devices.get(&dev).ok_or(CoreError::UnknownDevice(dev))?;
        let pasids: Vec<Pasid> = match which {
            Some(p) => d.pasids.contains_key(&p).then_some(p).into_iter().collect(),
            None => d.pasids.keys().copied().collect(),
        };
        if pasids.is_empty() {
            return Ok(());
        }
        if let Some(h) = d.exit_handler.clone() {
            let what = match which {
                Some(p) => PasidExit::Pasid(p),
                None => PasidExit::All,
            };
            if let Err(e) = h(dev, what) {
                warn!("iommu: {dev}: PASID exit handler failed ({e}); removing {what:?} anyway");
            }
        } else {
            debug!("iommu: {dev} has no PASID exit handler");
        }
        for p in pasids {
            self.remove_pasid_locked(st, dev, p)?;
        }
        Ok(())
    }

    /// The address space `space` ended (its process exited): for every device with a PASID set to
    /// an SVA domain of that space, the device's exit handler is called with the PASID, then the
    /// PASID's domain is removed. Returns the (device, PASID) pairs removed.
    pub fn address_space_exit(
        &self,
        space: AddressSpaceId,
    ) -> Result<Vec<(DeviceId, Pasid)>, CoreError> {
        let mut st = self.lock();
        let victims: Vec<(DeviceId, Pasid)> = st
            .devices
            .iter()
            .flat_map(|(dev, d)| {
                d.pasids
                    .iter()
                    .filter(|(_, dom)| {
                        st.domains
                            .get(dom)
                            .is_some_and(|e| e.dtype == DomainType::Sva && e.space == Some(space))
                    })
                    .map(move |(p, _)| (*dev, *p))
            })
            .collect();
        // The address space is gone for every device: one device's failure does not keep the others'
        // PASIDs on it. The first error is returned once all were tried.
        let mut first_err = None;
        for (dev, p) in &victims {
            if let Err(e) = self.exit_pasids(&mut st, *dev, Some(*p)) {
                warn!("iommu: address space {space:?} exit: {dev} PASID {p:?}: {e}");
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(victims),
        }
    }

    // ---------------------------------------------------------------- map / unmap

    fn paging_ops(
        &self,
        d: &PagingDomain,
    ) -> Result<(InstanceId, Arc<dyn PagingDomainOps>), CoreError> {
        let st = self.lock();
        self.check_handle(&st, d.id, d.core)?;
        match st.domains.get(&d.id) {
            Some(DomainEntry {
                instance,
                imp: DomainImpl::Paging(o),
                ..
            }) => Ok((*instance, o.clone())),
            _ => Err(CoreError::ForeignDomain(d.id)),
        }
    }

    fn check_range(
        ops: &dyn PagingDomainOps,
        iova: u64,
        paddr: Option<u64>,
        len: u64,
    ) -> Result<u64, CoreError> {
        let bitmap = ops.pgsize_bitmap();
        let min = 1u64 << bitmap.trailing_zeros().min(63);
        let ias = ops.ias_bits();
        let limit = if ias >= 64 { u64::MAX } else { 1u64 << ias };
        let end = iova.checked_add(len);
        if len == 0 || end.is_none_or(|e| e > limit) {
            return Err(CoreError::OutOfRange {
                iova,
                len,
                ias_bits: ias,
            });
        }
        for (what, v) in [
            ("iova", Some(iova)),
            ("paddr", paddr),
            ("length", Some(len)),
        ] {
            if let Some(v) = v {
                if v & (min - 1) != 0 {
                    return Err(CoreError::Unaligned {
                        what,
                        value: v,
                        pgsize: min,
                    });
                }
            }
        }
        if paddr.is_some_and(|p| p.checked_add(len).is_none()) {
            return Err(CoreError::OutOfRange {
                iova,
                len,
                ias_bits: ias,
            });
        }
        Ok(bitmap)
    }

    /// Maps `[iova, iova + len)` to `[paddr, paddr + len)` with `prot` in a paging domain, using
    /// the largest page sizes alignment allows (runs of pages per driver call), then syncs once.
    ///
    /// Overlapping an existing mapping is refused by the page tables; on any error, what this call
    /// mapped is unmapped again.
    pub fn map(
        &self,
        domain: &PagingDomain,
        iova: u64,
        paddr: u64,
        len: u64,
        prot: Prot,
    ) -> Result<(), CoreError> {
        let (instance, ops) = self.paging_ops(domain)?;
        self.do_map(instance, domain.id, &ops, iova, paddr, len, prot)
    }

    #[allow(clippy::too_many_arguments)]
    fn do_map(
        &self,
        instance: InstanceId,
        id: DomainId,
        ops: &Arc<dyn PagingDomainOps>,
        iova: u64,
        paddr: u64,
        len: u64,
        prot: Prot,
    ) -> Result<(), CoreError> {
        let bitmap = Self::check_range(ops.as_ref(), iova, Some(paddr), len)?;
        let mut gather = IotlbGather::new();
        let mut done = 0u64;
        while done < len {
            let (pgsize, pgcount) = pgsize_for(bitmap, iova + done, paddr + done, len - done);
            let r = ops.map_pages(
                iova + done,
                paddr + done,
                pgsize,
                pgcount,
                prot,
                &mut gather,
            );
            self.record(
                instance,
                DriverOp::MapPages {
                    domain: id,
                    iova: iova + done,
                    pgsize,
                    pgcount,
                },
                r.is_ok(),
            );
            let err = match r {
                Ok(0) => {
                    DriverError::Invalid(format!("map_pages mapped nothing at {:#x}", iova + done))
                }
                Ok(n) => {
                    done += n;
                    continue;
                }
                Err(e) => e,
            };
            if done > 0 {
                if let Err(e) = self.do_unmap(instance, id, ops, iova, done) {
                    warn!("iommu: {id}: undoing a failed map failed: {e}");
                }
            }
            return Err(CoreError::Driver {
                op: "map_pages",
                instance,
                source: err,
            });
        }
        let r = ops.iotlb_sync_map(iova, len, &mut gather);
        self.record(instance, DriverOp::IotlbSyncMap { domain: id }, r.is_ok());
        r.map_err(|source| CoreError::Driver {
            op: "iotlb_sync_map",
            instance,
            source,
        })
    }

    /// Unmaps `[iova, iova + len)` from a paging domain and syncs once; returns the bytes that were
    /// mapped there (holes are skipped).
    ///
    /// One `unmap_pages` call covers the whole range, so a range that cuts a huge page is refused as
    /// a whole by the page tables (never silently split, nothing unmapped).
    pub fn unmap(&self, domain: &PagingDomain, iova: u64, len: u64) -> Result<u64, CoreError> {
        let (instance, ops) = self.paging_ops(domain)?;
        self.do_unmap(instance, domain.id, &ops, iova, len)
    }

    fn do_unmap(
        &self,
        instance: InstanceId,
        id: DomainId,
        ops: &Arc<dyn PagingDomainOps>,
        iova: u64,
        len: u64,
    ) -> Result<u64, CoreError> {
        let bitmap = Self::check_range(ops.as_ref(), iova, None, len)?;
        // One call for the whole range, as generic_pt's unmap_pages: the page tables unmap whatever
        // leaves lie inside, and refuse the whole call (changing nothing) if an edge cuts a leaf.
        let pgsize = 1u64 << bitmap.trailing_zeros().min(63);
        let pgcount = len / pgsize;
        let mut gather = IotlbGather::new();
        let r = ops.unmap_pages(iova, pgsize, pgcount, &mut gather);
        self.record(
            instance,
            DriverOp::UnmapPages {
                domain: id,
                iova,
                pgsize,
                pgcount,
            },
            r.is_ok(),
        );
        ops.iotlb_sync(&mut gather);
        self.record(instance, DriverOp::IotlbSync { domain: id }, true);
        r.map_err(|source| CoreError::Driver {
            op: "unmap_pages",
            instance,
            source,
        })
    }

    /// The output address `iova` translates to in a paging domain, if mapped.
    pub fn iova_to_phys(&self, domain: &PagingDomain, iova: u64) -> Result<Option<u64>, CoreError> {
        let (_, ops) = self.paging_ops(domain)?;
        Ok(ops.iova_to_phys(iova))
    }

    /// Flushes every cached translation of a paging domain.
    pub fn flush_iotlb_all(&self, domain: &PagingDomain) -> Result<(), CoreError> {
        let (instance, ops) = self.paging_ops(domain)?;
        ops.flush_iotlb_all();
        self.record(
            instance,
            DriverOp::FlushIotlbAll { domain: domain.id },
            true,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::pgsize_for;

    const SIZES: u64 = (1 << 12) | (1 << 21) | (1 << 30);

    #[test]
    fn pgsize_picks_largest_aligned_size_and_runs() {
        assert_eq!(pgsize_for(SIZES, 0, 0, 4096), (4096, 1));
        assert_eq!(pgsize_for(SIZES, 0, 0, 4 << 20), (2 << 20, 2));
        assert_eq!(pgsize_for(SIZES, 0, 0, 3 << 30), (1 << 30, 3));
        // 4K-aligned start: 4K pages up to the next 2M boundary only
        assert_eq!(pgsize_for(SIZES, 0x1000, 0x1000, 4 << 20), (4096, 511));
        // iova and paddr disagree modulo 2M: 4K pages all the way
        assert_eq!(pgsize_for(SIZES, 0, 0x1000, 4 << 20), (4096, 1024));
        // 2M-aligned, 1G reachable later: 2M pages up to the 1G boundary
        assert_eq!(
            pgsize_for(SIZES, 1 << 30 | 2 << 20, 2 << 20, 2 << 30),
            (2 << 20, 511)
        );
    }
}
