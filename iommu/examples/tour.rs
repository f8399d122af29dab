//! A short tour of the IOMMU component: devices into groups, a guest claims one, maps with huge
//! pages, its device DMAs and faults, is unplugged (parked: blocked), and is plugged again.
//!
//! Run with `cargo run -p iommu --example tour`.

use iommu::core::{
    Access, CoreError, DeviceDesc, DeviceStatus, DmaOwner, DriverOp, IommuCore, OwnerId, Prot,
    Target,
};
use iommu::soft::SoftIommu;

const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= G1 => format!("{} GiB", b / G1),
        b if b >= M2 => format!("{} MiB", b >> 20),
        b => format!("{} KiB", b >> 10),
    }
}

fn dma(r: Result<u64, iommu::soft::Fault>) -> String {
    match r {
        Ok(out) => format!("{out:#x}"),
        Err(f) => format!("FAULT {f:?}: {f}"),
    }
}

fn show(core: &IommuCore) {
    println!(
        "  {:<4} {:<12} {:<7} {:<12} {:<16}",
        "dev", "name", "group", "owner", "domain"
    );
    for DeviceStatus {
        id,
        name,
        group,
        owner,
        domain,
        ..
    } in core.devices()
    {
        let owner = match owner {
            DmaOwner::Host => "host".to_string(),
            DmaOwner::Guest(o) => format!("guest {}", o.0),
            DmaOwner::Parked(o) => format!("PARKED ({})", o.0),
        };
        let domain = domain.map_or("platform".to_string(), |d| format!("{} {}", d.id, d.dtype));
        println!("  {id:<4} {name:<12} {group:<7} {owner:<12} {domain:<16}");
    }
}

fn main() -> Result<(), CoreError> {
    let core = IommuCore::new();
    let soft = SoftIommu::new();
    let iommu = core.register(soft.clone())?;
    let vm = OwnerId(1);

    println!("1. Probe three emulated devices; the two functions of slot 2 share a group.");
    let nic0 = core.probe_device(iommu, DeviceDesc::with_rid("nic.f0", 0x10))?;
    let nic1 = core.probe_device(iommu, DeviceDesc::with_rid("nic.f1", 0x11))?;
    let disk = core.probe_device(iommu, DeviceDesc::with_rid("disk", 0x18))?;
    let nic_group = core.group_of(nic0)?;
    show(&core);
    println!(
        "   host-owned devices are in the identity domain: {nic0} DMA to 0x1000 -> {}",
        dma(soft.translate(nic0, None, 0x1000, Access::Read))
    );

    println!("\n2. The guest claims the NIC group: the core attaches the blocked domain first.");
    core.claim_dma_owner(nic_group, vm)?;
    show(&core);
    println!(
        "   {nic1} DMA now -> {}",
        dma(soft.translate(nic1, None, 0x1000, Access::Read))
    );

    println!("\n3. The guest maps 1 GiB + 2 MiB of its RAM at IOVA 1 GiB, read-write, and 4 KiB read-only.");
    let dom = core.alloc_paging(iommu)?;
    core.take_driver_calls();
    core.map(&dom, G1, 0x1_0000_0000, G1 + M2, Prot::RW)?;
    core.map(&dom, 0x8000, 0x7000, 0x1000, Prot::READ)?;
    for c in core.take_driver_calls() {
        if let DriverOp::MapPages {
            iova,
            pgsize,
            pgcount,
            ..
        } = c.op
        {
            println!("   map_pages iova {iova:#x}: {pgcount} x {}", size(pgsize));
        }
    }
    core.attach(nic_group, vm, Target::Paging(&dom))?;
    show(&core);

    println!("\n4. The NIC DMAs through its domain (a port caches translations in a small IOTLB).");
    let mut port = soft.port(nic0, None);
    for (iova, access) in [
        (G1 + 0x1234, Access::Write),
        (2 * G1 + 0x10, Access::Read),
        (0x8000, Access::Read),
        (0x8000, Access::Write),
        (0x40_0000, Access::Read),
    ] {
        println!(
            "   {access:?} {iova:#x} -> {}",
            dma(port.translate(iova, access))
        );
    }

    println!("\n5. The guest unplugs the NIC: the core parks the group on the blocked domain.");
    core.park(nic_group, vm)?;
    show(&core);
    println!(
        "   the parked NIC DMAs to a mapped IOVA -> {}",
        dma(port.translate(G1 + 0x1234, Access::Write))
    );

    println!("\n6. Plug it again and re-attach the guest's domain (its mappings were kept).");
    core.plug(nic_group, vm)?;
    core.attach(nic_group, vm, Target::Paging(&dom))?;
    println!(
        "   {nic0} DMA {:#x} -> {}",
        G1 + 0x1234,
        dma(port.translate(G1 + 0x1234, Access::Write))
    );

    println!("\n7. The fault log the VMM reads:");
    let c = soft.faults().counts();
    println!(
        "   total {} (blocked {}, not mapped {}, permission {})",
        c.total, c.blocked, c.not_mapped, c.permission
    );
    for f in soft.faults().recent() {
        println!(
            "   #{} {} {:?} iova {:#x}: {:?}",
            f.seq, f.dev, f.access, f.iova, f.fault
        );
    }

    println!("\n8. Rules that refuse: freeing an attached domain, attaching while host-owned.");
    let dom = match core.free(dom) {
        Ok(()) => unreachable!("the domain is attached"),
        Err(refused) => {
            println!("   free: {}", refused.error);
            refused.domain
        }
    };
    if let Err(e) = core.attach(core.group_of(disk)?, vm, Target::Paging(&dom)) {
        println!("   attach disk: {e}");
    }

    println!("\n9. The guest gives the NIC back to the host (its default domain), then frees its domain.");
    core.release_dma_owner(nic_group, vm)?;
    core.free(dom)?;
    show(&core);
    Ok(())
}
