//! The rules seen from the DMA path: the `soft` instance over the real stage-2 page tables.

use std::sync::Arc;

use iommu::core::{
    Access, AddressSpaceId, CoreError, DeviceDesc, DeviceId, DmaOwner, DomainType, DriverOp,
    GroupId, InstanceId, IommuCore, OwnerId, Pasid, PasidTarget, Prot, Target,
};
use iommu::pt::{self, IoPageTable};
use iommu::soft::{Fault, SoftIommu};

const VM: OwnerId = OwnerId(1);
const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

struct Rig {
    core: IommuCore,
    soft: Arc<SoftIommu>,
    inst: InstanceId,
}

fn rig() -> Rig {
    let core = IommuCore::new();
    let soft = SoftIommu::new();
    let inst = core.register(soft.clone()).unwrap();
    Rig { core, soft, inst }
}

impl Rig {
    fn probe(&self, name: &str, rid: u16) -> (DeviceId, GroupId) {
        let d = self
            .core
            .probe_device(self.inst, DeviceDesc::with_rid(name, rid))
            .unwrap();
        (d, self.core.group_of(d).unwrap())
    }
    fn tr(&self, d: DeviceId, iova: u64, a: Access) -> Result<u64, Fault> {
        self.soft.translate(d, None, iova, a)
    }
}

#[test]
fn host_owned_soft_device_is_in_identity_output_equals_input() {
    let r = rig();
    let (d, g) = r.probe("virtio-net", 0x08);
    assert_eq!(r.core.group_owner(g).unwrap(), DmaOwner::Host);
    assert_eq!(
        r.core.group_domain(g).unwrap().unwrap().dtype,
        DomainType::Identity
    );
    assert_eq!(r.tr(d, 0x1234_5678, Access::Write), Ok(0x1234_5678));
}

#[test]
fn claimed_device_reaches_nothing_until_its_guest_attaches_a_domain() {
    let r = rig();
    let (d, g) = r.probe("nic", 0x08);
    r.core.claim_dma_owner(g, VM).unwrap();
    assert_eq!(r.tr(d, 0x1000, Access::Read), Err(Fault::Blocked));
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.map(&dom, 0x1000, 0x8000_0000, K4, Prot::RW).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    assert_eq!(r.tr(d, 0x1abc, Access::Read), Ok(0x8000_0abc));
}

#[test]
fn parked_device_reaches_no_memory() {
    let r = rig();
    let (d, g) = r.probe("nic", 0x08);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.map(&dom, 0, 0, G1, Prot::RW).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    let mut port = r.soft.port(d, None);
    assert_eq!(port.translate(0x4000, Access::Write), Ok(0x4000));
    // A PASID too: parking must take every path away.
    r.core
        .set_dev_pasid(d, Pasid(3), PasidTarget::Paging(&dom))
        .unwrap();
    assert_eq!(
        r.soft.translate(d, Some(Pasid(3)), 0x4000, Access::Read),
        Ok(0x4000)
    );

    r.core.park(g, VM).unwrap();
    assert_eq!(r.core.group_owner(g).unwrap(), DmaOwner::Parked(VM));
    for iova in [0, 0x4000, G1 - K4, 0xdead_b000] {
        for a in [Access::Read, Access::Write] {
            assert_eq!(r.tr(d, iova, a), Err(Fault::Blocked));
            assert_eq!(port.translate(iova, a), Err(Fault::Blocked));
            assert!(r.soft.translate(d, Some(Pasid(3)), iova, a).is_err());
        }
    }
    // Still held: plugged again, the guest's domain (still mapped) works again.
    r.core.plug(g, VM).unwrap();
    assert_eq!(r.tr(d, 0x4000, Access::Read), Err(Fault::Blocked));
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    assert_eq!(port.translate(0x4000, Access::Read), Ok(0x4000));
}

#[test]
fn translate_faults_are_recorded() {
    let r = rig();
    let (d, g) = r.probe("nic", 0x08);
    r.core.claim_dma_owner(g, VM).unwrap();
    let _ = r.tr(d, 0x1000, Access::Read); // Blocked
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.map(&dom, 0x2000, 0x9000, K4, Prot::READ).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    let _ = r.tr(d, 0x5000, Access::Read); // NotMapped
    let _ = r.tr(d, 0x2010, Access::Write); // Permission
    let _ = r.soft.translate(d, Some(Pasid(4)), 0x2000, Access::Read); // NoDomain
    let _ = r.tr(DeviceId(999), 0, Access::Read); // UnknownDevice
    assert_eq!(r.tr(d, 0x2010, Access::Read), Ok(0x9010)); // not a fault

    let faults = r.soft.faults().recent();
    let kinds: Vec<Fault> = faults.iter().map(|f| f.fault).collect();
    assert_eq!(
        kinds,
        vec![
            Fault::Blocked,
            Fault::NotMapped,
            Fault::Permission,
            Fault::NoDomain,
            Fault::UnknownDevice
        ]
    );
    assert_eq!(faults[2].dev, d);
    assert_eq!(faults[2].iova, 0x2010);
    assert_eq!(faults[2].access, Access::Write);
    assert_eq!(faults[3].pasid, Some(Pasid(4)));
    let c = r.soft.faults().counts();
    assert_eq!(
        (
            c.total,
            c.blocked,
            c.not_mapped,
            c.permission,
            c.no_domain,
            c.unknown_device
        ),
        (5, 1, 1, 1, 1, 1)
    );
    // Each fault says why.
    assert!(Fault::Blocked.to_string().contains("blocked"));
    assert_eq!(r.soft.faults().drain().len(), 5);
    assert!(r.soft.faults().recent().is_empty());
}

#[test]
fn fault_log_is_a_bounded_ring_that_counts_what_it_dropped() {
    let core = IommuCore::new();
    let soft = SoftIommu::with_fault_log(4);
    core.register(soft.clone()).unwrap();
    for i in 0..10u64 {
        let _ = soft.translate(DeviceId(77), None, i * K4, Access::Read);
    }
    let recent = soft.faults().recent();
    assert_eq!(recent.len(), 4);
    assert_eq!(recent[0].iova, 6 * K4);
    assert_eq!(recent[0].seq, 6);
    let c = soft.faults().counts();
    assert_eq!((c.total, c.dropped), (10, 6));
}

#[test]
fn translate_faults_through_a_port_are_recorded() {
    let r = rig();
    let (d, g) = r.probe("nic", 0x08);
    r.core.claim_dma_owner(g, VM).unwrap();
    let mut rid = r.soft.port(d, None);
    let mut pasid = r.soft.port(d, Some(Pasid(4)));
    assert_eq!(rid.translate(0x1000, Access::Read), Err(Fault::Blocked));
    assert_eq!(pasid.translate(0x2000, Access::Read), Err(Fault::NoDomain));
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.map(&dom, 0x2000, 0x9000, K4, Prot::READ).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    assert_eq!(rid.translate(0x5000, Access::Read), Err(Fault::NotMapped));
    // A walk, then an IOTLB hit: both refuse and record.
    assert_eq!(rid.translate(0x2010, Access::Write), Err(Fault::Permission));
    assert_eq!(rid.translate(0x2010, Access::Write), Err(Fault::Permission));
    assert_eq!(rid.translate(0x2010, Access::Read), Ok(0x9010)); // not a fault
    r.core.release_device(d).unwrap();
    assert_eq!(
        rid.translate(0x2010, Access::Read),
        Err(Fault::UnknownDevice)
    );
    let faults = r.soft.faults().recent();
    let got: Vec<_> = faults
        .iter()
        .map(|f| (f.fault, f.pasid, f.iova, f.access))
        .collect();
    assert_eq!(
        got,
        vec![
            (Fault::Blocked, None, 0x1000, Access::Read),
            (Fault::NoDomain, Some(Pasid(4)), 0x2000, Access::Read),
            (Fault::NotMapped, None, 0x5000, Access::Read),
            (Fault::Permission, None, 0x2010, Access::Write),
            (Fault::Permission, None, 0x2010, Access::Write),
            (Fault::UnknownDevice, None, 0x2010, Access::Read),
        ]
    );
    assert!(faults.iter().all(|f| f.dev == d));
    let c = r.soft.faults().counts();
    assert_eq!((c.total, c.permission, c.no_domain), (6, 2, 1));
}

#[test]
fn every_fault_says_why_in_its_message() {
    for (fault, why) in [
        (Fault::Blocked, "blocked"),
        (Fault::NotMapped, "not mapped"),
        (Fault::Permission, "not permitted"),
        (Fault::NoDomain, "no domain"),
        (Fault::UnknownDevice, "unknown device"),
    ] {
        let msg = fault.to_string();
        assert!(msg.to_lowercase().contains(why), "{fault:?}: {msg}");
    }
}

#[test]
fn map_uses_huge_pages_and_syncs_once() {
    let r = rig();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.take_driver_calls();
    // 4K head up to a 2M boundary, 2M pages up to 1G, 1G pages, then a 2M and a 4K tail.
    let (iova, len) = (G1 - M2 - K4, K4 + M2 + 2 * G1 + M2 + K4);
    r.core.map(&dom, iova, iova, len, Prot::RW).unwrap();
    let calls: Vec<DriverOp> = r
        .core
        .take_driver_calls()
        .into_iter()
        .map(|c| c.op)
        .collect();
    let runs: Vec<(u64, u64)> = calls
        .iter()
        .filter_map(|op| match op {
            DriverOp::MapPages {
                pgsize, pgcount, ..
            } => Some((*pgsize, *pgcount)),
            _ => None,
        })
        .collect();
    assert_eq!(runs, vec![(K4, 1), (M2, 1), (G1, 2), (M2, 1), (K4, 1)]);
    let syncs = calls
        .iter()
        .filter(|op| matches!(op, DriverOp::IotlbSyncMap { .. }))
        .count();
    assert_eq!(syncs, 1);
    assert!(matches!(calls.last(), Some(DriverOp::IotlbSyncMap { .. })));
    assert_eq!(
        r.core.iova_to_phys(&dom, G1 + 0x1234).unwrap(),
        Some(G1 + 0x1234)
    );
    // Unmap: one sync for the whole call.
    assert_eq!(r.core.unmap(&dom, iova, len).unwrap(), len);
    let syncs = r
        .core
        .take_driver_calls()
        .iter()
        .filter(|c| matches!(c.op, DriverOp::IotlbSync { .. }))
        .count();
    assert_eq!(syncs, 1);
    assert_eq!(r.core.iova_to_phys(&dom, G1).unwrap(), None);
}

#[test]
fn unmap_of_part_of_a_huge_page_is_refused() {
    let r = rig();
    let (d, g) = r.probe("nic", 0x08);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    r.core.map(&dom, M2, 4 * M2, M2, Prot::RW).unwrap();
    let err = r.core.unmap(&dom, M2, K4).unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::Driver {
                op: "unmap_pages",
                ..
            }
        ),
        "{err}"
    );
    // Nothing was split: the whole 2M still translates.
    assert_eq!(r.tr(d, M2 + M2 - 1, Access::Read), Ok(5 * M2 - 1));
    assert_eq!(r.core.unmap(&dom, M2, M2).unwrap(), M2);
    assert_eq!(r.tr(d, M2, Access::Read), Err(Fault::NotMapped));
}

#[test]
fn overlapping_map_is_refused_and_the_first_mapping_kept() {
    let r = rig();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core
        .map(&dom, 0x10_0000, 0xa0_0000, 4 * K4, Prot::RW)
        .unwrap();
    let err = r
        .core
        .map(&dom, 0x10_2000, 0xb0_0000, 4 * K4, Prot::RW)
        .unwrap_err();
    assert!(matches!(
        err,
        CoreError::Driver {
            op: "map_pages",
            ..
        }
    ));
    assert_eq!(
        r.core.iova_to_phys(&dom, 0x10_3000).unwrap(),
        Some(0xa0_3000)
    );
    assert_eq!(r.core.iova_to_phys(&dom, 0x10_4000).unwrap(), None);
}

#[test]
fn a_map_that_fails_midway_is_undone() {
    let r = rig();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.map(&dom, 4 * M2, 0, K4, Prot::RW).unwrap();
    // First run (511 x 4K up to 2M) succeeds, the 2M run hits the mapping at 4M and fails.
    let err = r.core.map(&dom, K4, K4, 8 * M2, Prot::RW).unwrap_err();
    assert!(matches!(
        err,
        CoreError::Driver {
            op: "map_pages",
            ..
        }
    ));
    assert_eq!(r.core.iova_to_phys(&dom, K4).unwrap(), None);
    assert_eq!(r.core.iova_to_phys(&dom, M2 - K4).unwrap(), None);
    assert_eq!(r.core.iova_to_phys(&dom, 4 * M2).unwrap(), Some(0));
}

#[test]
fn map_arguments_are_checked_by_the_core() {
    let r = rig();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    assert!(matches!(
        r.core.map(&dom, 0x800, 0, K4, Prot::RW),
        Err(CoreError::Unaligned { what: "iova", .. })
    ));
    assert!(matches!(
        r.core.map(&dom, 0, 0x800, K4, Prot::RW),
        Err(CoreError::Unaligned { what: "paddr", .. })
    ));
    assert!(matches!(
        r.core.map(&dom, 0, 0, 0, Prot::RW),
        Err(CoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        r.core.map(&dom, (1 << 48) - K4, 0, 2 * K4, Prot::RW),
        Err(CoreError::OutOfRange { ias_bits: 48, .. })
    ));
}

#[test]
fn unmap_is_seen_by_cached_ports_once_synced() {
    let r = rig();
    let (d, g) = r.probe("nic", 0x08);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.map(&dom, 0, 0x4000_0000, M2, Prot::RW).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    let mut port = r.soft.port(d, None);
    for _ in 0..3 {
        assert_eq!(port.translate(0x3000, Access::Read), Ok(0x4000_3000));
    }
    r.core.unmap(&dom, 0, M2).unwrap();
    assert_eq!(port.translate(0x3000, Access::Read), Err(Fault::NotMapped));
}

#[test]
fn ports_follow_attach_changes_and_release() {
    let r = rig();
    let (d, g) = r.probe("nic", 0x08);
    let mut port = r.soft.port(d, None);
    assert_eq!(port.translate(0x5000, Access::Read), Ok(0x5000)); // identity
    r.core.claim_dma_owner(g, VM).unwrap();
    assert_eq!(port.translate(0x5000, Access::Read), Err(Fault::Blocked));
    let a = r.core.alloc_paging(r.inst).unwrap();
    let b = r.core.alloc_paging(r.inst).unwrap();
    r.core.map(&a, 0, 0x10_0000, K4 * 16, Prot::RW).unwrap();
    r.core.map(&b, 0, 0x20_0000, K4 * 16, Prot::RW).unwrap();
    r.core.attach(g, VM, Target::Paging(&a)).unwrap();
    assert_eq!(port.translate(0x5000, Access::Read), Ok(0x10_5000));
    r.core.attach(g, VM, Target::Paging(&b)).unwrap();
    assert_eq!(port.translate(0x5000, Access::Read), Ok(0x20_5000));
    r.core.release_device(d).unwrap();
    assert_eq!(
        port.translate(0x5000, Access::Read),
        Err(Fault::UnknownDevice)
    );
    assert_eq!(r.tr(d, 0x5000, Access::Read), Err(Fault::UnknownDevice));
    r.core.free(a).unwrap();
    r.core.free(b).unwrap();
}

#[test]
fn release_domain_is_attached_in_hardware_before_release_device() {
    let r = rig();
    let (d, g) = r.probe("nic", 0x08);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    r.core.take_driver_calls();
    r.core.release_device(d).unwrap();
    let ops: Vec<DriverOp> = r
        .core
        .take_driver_calls()
        .into_iter()
        .map(|c| c.op)
        .collect();
    assert!(matches!(
        &ops[..2],
        [
            DriverOp::AttachDev {
                dtype: DomainType::Blocked,
                ..
            },
            DriverOp::ReleaseDevice { .. }
        ]
    ));
}

#[test]
fn functions_of_one_slot_share_a_group_and_translate_alike() {
    let r = rig();
    let (f0, g) = r.probe("nic.0", 0x10);
    let (f1, g1) = r.probe("nic.1", 0x11);
    let (other, g2) = r.probe("disk", 0x18);
    assert_eq!(g, g1);
    assert_ne!(g, g2);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.map(&dom, 0, M2, M2, Prot::RW).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    assert_eq!(r.tr(f0, 0x10, Access::Read), Ok(M2 + 0x10));
    assert_eq!(r.tr(f1, 0x10, Access::Read), Ok(M2 + 0x10));
    assert_eq!(r.tr(other, 0x10, Access::Read), Ok(0x10)); // still host identity
}

#[test]
fn sva_pasid_translates_through_its_address_space_until_it_exits() {
    let r = rig();
    let (d, _) = r.probe("accel", 0x20);
    let space = AddressSpaceId(1234);
    let mm = Arc::new(IoPageTable::new());
    let mut gather = pt::Gather::new();
    mm.map(0x7f00_0000_0000, 0x3000_0000, M2, Prot::RW, &mut gather)
        .unwrap();
    mm.sync(&mut gather);
    r.soft.bind_address_space(space, mm);
    let sva = r.core.alloc_sva(d, space).unwrap();
    r.core
        .set_dev_pasid(d, Pasid(9), PasidTarget::Sva(&sva))
        .unwrap();
    let exits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = exits.clone();
    r.core
        .set_pasid_exit_handler(
            d,
            Arc::new(move |dev, what| {
                seen.lock().unwrap().push((dev, what));
                Ok(())
            }),
        )
        .unwrap();
    assert_eq!(
        r.soft
            .translate(d, Some(Pasid(9)), 0x7f00_0000_0040, Access::Write),
        Ok(0x3000_0040)
    );
    // The requests without PASID are unaffected (host identity).
    assert_eq!(r.tr(d, 0x40, Access::Read), Ok(0x40));
    r.core.address_space_exit(space).unwrap();
    assert_eq!(
        *exits.lock().unwrap(),
        vec![(d, iommu::core::PasidExit::Pasid(Pasid(9)))]
    );
    assert_eq!(
        r.soft
            .translate(d, Some(Pasid(9)), 0x7f00_0000_0040, Access::Write),
        Err(Fault::Blocked)
    );
    r.core.free(sva).unwrap();
}

#[test]
fn sva_needs_a_bound_address_space() {
    let r = rig();
    let (d, _) = r.probe("accel", 0x20);
    assert!(matches!(
        r.core.alloc_sva(d, AddressSpaceId(5)),
        Err(CoreError::Driver {
            op: "domain_alloc_sva",
            ..
        })
    ));
}

#[test]
fn flush_iotlb_all_drops_cached_translations() {
    let r = rig();
    let (d, g) = r.probe("nic", 0x08);
    r.core.claim_dma_owner(g, VM).unwrap();
    let dom = r.core.alloc_paging(r.inst).unwrap();
    r.core.map(&dom, 0, 0, M2, Prot::RW).unwrap();
    r.core.attach(g, VM, Target::Paging(&dom)).unwrap();
    let mut port = r.soft.port(d, None);
    assert_eq!(port.translate(0x1000, Access::Read), Ok(0x1000));
    r.core.flush_iotlb_all(&dom).unwrap();
    assert!(r
        .core
        .driver_calls()
        .iter()
        .any(|c| matches!(c.op, DriverOp::FlushIotlbAll { .. })));
    assert_eq!(port.translate(0x1000, Access::Read), Ok(0x1000));
}

#[test]
fn the_core_and_the_dma_path_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<IommuCore>();
    send_sync::<SoftIommu>();
    send::<iommu::soft::DmaPort>();
    send::<iommu::core::PagingDomain>();
}
