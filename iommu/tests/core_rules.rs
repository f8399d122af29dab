//! The domain manager's rules, one or more tests per rule, over a small test driver whose "hardware"
//! is a table of what each device is programmed to plus a log of every hardware touch.
//!
//! The test driver only records; every rule checked here lives in `iommu::core`. Paging semantics
//! are tested over the real page tables in `core_soft.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use iommu::core::{
    AddressSpaceId, CoreError, DeviceDesc, DeviceId, DmaOwner, DomainOps, DomainType, DriverError,
    DriverOp, GroupId, IommuCore, IommuOps, IotlbGather, OwnerId, PagingDomainOps, Pasid,
    PasidExit, PasidTarget, ProbeInfo, Prot, ResvRegion, ResvType, StaticDomain, Target,
};

const VM: OwnerId = OwnerId(7);

/// The test driver's hardware: what each device's RID and PASIDs are programmed to, and a log.
#[derive(Default)]
struct Hw {
    log: Mutex<Vec<String>>,
    rid: Mutex<HashMap<DeviceId, String>>,
    pasid: Mutex<HashMap<(DeviceId, Pasid), String>>,
    fail_attach: Mutex<HashSet<DeviceId>>,
    fail_pasid: Mutex<HashSet<DeviceId>>,
    /// Attaches of a device to domains whose label starts with the given prefix fail.
    fail_attach_to: Mutex<HashSet<(DeviceId, &'static str)>>,
}

impl Hw {
    fn push(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
    fn rid_of(&self, d: DeviceId) -> Option<String> {
        self.rid.lock().unwrap().get(&d).cloned()
    }
}

struct TestDomain {
    label: String,
    hw: Arc<Hw>,
    pasid_ok: bool,
}

impl DomainOps for TestDomain {
    fn attach_dev(&self, dev: DeviceId) -> Result<(), DriverError> {
        let to = self
            .hw
            .fail_attach_to
            .lock()
            .unwrap()
            .iter()
            .any(|(d, prefix)| *d == dev && self.label.starts_with(prefix));
        if to || self.hw.fail_attach.lock().unwrap().contains(&dev) {
            self.hw.push(format!("attach {dev} {} FAILED", self.label));
            return Err(DriverError::Invalid("injected attach failure".into()));
        }
        self.hw.push(format!("attach {dev} {}", self.label));
        self.hw.rid.lock().unwrap().insert(dev, self.label.clone());
        Ok(())
    }
    fn set_dev_pasid(&self, dev: DeviceId, pasid: Pasid) -> Result<(), DriverError> {
        if !self.pasid_ok {
            return Err(DriverError::NotSupported {
                op: "set_dev_pasid",
            });
        }
        if self.hw.fail_pasid.lock().unwrap().contains(&dev) {
            self.hw
                .push(format!("set_pasid {dev} {pasid} {} FAILED", self.label));
            return Err(DriverError::Invalid(
                "injected set_dev_pasid failure".into(),
            ));
        }
        self.hw
            .push(format!("set_pasid {dev} {pasid} {}", self.label));
        self.hw
            .pasid
            .lock()
            .unwrap()
            .insert((dev, pasid), self.label.clone());
        Ok(())
    }
    fn free(&self) {
        self.hw.push(format!("free {}", self.label));
    }
}

/// A paging domain that only records (paging itself is tested with `soft`).
struct TestPaging {
    d: TestDomain,
    maps: Mutex<BTreeMap<u64, u64>>,
}

impl DomainOps for TestPaging {
    fn attach_dev(&self, dev: DeviceId) -> Result<(), DriverError> {
        self.d.attach_dev(dev)
    }
    fn set_dev_pasid(&self, dev: DeviceId, pasid: Pasid) -> Result<(), DriverError> {
        self.d.set_dev_pasid(dev, pasid)
    }
    fn free(&self) {
        self.d.free()
    }
}

impl PagingDomainOps for TestPaging {
    fn pgsize_bitmap(&self) -> u64 {
        (1 << 12) | (1 << 21) | (1 << 30)
    }
    fn ias_bits(&self) -> u32 {
        48
    }
    fn map_pages(
        &self,
        iova: u64,
        paddr: u64,
        pgsize: u64,
        pgcount: u64,
        _prot: Prot,
        _g: &mut IotlbGather,
    ) -> Result<u64, DriverError> {
        let mut m = self.maps.lock().unwrap();
        for i in 0..pgcount {
            m.insert(iova + i * pgsize, paddr + i * pgsize);
        }
        Ok(pgsize * pgcount)
    }
    fn unmap_pages(
        &self,
        iova: u64,
        pgsize: u64,
        pgcount: u64,
        _g: &mut IotlbGather,
    ) -> Result<u64, DriverError> {
        let mut m = self.maps.lock().unwrap();
        let n = m.range(iova..iova + pgsize * pgcount).count() as u64;
        m.retain(|k, _| !(iova..iova + pgsize * pgcount).contains(k));
        Ok(n * 4096)
    }
    fn iotlb_sync(&self, _g: &mut IotlbGather) {}
    fn flush_iotlb_all(&self) {}
    fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.maps.lock().unwrap().get(&(iova & !0xfff)).copied()
    }
}

#[derive(Clone)]
struct Cfg {
    identity: bool,
    blocked: bool,
    release: Option<StaticDomain>,
    default: Option<StaticDomain>,
    platform_dma: bool,
    def_type: Option<DomainType>,
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            identity: true,
            blocked: true,
            release: Some(StaticDomain::Blocked),
            default: None,
            platform_dma: false,
            def_type: None,
        }
    }
}

/// Groups by the name's prefix before '.', e.g. "g1.a" and "g1.b" share a group.
struct TestIommu {
    cfg: Cfg,
    hw: Arc<Hw>,
    deferred: HashSet<String>,
    resv: HashMap<String, Vec<ResvRegion>>,
    names: Mutex<HashMap<DeviceId, String>>,
    next_paging: Mutex<u32>,
}

impl TestIommu {
    fn new(cfg: Cfg) -> Self {
        TestIommu {
            cfg,
            hw: Arc::new(Hw::default()),
            deferred: HashSet::new(),
            resv: HashMap::new(),
            names: Mutex::new(HashMap::new()),
            next_paging: Mutex::new(0),
        }
    }
    fn dom(&self, label: &str) -> TestDomain {
        TestDomain {
            label: label.into(),
            hw: self.hw.clone(),
            pasid_ok: true,
        }
    }
}

impl IommuOps for TestIommu {
    fn name(&self) -> &str {
        "test"
    }
    fn probe_device(&self, dev: DeviceId, desc: &DeviceDesc) -> Result<ProbeInfo, DriverError> {
        self.hw.push(format!("probe {dev}"));
        self.names.lock().unwrap().insert(dev, desc.name.clone());
        Ok(ProbeInfo {
            attach_deferred: self.deferred.contains(&desc.name),
            max_pasids: 16,
        })
    }
    fn release_device(&self, dev: DeviceId) {
        self.hw.push(format!("release {dev}"));
    }
    fn device_group(&self, _dev: DeviceId, desc: &DeviceDesc) -> u64 {
        let prefix = desc.name.split('.').next().unwrap_or("");
        prefix
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
    }
    fn get_resv_regions(&self, dev: DeviceId) -> Vec<ResvRegion> {
        let names = self.names.lock().unwrap();
        names
            .get(&dev)
            .and_then(|n| self.resv.get(n))
            .cloned()
            .unwrap_or_default()
    }
    fn def_domain_type(&self, _dev: DeviceId) -> Option<DomainType> {
        self.cfg.def_type
    }
    fn domain_alloc_paging(&self) -> Result<Arc<dyn PagingDomainOps>, DriverError> {
        let mut n = self.next_paging.lock().unwrap();
        *n += 1;
        Ok(Arc::new(TestPaging {
            d: self.dom(&format!("paging{n}")),
            maps: Mutex::new(BTreeMap::new()),
        }))
    }
    fn domain_alloc_sva(
        &self,
        _dev: DeviceId,
        space: AddressSpaceId,
    ) -> Result<Arc<dyn DomainOps>, DriverError> {
        Ok(Arc::new(self.dom(&format!("sva-{space}"))))
    }
    fn identity_domain(&self) -> Option<Arc<dyn DomainOps>> {
        self.cfg
            .identity
            .then(|| Arc::new(self.dom("identity")) as Arc<dyn DomainOps>)
    }
    fn blocked_domain(&self) -> Option<Arc<dyn DomainOps>> {
        self.cfg
            .blocked
            .then(|| Arc::new(self.dom("blocked")) as Arc<dyn DomainOps>)
    }
    fn release_domain(&self) -> Option<StaticDomain> {
        self.cfg.release
    }
    fn default_domain(&self) -> Option<StaticDomain> {
        self.cfg.default
    }
    fn uses_platform_dma(&self) -> bool {
        self.cfg.platform_dma
    }
    fn set_platform_dma(&self, dev: DeviceId) -> Result<(), DriverError> {
        if !self.cfg.platform_dma {
            return Err(DriverError::NotSupported {
                op: "set_platform_dma",
            });
        }
        self.hw.push(format!("platform_dma {dev}"));
        self.hw.rid.lock().unwrap().insert(dev, "platform".into());
        Ok(())
    }
}

struct Rig {
    core: IommuCore,
    hw: Arc<Hw>,
    inst: iommu::core::InstanceId,
}

fn rig_with(drv: TestIommu) -> Rig {
    let hw = drv.hw.clone();
    let core = IommuCore::new();
    let inst = core.register(Arc::new(drv)).unwrap();
    Rig { core, hw, inst }
}

fn rig(cfg: Cfg) -> Rig {
    rig_with(TestIommu::new(cfg))
}

impl Rig {
    fn probe(&self, name: &str) -> DeviceId {
        self.core
            .probe_device(self.inst, DeviceDesc::new(name))
            .unwrap()
    }
    fn group(&self, d: DeviceId) -> GroupId {
        self.core.group_of(d).unwrap()
    }
    /// Registers a PASID exit handler for `dev` that logs "`who` <device> <what>" to the hardware log.
    fn log_pasid_exits(&self, dev: DeviceId, who: String) {
        let hw = self.hw.clone();
        self.core
            .set_pasid_exit_handler(
                dev,
                Arc::new(move |d, what| {
                    hw.push(format!("{who} {d} {what:?}"));
                    Ok(())
                }),
            )
            .unwrap();
    }
    fn domain_type(&self, d: DeviceId) -> Option<DomainType> {
        self.core.device_status(d).unwrap().domain.map(|i| i.dtype)
    }
    /// Driver ops (name, device) the core called, in order.
    fn calls(&self) -> Vec<(String, Option<DeviceId>, Option<DomainType>)> {
        self.core
            .take_driver_calls()
            .into_iter()
            .map(|c| {
                let dt = match c.op {
                    DriverOp::AttachDev { dtype, .. } | DriverOp::SetDevPasid { dtype, .. } => {
                        Some(dtype)
                    }
                    _ => None,
                };
                (c.op.name().to_string(), c.op.device(), dt)
            })
            .collect()
    }
}

fn direct_region() -> ResvRegion {
    ResvRegion {
        start: 0xe000_0000,
        len: 0x2000,
        kind: ResvType::Direct,
    }
}

// ------------------------------------------------------------------ domain types and free

#[test]
fn free_of_attached_domain_is_refused() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    let refused = r.core.free(dom).unwrap_err();
    assert!(
        matches!(&refused.error, CoreError::StillAttached { groups, .. } if groups == &vec![g]),
        "{refused}"
    );
    assert!(!r.hw.log().iter().any(|l| l.starts_with("free paging")));
    // The handle came back: the caller still owns the domain and can map with it.
    let dom = refused.domain;
    r.core.map(&dom, 0, 0, 4096, Prot::RW).unwrap();
    r.core.attach(g, VM, Target::Blocked).unwrap();
    r.core.free(dom).unwrap();
    assert!(r.hw.log().iter().any(|l| l.starts_with("free paging")));
}

#[test]
fn free_of_domain_set_on_a_pasid_is_refused() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let sva = r.core.alloc_sva(d, AddressSpaceId(1)).unwrap();
    r.core
        .set_dev_pasid(d, Pasid(3), PasidTarget::Sva(&sva))
        .unwrap();
    let refused = r.core.free(sva).unwrap_err();
    assert!(
        matches!(&refused.error, CoreError::StillAttached { pasids, .. } if pasids == &vec![(d, Pasid(3))])
    );
    r.core.remove_dev_pasid(d, Pasid(3)).unwrap();
    r.core.free(refused.domain).unwrap();
}

#[test]
fn domain_handles_are_checked_against_their_core() {
    let r1 = rig(Cfg::default());
    let r2 = rig(Cfg::default());
    let dom = r1.core.alloc_paging(r1.inst).unwrap();
    assert!(matches!(
        r2.core.map(&dom, 0, 0, 4096, Prot::RW),
        Err(CoreError::ForeignDomain(_))
    ));
    let refused = r2.core.free(dom).unwrap_err();
    r1.core.free(refused.domain).unwrap();
}

// ------------------------------------------------------------------ no detach, ownership

#[test]
fn no_detach_release_ownership_restores_default_domain() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    let default = r.core.group_domain(g).unwrap().unwrap();
    assert_eq!(default.dtype, DomainType::Paging);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    r.calls();
    r.core.release_dma_owner(g, VM).unwrap();
    // Leaving the guest's domain is one attach: of the default domain. Nothing else touched.
    assert_eq!(
        r.calls(),
        vec![("attach_dev".into(), Some(d), Some(DomainType::Paging))]
    );
    assert_eq!(r.core.group_domain(g).unwrap(), Some(default));
    assert_eq!(r.core.group_owner(g).unwrap(), DmaOwner::Host);
    assert_eq!(r.hw.rid_of(d), Some("paging1".into()));
    r.core.free(dom).unwrap();
}

#[test]
fn claim_ownership_attaches_blocked_first() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    let dom = r.core.alloc_paging(r.inst).unwrap();
    // A host-owned group takes no guest domain.
    assert!(matches!(
        r.core.attach(g, VM, Target::Paging(&dom)),
        Err(CoreError::NotOwned(_))
    ));
    r.calls();
    r.core.claim_dma_owner(g, VM).unwrap();
    assert_eq!(
        r.calls(),
        vec![("attach_dev".into(), Some(d), Some(DomainType::Blocked))]
    );
    assert_eq!(r.core.group_owner(g).unwrap(), DmaOwner::Guest(VM));
    assert_eq!(r.hw.rid_of(d), Some("blocked".into()));
    // Another owner cannot take it.
    assert!(matches!(
        r.core.claim_dma_owner(g, OwnerId(8)),
        Err(CoreError::OwnedByOther { .. })
    ));
    assert!(matches!(
        r.core.attach(g, OwnerId(8), Target::Paging(&dom)),
        Err(CoreError::OwnedByOther { .. })
    ));
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    assert_eq!(r.domain_type(d), Some(DomainType::Paging));
}

#[test]
fn claim_without_static_blocked_domain_uses_an_empty_paging_domain() {
    let r = rig(Cfg {
        blocked: false,
        release: None,
        ..Cfg::default()
    });
    let d = r.probe("a");
    let g = r.group(d);
    let default = r.core.group_domain(g).unwrap();
    r.core.claim_dma_owner(g, VM).unwrap();
    let blocking = r.core.device_status(d).unwrap().domain;
    assert_eq!(blocking.unwrap().dtype, DomainType::Paging);
    assert_ne!(blocking, default);
    assert_eq!(
        r.hw.rid_of(d),
        Some("paging2".into()),
        "an empty paging domain"
    );
    // Releasing ownership moves back to the default domain.
    r.core.release_dma_owner(g, VM).unwrap();
    assert_eq!(r.core.device_status(d).unwrap().domain, default);
}

#[test]
fn instance_without_default_uses_set_platform_dma() {
    let r = rig(Cfg {
        platform_dma: true,
        ..Cfg::default()
    });
    let a = r.probe("g.a");
    let b = r.probe("g.b");
    let g = r.group(a);
    assert_eq!(r.group(b), g);
    // No default domain: probe attaches nothing.
    assert!(!r.calls().iter().any(|c| c.0 == "attach_dev"));
    assert_eq!(r.core.group_domain(g).unwrap(), None);
    r.core.claim_dma_owner(g, VM).unwrap();
    r.calls();
    r.core.release_dma_owner(g, VM).unwrap();
    assert_eq!(
        r.calls(),
        vec![
            ("set_platform_dma".into(), Some(a), None),
            ("set_platform_dma".into(), Some(b), None)
        ]
    );
    assert_eq!(r.core.group_domain(g).unwrap(), None);
    assert_eq!(r.hw.rid_of(a), Some("platform".into()));
}

#[test]
fn static_default_domain_is_used_for_every_group() {
    let r = rig(Cfg {
        default: Some(StaticDomain::Identity),
        ..Cfg::default()
    });
    let a = r.probe("a");
    let b = r.probe("b");
    assert_ne!(r.group(a), r.group(b));
    assert_eq!(r.domain_type(a), Some(DomainType::Identity));
    assert_eq!(r.domain_type(b), Some(DomainType::Identity));
    assert!(!r.calls().iter().any(|c| c.0 == "domain_alloc"));
}

// ------------------------------------------------------------------ groups

#[test]
fn group_devices_always_share_domain() {
    let r = rig(Cfg::default());
    let devs: Vec<DeviceId> = ["g.a", "g.b", "g.c"].iter().map(|n| r.probe(n)).collect();
    let g = r.group(devs[0]);
    assert!(devs.iter().all(|d| r.group(*d) == g));
    assert_eq!(r.core.group_devices(g).unwrap(), devs);
    let same = |r: &Rig| {
        let doms: Vec<_> = devs
            .iter()
            .map(|d| r.core.device_status(*d).unwrap().domain)
            .collect();
        let hw: Vec<_> = devs.iter().map(|d| r.hw.rid_of(*d)).collect();
        assert!(doms.windows(2).all(|w| w[0] == w[1]), "core: {doms:?}");
        assert!(hw.windows(2).all(|w| w[0] == w[1]), "hardware: {hw:?}");
        doms[0]
    };
    same(&r);
    r.core.claim_dma_owner(g, VM).unwrap();
    let blocked = same(&r);
    // The driver fails the attach of the last device: the first two are rolled back.
    r.hw.fail_attach.lock().unwrap().insert(devs[2]);
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.hw.clear();
    let err = r.core.attach(g, VM, Target::Paging(&dom)).unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::Driver {
                op: "attach_dev",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(same(&r), blocked);
    assert_eq!(
        r.hw.log(),
        vec![
            format!("attach {} paging2", devs[0]),
            format!("attach {} paging2", devs[1]),
            format!("attach {} paging2 FAILED", devs[2]),
            format!("attach {} blocked", devs[0]),
            format!("attach {} blocked", devs[1]),
        ]
    );
    r.hw.fail_attach.lock().unwrap().clear();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    assert_eq!(same(&r).unwrap().id, dom.id());
    // A device probed into a guest-held group joins the group's current domain.
    let late = r.probe("g.d");
    assert_eq!(
        r.core.device_status(late).unwrap().domain.unwrap().id,
        dom.id()
    );
}

#[test]
fn policy_refusal_in_a_group_touches_no_device() {
    let mut drv = TestIommu::new(Cfg::default());
    drv.resv.insert("g.b".into(), vec![direct_region()]);
    let r = rig_with(drv);
    let a = r.probe("g.a");
    let _b = r.probe("g.b");
    let g = r.group(a);
    r.calls();
    let err = r.core.claim_dma_owner(g, VM).unwrap_err();
    assert!(matches!(err, CoreError::RequireDirect { .. }));
    assert!(r.calls().is_empty(), "a refused attach must touch nothing");
    assert_eq!(r.core.group_owner(g).unwrap(), DmaOwner::Host);
}

// ------------------------------------------------------------------ release

#[test]
fn release_without_deferred_attach_touches_no_hardware() {
    let mut drv = TestIommu::new(Cfg::default());
    drv.deferred.insert("kdump".into());
    let r = rig_with(drv);
    let d = r.probe("kdump");
    assert!(r.core.device_status(d).unwrap().attach_deferred);
    r.core.release_device(d).unwrap();
    let touched: Vec<_> = r
        .core
        .driver_calls()
        .into_iter()
        .filter(|c| c.op.device() == Some(d) && c.op.touches_device_translation())
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
    assert_eq!(
        r.hw.log(),
        vec![
            format!("probe {d}"),
            format!("release {d}"),
            "free paging1".to_string() // the group's default domain, freed with the group
        ]
    );
}

#[test]
fn release_after_deferred_attach_attaches_release_domain() {
    let mut drv = TestIommu::new(Cfg::default());
    drv.deferred.insert("kdump".into());
    let r = rig_with(drv);
    let d = r.probe("kdump");
    r.core.deferred_attach(d).unwrap();
    assert!(!r.core.device_status(d).unwrap().attach_deferred);
    r.hw.clear();
    r.core.release_device(d).unwrap();
    assert_eq!(
        r.hw.log(),
        vec![
            format!("attach {d} blocked"),
            format!("release {d}"),
            "free paging1".to_string()
        ]
    );
}

#[test]
fn deferred_device_is_attached_by_its_first_non_default_attach() {
    let mut drv = TestIommu::new(Cfg::default());
    drv.deferred.insert("kdump".into());
    let r = rig_with(drv);
    let d = r.probe("kdump");
    r.core.claim_dma_owner(r.group(d), VM).unwrap();
    assert!(!r.core.device_status(d).unwrap().attach_deferred);
    assert_eq!(r.hw.rid_of(d), Some("blocked".into()));
}

#[test]
fn release_attaches_release_domain_before_release_device() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    r.calls();
    r.core.release_device(d).unwrap();
    let calls = r.calls();
    assert_eq!(
        &calls[..2],
        &[
            ("attach_dev".into(), Some(d), Some(DomainType::Blocked)),
            ("release_device".into(), Some(d), None)
        ]
    );
    // The group went with its last device; its default domain was freed by the core, and the
    // guest's domain is no longer attached anywhere.
    assert!(matches!(
        r.core.group_devices(g),
        Err(CoreError::UnknownGroup(_))
    ));
    assert!(calls.iter().any(|c| c.0 == "free"));
    r.core.free(dom).unwrap();
    assert!(matches!(
        r.core.device_status(d),
        Err(CoreError::UnknownDevice(_))
    ));
}

#[test]
fn release_without_release_domain_only_calls_release_device() {
    let r = rig(Cfg {
        release: None,
        ..Cfg::default()
    });
    let d = r.probe("a");
    r.calls();
    r.core.release_device(d).unwrap();
    assert_eq!(r.calls()[0], ("release_device".into(), Some(d), None));
}

#[test]
fn release_attaches_identity_release_domain_when_the_instance_names_it() {
    let r = rig(Cfg {
        release: Some(StaticDomain::Identity),
        ..Cfg::default()
    });
    let d = r.probe("a");
    let g = r.group(d);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    r.hw.clear();
    r.core.release_device(d).unwrap();
    assert_eq!(
        r.hw.log(),
        vec![
            format!("attach {d} identity"),
            format!("release {d}"),
            "free paging1".to_string()
        ]
    );
    r.core.free(dom).unwrap();
}

#[test]
fn release_device_is_not_called_when_the_release_domain_attach_fails() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    r.hw.fail_attach.lock().unwrap().insert(d);
    r.hw.clear();
    let err = r.core.release_device(d).unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::Driver {
                op: "attach_dev",
                ..
            }
        ),
        "{err}"
    );
    // release_device did not run on a device still translating through the guest's domain, and
    // that domain cannot be freed under it.
    assert_eq!(r.hw.log(), vec![format!("attach {d} blocked FAILED")]);
    assert_eq!(
        r.core.device_status(d).unwrap().domain.unwrap().id,
        dom.id()
    );
    let refused = r.core.free(dom).unwrap_err();
    assert!(matches!(refused.error, CoreError::StillAttached { .. }));
    // Once the release domain can be attached, the release completes in order.
    r.hw.fail_attach.lock().unwrap().clear();
    r.hw.clear();
    r.core.release_device(d).unwrap();
    assert_eq!(
        r.hw.log(),
        vec![
            format!("attach {d} blocked"),
            format!("release {d}"),
            "free paging1".to_string()
        ]
    );
    r.core.free(refused.domain).unwrap();
}

#[test]
fn release_of_require_direct_uses_identity_instead_of_blocked() {
    let mut drv = TestIommu::new(Cfg::default());
    drv.resv.insert("rmr".into(), vec![direct_region()]);
    let r = rig_with(drv);
    let d = r.probe("rmr");
    assert!(r.core.device_status(d).unwrap().require_direct);
    r.hw.clear();
    r.core.release_device(d).unwrap();
    assert_eq!(
        r.hw.log(),
        vec![
            format!("attach {d} identity"),
            format!("release {d}"),
            "free paging1".to_string()
        ]
    );
}

#[test]
fn release_of_require_direct_without_identity_attaches_nothing() {
    let mut drv = TestIommu::new(Cfg {
        identity: false,
        ..Cfg::default()
    });
    drv.resv.insert("rmr".into(), vec![direct_region()]);
    let r = rig_with(drv);
    let d = r.probe("rmr");
    r.hw.clear();
    r.core.release_device(d).unwrap();
    assert_eq!(
        r.hw.log(),
        vec![format!("release {d}"), "free paging1".to_string()]
    );
}

#[test]
fn blocked_attach_refused_for_require_direct_with_reason() {
    let mut drv = TestIommu::new(Cfg::default());
    drv.resv.insert("rmr".into(), vec![direct_region()]);
    let r = rig_with(drv);
    let d = r.probe("rmr");
    let g = r.group(d);
    r.calls();
    let err = r.core.claim_dma_owner(g, VM).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CoreError::RequireDirect { dev, .. } if dev == d));
    assert!(msg.contains("firmware requires a 1:1 mapping"), "{msg}");
    assert!(msg.contains("rmr"), "{msg}");
    assert!(r.calls().is_empty());
    assert_eq!(r.core.group_owner(g).unwrap(), DmaOwner::Host);
}

#[test]
fn blocked_attach_refused_for_require_direct_without_static_blocked_domain() {
    let mut drv = TestIommu::new(Cfg {
        blocked: false,
        release: None,
        ..Cfg::default()
    });
    drv.resv.insert("rmr".into(), vec![direct_region()]);
    let r = rig_with(drv);
    let d = r.probe("rmr");
    let g = r.group(d);
    r.calls();
    // The group's blocking domain is an empty paging domain here: it blocks as the static one does,
    // so it is refused the same way.
    let err = r.core.claim_dma_owner(g, VM).unwrap_err();
    assert!(
        matches!(err, CoreError::RequireDirect { dev, .. } if dev == d),
        "{err}"
    );
    assert!(!r.calls().iter().any(|c| c.0 == "attach_dev"));
    assert_eq!(r.hw.rid_of(d), Some("paging1".into()));
    assert_eq!(r.core.group_owner(g).unwrap(), DmaOwner::Host);
}

#[test]
fn relaxable_direct_regions_do_not_make_require_direct() {
    let mut drv = TestIommu::new(Cfg::default());
    drv.resv.insert(
        "usb".into(),
        vec![ResvRegion {
            kind: ResvType::DirectRelaxable,
            ..direct_region()
        }],
    );
    let r = rig_with(drv);
    let d = r.probe("usb");
    assert!(!r.core.device_status(d).unwrap().require_direct);
    r.core.claim_dma_owner(r.group(d), VM).unwrap();
}

#[test]
fn direct_regions_are_mapped_1to1_in_the_default_paging_domain() {
    let mut drv = TestIommu::new(Cfg::default());
    drv.resv.insert("rmr".into(), vec![direct_region()]);
    let r = rig_with(drv);
    let d = r.probe("rmr");
    let maps: Vec<_> = r
        .core
        .driver_calls()
        .into_iter()
        .filter_map(|c| match c.op {
            DriverOp::MapPages { iova, pgsize, .. } => Some((iova, pgsize)),
            _ => None,
        })
        .collect();
    assert_eq!(maps, vec![(0xe000_0000, 4096), (0xe000_1000, 4096)]);
    assert_eq!(r.domain_type(d), Some(DomainType::Paging));
}

// ------------------------------------------------------------------ I/O page faults

#[test]
fn iopf_refcount_checked_on_blocked_and_identity_attach() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    // A device driver still relies on page faults: blocked refused, nothing touched.
    assert_eq!(r.core.iopf_get(d).unwrap(), 1);
    r.calls();
    let err = r.core.claim_dma_owner(g, VM).unwrap_err();
    assert!(
        matches!(err, CoreError::IopfRefcount { dev, count: 1, dtype: DomainType::Blocked } if dev == d),
        "{err}"
    );
    assert!(r.calls().is_empty());
    r.core.iopf_put(d).unwrap();
    r.core.claim_dma_owner(g, VM).unwrap();
    // Identity is checked too.
    r.core.iopf_get(d).unwrap();
    assert!(matches!(
        r.core.attach(g, VM, Target::Identity),
        Err(CoreError::IopfRefcount {
            dtype: DomainType::Identity,
            ..
        })
    ));
    r.core.iopf_put(d).unwrap();
    r.core.attach(g, VM, Target::Identity).unwrap();
}

#[test]
fn iopf_refcount_checked_on_blocked_attach_without_static_blocked_domain() {
    let r = rig(Cfg {
        blocked: false,
        release: None,
        ..Cfg::default()
    });
    let d = r.probe("a");
    let g = r.group(d);
    // The group's blocking domain is an empty paging domain: checked as a blocked one.
    r.core.iopf_get(d).unwrap();
    r.calls();
    let err = r.core.claim_dma_owner(g, VM).unwrap_err();
    assert!(
        matches!(err, CoreError::IopfRefcount { dev, count: 1, dtype: DomainType::Blocked } if dev == d),
        "the empty paging domain that stands for blocked is named blocked: {err}"
    );
    assert!(!r.calls().iter().any(|c| c.0 == "attach_dev"));
    assert_eq!(r.core.group_owner(g).unwrap(), DmaOwner::Host);
    r.core.iopf_put(d).unwrap();
    r.core.claim_dma_owner(g, VM).unwrap();
}

#[test]
fn iopf_reference_of_a_fault_capable_domain_is_dropped_by_the_replacing_attach() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging_iopf(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    assert_eq!(r.core.device_status(d).unwrap().iopf_refcount, 1);
    r.core.attach(g, VM, Target::Blocked).unwrap();
    assert_eq!(r.core.device_status(d).unwrap().iopf_refcount, 0);
}

#[test]
fn iopf_check_applies_only_with_no_pasid_attached() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    let sva = r.core.alloc_sva(d, AddressSpaceId(9)).unwrap();
    r.core
        .set_dev_pasid(d, Pasid(1), PasidTarget::Sva(&sva))
        .unwrap();
    assert_eq!(r.core.device_status(d).unwrap().iopf_refcount, 1);
    // The SVA PASID legitimately holds a fault reference: blocked on the RID is fine.
    r.core.claim_dma_owner(g, VM).unwrap();
    assert_eq!(r.domain_type(d), Some(DomainType::Blocked));
    r.core.remove_dev_pasid(d, Pasid(1)).unwrap();
    assert_eq!(r.core.device_status(d).unwrap().iopf_refcount, 0);
}

// ------------------------------------------------------------------ PASIDs

#[test]
fn pasid_exit_handler_called_per_device_before_domain_removed() {
    let r = rig(Cfg::default());
    // Two devices of one group, driven by different drivers, bound to the same address space.
    let a = r.probe("g.nic");
    let b = r.probe("g.accel");
    assert_eq!(r.group(a), r.group(b));
    let space = AddressSpaceId(42);
    let sva_a = r.core.alloc_sva(a, space).unwrap();
    let sva_b = r.core.alloc_sva(b, space).unwrap();
    r.core
        .set_dev_pasid(a, Pasid(5), PasidTarget::Sva(&sva_a))
        .unwrap();
    r.core
        .set_dev_pasid(b, Pasid(6), PasidTarget::Sva(&sva_b))
        .unwrap();
    for (dev, driver) in [(a, "nic-driver"), (b, "accel-driver")] {
        r.log_pasid_exits(dev, format!("{driver} stops"));
    }
    r.hw.clear();
    let removed = r.core.address_space_exit(space).unwrap();
    assert_eq!(removed, vec![(a, Pasid(5)), (b, Pasid(6))]);
    assert_eq!(
        r.hw.log(),
        vec![
            format!("nic-driver stops {a} Pasid(Pasid(5))"),
            format!("set_pasid {a} pasid5 blocked"),
            format!("accel-driver stops {b} Pasid(Pasid(6))"),
            format!("set_pasid {b} pasid6 blocked"),
        ]
    );
    assert!(r.core.device_status(a).unwrap().pasids.is_empty());
    r.core.free(sva_a).unwrap();
    r.core.free(sva_b).unwrap();
}

#[test]
fn address_space_exit_reaches_every_device_even_when_one_fails() {
    let r = rig(Cfg::default());
    let a = r.probe("a");
    let b = r.probe("b");
    let space = AddressSpaceId(9);
    let sva_a = r.core.alloc_sva(a, space).unwrap();
    let sva_b = r.core.alloc_sva(b, space).unwrap();
    r.core
        .set_dev_pasid(a, Pasid(1), PasidTarget::Sva(&sva_a))
        .unwrap();
    r.core
        .set_dev_pasid(b, Pasid(2), PasidTarget::Sva(&sva_b))
        .unwrap();
    for dev in [a, b] {
        r.log_pasid_exits(dev, "stop".into());
    }
    // a's driver cannot take its PASID off the ended address space: b is still told and cleaned up.
    r.hw.fail_pasid.lock().unwrap().insert(a);
    r.hw.clear();
    let err = r.core.address_space_exit(space).unwrap_err();
    assert!(matches!(err, CoreError::Driver { .. }), "{err}");
    let log = r.hw.log();
    assert!(
        log.contains(&format!("stop {b} Pasid(Pasid(2))")),
        "{log:?}"
    );
    assert!(
        log.contains(&format!("set_pasid {b} pasid2 blocked")),
        "{log:?}"
    );
    assert!(r.core.device_status(b).unwrap().pasids.is_empty());
    // Once a's driver works again, the exit completes for a too.
    r.hw.fail_pasid.lock().unwrap().clear();
    assert_eq!(
        r.core.address_space_exit(space).unwrap(),
        vec![(a, Pasid(1))]
    );
    r.core.free(sva_a).unwrap();
    r.core.free(sva_b).unwrap();
}

#[test]
fn pasid_exit_handler_called_only_for_the_pasids_of_the_ended_address_space() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let ended = r.core.alloc_sva(d, AddressSpaceId(1)).unwrap();
    let other = r.core.alloc_sva(d, AddressSpaceId(2)).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core
        .set_dev_pasid(d, Pasid(1), PasidTarget::Sva(&ended))
        .unwrap();
    r.core
        .set_dev_pasid(d, Pasid(2), PasidTarget::Sva(&other))
        .unwrap();
    r.core
        .set_dev_pasid(d, Pasid(3), PasidTarget::Paging(&dom))
        .unwrap();
    r.log_pasid_exits(d, "handler".into());
    r.hw.clear();
    let removed = r.core.address_space_exit(AddressSpaceId(1)).unwrap();
    assert_eq!(removed, vec![(d, Pasid(1))]);
    assert_eq!(
        r.hw.log(),
        vec![
            format!("handler {d} {:?}", PasidExit::Pasid(Pasid(1))),
            format!("set_pasid {d} pasid1 blocked"),
        ]
    );
    let left: Vec<Pasid> = r
        .core
        .device_status(d)
        .unwrap()
        .pasids
        .iter()
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(left, vec![Pasid(2), Pasid(3)]);
    r.core.free(ended).unwrap();
    r.core.remove_dev_pasid(d, Pasid(2)).unwrap();
    r.core.remove_dev_pasid(d, Pasid(3)).unwrap();
    r.core.free(other).unwrap();
    r.core.free(dom).unwrap();
}

#[test]
fn pasid_exit_handler_told_all_before_release_removes_pasids() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let dom = r.core.alloc_paging(r.inst).unwrap();
    let sva = r.core.alloc_sva(d, AddressSpaceId(1)).unwrap();
    r.core
        .set_dev_pasid(d, Pasid(1), PasidTarget::Sva(&sva))
        .unwrap();
    r.core
        .set_dev_pasid(d, Pasid(2), PasidTarget::Paging(&dom))
        .unwrap();
    let hw = r.hw.clone();
    r.core
        .set_pasid_exit_handler(
            d,
            Arc::new(move |d, what| {
                hw.push(format!("handler {d} {what:?}"));
                Err("device did not ack".into())
            }),
        )
        .unwrap();
    r.hw.clear();
    r.core.release_device(d).unwrap();
    assert_eq!(
        r.hw.log(),
        vec![
            format!("handler {d} {:?}", PasidExit::All),
            format!("set_pasid {d} pasid1 blocked"),
            format!("set_pasid {d} pasid2 blocked"),
            format!("attach {d} blocked"),
            format!("release {d}"),
            "free paging1".to_string(),
        ]
    );
    r.core.free(sva).unwrap();
    r.core.free(dom).unwrap();
}

#[test]
fn pasid_exit_handler_told_all_before_giving_back_removes_pasids() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    r.core.claim_dma_owner(g, VM).unwrap();
    let sva = r.core.alloc_sva(d, AddressSpaceId(3)).unwrap();
    r.core
        .set_dev_pasid(d, Pasid(1), PasidTarget::Sva(&sva))
        .unwrap();
    r.log_pasid_exits(d, "handler".into());
    r.hw.clear();
    // The host takes the group back: none of the guest's PASID domains stays on the device.
    r.core.release_dma_owner(g, VM).unwrap();
    assert_eq!(
        r.hw.log(),
        vec![
            format!("handler {d} {:?}", PasidExit::All),
            format!("set_pasid {d} pasid1 blocked"),
            format!("attach {d} paging1"),
        ]
    );
    assert!(r.core.device_status(d).unwrap().pasids.is_empty());
    r.core.free(sva).unwrap();
}

#[test]
fn pasid_out_of_range_is_refused() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let sva = r.core.alloc_sva(d, AddressSpaceId(1)).unwrap();
    assert!(matches!(
        r.core.set_dev_pasid(d, Pasid(16), PasidTarget::Sva(&sva)),
        Err(CoreError::PasidOutOfRange { max: 16, .. })
    ));
}

// ------------------------------------------------------------------ parked

#[test]
fn park_is_visible_and_plug_makes_the_group_attachable_again() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    r.hw.clear();
    r.core.park(g, VM).unwrap();
    assert_eq!(r.hw.log(), vec![format!("attach {d} blocked")]);
    let st = r.core.device_status(d).unwrap();
    assert_eq!(st.owner, DmaOwner::Parked(VM));
    assert_eq!(st.domain.unwrap().dtype, DomainType::Blocked);
    assert!(r
        .core
        .devices()
        .iter()
        .any(|s| s.owner == DmaOwner::Parked(VM)));
    // Parked: no domain can be attached until plugged.
    assert!(matches!(
        r.core.attach(g, VM, Target::Paging(&dom)),
        Err(CoreError::Parked(_))
    ));
    r.core.plug(g, VM).unwrap();
    assert_eq!(r.core.group_owner(g).unwrap(), DmaOwner::Guest(VM));
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    assert!(matches!(r.core.plug(g, VM), Err(CoreError::NotParked(_))));
}

#[test]
fn free_is_refused_while_a_device_left_behind_by_a_failed_rollback_uses_the_domain() {
    let r = rig(Cfg::default());
    let a = r.probe("g.a");
    let b = r.probe("g.b");
    let g = r.group(a);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    // b's attach fails, and so does a's way back to blocked: a is left in `dom`, the group is not.
    r.hw.fail_attach_to.lock().unwrap().insert((b, "paging"));
    r.hw.fail_attach_to.lock().unwrap().insert((a, "blocked"));
    let err = r.core.attach(g, VM, Target::Paging(&dom)).unwrap_err();
    assert!(matches!(err, CoreError::RollbackFailed { .. }), "{err}");
    assert!(r.hw.rid_of(a).is_some_and(|l| l.starts_with("paging")));
    // The domain a's hardware still points at cannot be freed.
    let refused = r.core.free(dom).unwrap_err();
    assert!(
        matches!(refused.error, CoreError::StillAttached { ref groups, .. } if groups == &[g]),
        "{}",
        refused.error
    );
    // Once the driver works again and the group is moved, it can.
    r.hw.fail_attach_to.lock().unwrap().clear();
    r.core.attach(g, VM, Target::Blocked).unwrap();
    r.core.free(refused.domain).unwrap();
}

#[test]
fn leaving_the_guest_is_never_refused_for_a_leaked_fault_reference() {
    let r = rig(Cfg::default());
    let d = r.probe("a");
    let g = r.group(d);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    let in_guest = r.hw.rid_of(d);
    assert!(in_guest.is_some() && in_guest.as_deref() != Some("blocked"));
    // A fault reference leaks while the device is in its guest's domain.
    r.core.iopf_get(d).unwrap();
    // Attaching blocked to use it is refused (the rule) ...
    assert!(matches!(
        r.core.attach(g, VM, Target::Blocked),
        Err(CoreError::IopfRefcount { .. })
    ));
    assert_eq!(r.hw.rid_of(d), in_guest);
    // ... but parking still blocks it: refusing would leave it reaching the guest's memory.
    r.core.park(g, VM).unwrap();
    assert_eq!(r.hw.rid_of(d).as_deref(), Some("blocked"));
    assert_eq!(r.core.device_status(d).unwrap().owner, DmaOwner::Parked(VM));
    // And so does release.
    r.core.plug(g, VM).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    r.hw.clear();
    r.core.release_device(d).unwrap();
    let log = r.hw.log();
    assert_eq!(log.first(), Some(&format!("attach {d} blocked")), "{log:?}");
    r.core.free(dom).unwrap();
}

#[test]
fn probe_failure_leaves_nothing_behind() {
    let mut drv = TestIommu::new(Cfg::default());
    drv.resv.insert("g.rmr".into(), vec![direct_region()]);
    let r = rig_with(drv);
    let a = r.probe("g.a");
    let g = r.group(a);
    r.core.claim_dma_owner(g, VM).unwrap();
    // A require_direct device cannot join a group that sits in the blocked domain.
    let err = r
        .core
        .probe_device(r.inst, DeviceDesc::new("g.rmr"))
        .unwrap_err();
    assert!(matches!(err, CoreError::RequireDirect { .. }));
    assert_eq!(r.core.group_devices(g).unwrap(), vec![a]);
    assert_eq!(r.core.devices().len(), 1);
    let log = r.hw.log();
    assert_eq!(log.last().map(|s| s.starts_with("release")), Some(true));
}

#[test]
fn an_instance_must_provide_the_static_domains_it_names() {
    let core = IommuCore::new();
    let err = core
        .register(Arc::new(TestIommu::new(Cfg {
            blocked: false,
            release: Some(StaticDomain::Blocked),
            ..Cfg::default()
        })))
        .unwrap_err();
    assert!(matches!(err, CoreError::Missing { .. }), "{err}");
    let err = core
        .register(Arc::new(TestIommu::new(Cfg {
            platform_dma: true,
            default: Some(StaticDomain::Identity),
            ..Cfg::default()
        })))
        .unwrap_err();
    assert!(matches!(err, CoreError::Missing { .. }), "{err}");
    // Nothing was left behind: the next instance gets the first id.
    let id = core
        .register(Arc::new(TestIommu::new(Cfg::default())))
        .unwrap();
    assert_eq!(id.0, 0);
}
