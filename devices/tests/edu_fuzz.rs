//! Property-based fuzzing of the `edu` DMA test device: random guest reads and writes of its BAR (any
//! size, any offset, values biased towards real DMA programs), PCI command writes (bus mastering on and
//! off) and the VMM parking and plugging it again, over the real core, soft IOMMU and page tables.
//!
//! The device's domain maps bus addresses `[0, 64 KiB)` read-write to guest RAM at 128 KiB and
//! `[64 KiB, 72 KiB)` read-only to guest RAM at 256 KiB. Checked after every step: nothing panics; the
//! identification register reads 0x010000ed; every transfer moved at most the buffer's 4 KiB; every fault
//! the soft IOMMU recorded is one refused transfer of the device, and no refusal other than a fault
//! reached the IOMMU; a refused transfer changed nothing in the read-write window either (all or nothing).
//! At the end: guest RAM outside the read-write window is unchanged (the device wrote nothing the IOMMU did
//! not let it write, parked or not).
//!
//! A second property drives whole transfers, with bus addresses biased to the windows' edges, against a
//! model of the device's buffer: a transfer that goes through copies exactly (RAM to buffer, buffer to RAM),
//! one that is refused changes neither RAM nor the buffer.
//!
//! `PROPTEST_CASES` sets the number of cases (`scripts/test` uses 4000).

use std::sync::Arc;

use devices::edu::{cmd, reg, EduDevice, BUFFER_ADDR, ID};
use devices::pci::PciDevice;
use iommu::core::{DeviceDesc, GroupId, IommuCore, OwnerId, PagingDomain, Prot, Target};
use iommu::soft::SoftIommu;
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const VM: OwnerId = OwnerId(1);
const RAM: usize = 512 << 10;
const RW_BUS: u64 = 64 << 10;
const RW_GPA: u64 = 128 << 10;
const RO_BUS: u64 = RW_BUS;
const RO_LEN: u64 = 8 << 10;
const RO_GPA: u64 = 256 << 10;

#[derive(Clone, Debug)]
enum Op {
    /// A guest read of BAR 0 (offset, size).
    Read(u64, usize),
    /// A guest write to BAR 0 (offset, bytes).
    Write(u64, Vec<u8>),
    /// A guest write of the PCI command register's low byte.
    Command(u8),
    /// The VMM parks the device (blocked domain), or plugs it back into its domain.
    Park,
    Plug,
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => prop::sample::select(vec![0x80u64, 0x84, 0x88, 0x8c, 0x90, 0x94, 0x98, 0x9c]),
        4 => prop::sample::select(vec![0x00u64, 0x04, 0x08, 0x20, 0x24, 0x60, 0x64]),
        1 => 0u64..0x100,
        1 => 0x40000u64..0x41000,
        1 => any::<u64>(),
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        // Bus addresses in, across and beyond the windows.
        4 => 0u64..(RW_BUS + RO_LEN + 0x2000),
        // Device-side addresses around the buffer.
        4 => (BUFFER_ADDR - 0x100)..(BUFFER_ADDR + 0x1100),
        // Counts.
        4 => 0u64..0x1200,
        // Commands.
        4 => 0u64..8,
        1 => (0u32..64).prop_map(|s| 1u64 << s),
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![4 => Just(4usize), 4 => Just(8usize), 1 => 1usize..9];
    prop_oneof![
        8 => (offset(), value(), size.clone())
            .prop_map(|(o, v, n)| Op::Write(o, v.to_le_bytes()[..n].to_vec())),
        3 => (offset(), size).prop_map(|(o, n)| Op::Read(o, n)),
        1 => prop_oneof![Just(0x06u8), Just(0x02), any::<u8>()].prop_map(Op::Command),
        1 => Just(Op::Park),
        1 => Just(Op::Plug),
    ]
}

struct Rig {
    core: IommuCore,
    soft: Arc<SoftIommu>,
    group: GroupId,
    domain: PagingDomain,
    mem: GuestMemoryMmap<()>,
    edu: EduDevice,
}

fn rig() -> Rig {
    let core = IommuCore::new();
    let soft = SoftIommu::new();
    let inst = core.register(soft.clone()).expect("register");
    let dev = core
        .probe_device(inst, DeviceDesc::new("edu"))
        .expect("probe");
    let group = core.group_of(dev).expect("group");
    core.claim_dma_owner(group, VM).expect("claim");
    let domain = core.alloc_paging(inst).expect("domain");
    core.map(&domain, 0, RW_GPA, RW_BUS, Prot::RW)
        .expect("map rw");
    core.map(&domain, RO_BUS, RO_GPA, RO_LEN, Prot::READ)
        .expect("map ro");
    core.attach(group, VM, Target::Paging(&domain))
        .expect("attach");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).expect("memory");
    mem.write_slice(fill(), GuestAddress(0)).expect("fill");
    let mut edu = EduDevice::new("edu".into(), soft.port(dev, None), mem.clone());
    edu.write_config_register(1, 0, &[0x06, 0]);
    Rig {
        core,
        soft,
        group,
        domain,
        mem,
        edu,
    }
}

/// What guest RAM holds at the start of every case (made once: debug builds are slow at it).
fn fill() -> &'static [u8] {
    static FILL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    FILL.get_or_init(|| (0..RAM).map(|i| (i * 131 % 251) as u8).collect())
}

fn rw_window(mem: &GuestMemoryMmap<()>) -> Vec<u8> {
    let mut v = vec![0u8; RW_BUS as usize];
    mem.read_slice(&mut v, GuestAddress(RW_GPA)).expect("read");
    v
}

fn snapshot(mem: &GuestMemoryMmap<()>) -> Vec<u8> {
    let mut v = vec![0u8; RAM];
    mem.read_slice(&mut v, GuestAddress(0)).expect("read");
    v
}

proptest! {
    #[test]
    fn guest_programs_never_reach_beyond_the_iommu(ops in prop::collection::vec(op(), 1..60)) {
        let mut r = rig();
        let before = snapshot(&r.mem);
        let rw = RW_GPA as usize..(RW_GPA + RW_BUS) as usize;
        let mut parked = false;
        for op in ops {
            match op {
                Op::Read(o, n) => {
                    let mut b = vec![0u8; n];
                    r.edu.read_bar(0, o, &mut b);
                }
                Op::Write(o, b) if o == reg::DMA_CMD => {
                    let (window, refused) = (rw_window(&r.mem), r.edu.stats().refused);
                    r.edu.write_bar(0, o, &b);
                    if r.edu.stats().refused > refused {
                        prop_assert!(rw_window(&r.mem) == window, "a refused transfer wrote into the window");
                    }
                }
                Op::Write(o, b) => r.edu.write_bar(0, o, &b),
                Op::Command(c) => {
                    r.edu.write_config_register(1, 0, &[c]);
                }
                Op::Park => {
                    if !parked {
                        r.core.park(r.group, VM).expect("park");
                        parked = true;
                    }
                }
                Op::Plug => {
                    if parked {
                        r.core.plug(r.group, VM).expect("plug");
                        r.core.attach(r.group, VM, Target::Paging(&r.domain)).expect("attach");
                        parked = false;
                    }
                }
            }
            let mut id = [0u8; 4];
            r.edu.read_bar(0, reg::ID, &mut id);
            prop_assert_eq!(u32::from_le_bytes(id), ID);
            let s = r.edu.stats();
            prop_assert!(s.bytes <= s.transfers * 4096, "{:?}", s);
            prop_assert!(s.faults <= s.refused, "{:?}", s);
            prop_assert_eq!(r.soft.faults().counts().total, s.faults);
        }
        let now = snapshot(&r.mem);
        if now[..rw.start] != before[..rw.start] || now[rw.end..] != before[rw.end..] {
            let at = (0..RAM).find(|i| !rw.contains(i) && now[*i] != before[*i]);
            prop_assert!(false, "guest RAM changed outside the device's read-write window, at {:?}", at);
        }
    }

    /// A program that stays inside the windows moves data exactly: RAM -> buffer -> RAM.
    #[test]
    fn in_window_round_trips_copy_exactly(
        src in 0u64..RW_BUS, dst in 0u64..RW_BUS, at in 0u64..4096, count in 0u64..4097,
    ) {
        let count = count.min(4096 - at).min(RW_BUS - src).min(RW_BUS - dst);
        let mut r = rig();
        let mut want = vec![0u8; count as usize];
        r.mem.read_slice(&mut want, GuestAddress(RW_GPA + src)).expect("read");
        let w = |e: &mut EduDevice, o: u64, v: u64| e.write_bar(0, o, &v.to_le_bytes());
        w(&mut r.edu, reg::DMA_SRC, src);
        w(&mut r.edu, reg::DMA_DST, BUFFER_ADDR + at);
        w(&mut r.edu, reg::DMA_COUNT, count);
        w(&mut r.edu, reg::DMA_CMD, cmd::START);
        w(&mut r.edu, reg::DMA_SRC, BUFFER_ADDR + at);
        w(&mut r.edu, reg::DMA_DST, dst);
        w(&mut r.edu, reg::DMA_CMD, cmd::START | cmd::TO_RAM);
        let mut got = vec![0u8; count as usize];
        r.mem.read_slice(&mut got, GuestAddress(RW_GPA + dst)).expect("read");
        prop_assert_eq!(got, want);
        prop_assert_eq!(r.edu.stats().transfers, 2);
        prop_assert_eq!(r.edu.stats().refused, 0);
    }

    #[test]
    fn whole_transfers_match_a_model_of_the_buffer(
        transfers in prop::collection::vec(transfer(), 1..24),
    ) {
        let mut r = rig();
        let mut model = vec![0u8; 4096];
        let mut parked = false;
        for t in transfers {
            if t.park != parked {
                if t.park {
                    r.core.park(r.group, VM).expect("park");
                } else {
                    r.core.plug(r.group, VM).expect("plug");
                    r.core.attach(r.group, VM, Target::Paging(&r.domain)).expect("attach");
                }
                parked = t.park;
            }
            let before = snapshot(&r.mem);
            let done = r.edu.stats().transfers;
            let (src, dst) = if t.to_ram { (BUFFER_ADDR + t.at, t.bus) } else { (t.bus, BUFFER_ADDR + t.at) };
            let w = |e: &mut EduDevice, o: u64, v: u64| e.write_bar(0, o, &v.to_le_bytes());
            w(&mut r.edu, reg::DMA_SRC, src);
            w(&mut r.edu, reg::DMA_DST, dst);
            w(&mut r.edu, reg::DMA_COUNT, t.count);
            w(&mut r.edu, reg::DMA_CMD, cmd::START | if t.to_ram { cmd::TO_RAM } else { 0 });
            let went = r.edu.stats().transfers > done;
            let now = snapshot(&r.mem);
            // Where the bus range lands in guest RAM when every page of it is mapped for the access.
            let writable = t.bus + t.count <= RW_BUS;
            let readable = writable || (t.bus >= RO_BUS && t.bus + t.count <= RO_BUS + RO_LEN)
                || (t.bus < RW_BUS && t.bus + t.count <= RO_BUS + RO_LEN);
            let in_buffer = t.at + t.count <= 4096;
            // A transfer of 0 bytes has nothing to translate: it completes wherever it points.
            let reachable = !parked && if t.to_ram { writable } else { readable };
            let expect = in_buffer && (t.count == 0 || reachable);
            prop_assert_eq!(went, expect, "{:?}", t);
            if !went {
                prop_assert!(now == before, "a refused transfer changed guest RAM: {:?}", t);
                continue;
            }
            let (at, n) = (t.at as usize, t.count as usize);
            let gpa = |bus: u64| if bus < RW_BUS { RW_GPA + bus } else { RO_GPA + bus - RO_BUS };
            if t.to_ram {
                let g = gpa(t.bus) as usize;
                prop_assert_eq!(&now[g..g + n], &model[at..at + n]);
                let mut expected = before.clone();
                expected[g..g + n].copy_from_slice(&model[at..at + n]);
                prop_assert!(now == expected, "only the destination changed");
            } else {
                for k in 0..n {
                    model[at + k] = before[gpa(t.bus + k as u64) as usize];
                }
                prop_assert!(now == before, "reading RAM changed it");
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Transfer {
    bus: u64,
    at: u64,
    count: u64,
    to_ram: bool,
    park: bool,
}

fn transfer() -> impl Strategy<Value = Transfer> {
    let edge = |e: u64| (0u64..0x300).prop_map(move |d| e.saturating_sub(d));
    let bus = prop_oneof![
        2 => 0u64..(RO_BUS + RO_LEN + 0x1000),
        2 => edge(RW_BUS),
        2 => edge(RO_BUS + RO_LEN),
        1 => edge(0x1000),
    ];
    (
        bus,
        prop_oneof![4 => 0u64..4096, 1 => 3900u64..4096],
        prop_oneof![4 => 0u64..0x400, 1 => 0u64..0x1100],
        any::<bool>(),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(bus, at, count, to_ram, park)| Transfer {
            bus,
            at,
            count,
            to_ram,
            park,
        })
}
