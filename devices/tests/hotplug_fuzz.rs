//! Property-based fuzzing of the ACPI PCI hotplug controller: random guest reads and writes of its
//! registers (any size, any offset, any value) mixed with the VMM's requests (manage, insert, eject, for
//! any slot number) and devices coming and going on the bus, against a model of the registers.
//!
//! Checked after every step: reads return the model's bytes (`PCIU`/`PCID` clear exactly the bits they
//! returned, `PSTA` is the managed slots that hold a device, other offsets read 0); a write to anything
//! but `B0EJ` changes nothing; an eject takes exactly the managed slots it names off the bus, never slot 0
//! or an unmanaged slot, and signals the VMM only when it took one; requests for bad or unmanaged slots
//! are refused and raise no interrupt; accepted ones raise it once.
//!
//! `PROPTEST_CASES` sets the number of cases (`scripts/test` uses 4000).

use std::sync::{Arc, Mutex};

use devices::hotplug::{
    HotplugError, PciHotplugController, REGS_LEN, REG_DOWN, REG_EJECT, REG_PRESENT, REG_UP,
};
use devices::pci::{BarWindows, HostBridge, PciBus, PciSlot};
use proptest::prelude::*;
use vmm_sys_util::eventfd::EventFd;

#[derive(Clone, Debug)]
enum Op {
    Manage(u8),
    Insert(u8),
    Eject(u8),
    /// A device appears on the bus at the slot (VMM side), or leaves it.
    Plug(u8),
    Unplug(u8),
    /// A guest read (offset, size).
    Read(u64, usize),
    /// A guest write (offset, bytes).
    Write(u64, Vec<u8>),
    /// The VMM collects what the guest ejected.
    Take,
}

fn slot() -> impl Strategy<Value = u8> {
    prop_oneof![8 => 0u8..4, 4 => 0u8..33, 1 => any::<u8>()]
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..u64::from(REGS_LEN),
        2 => Just(REG_EJECT),
        1 => 0u64..64,
        1 => any::<u64>(),
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        any::<u32>(),
        Just(u32::MAX),
        (0u32..8).prop_map(|s| 1 << s),
        (0u32..8).prop_map(|s| 0b1110 << s)
    ];
    (
        value,
        prop_oneof![Just(4usize), Just(1), Just(2), 0usize..9],
    )
        .prop_map(|(v, n)| {
            (0..n)
                .map(|i| (u64::from(v) >> (8 * (i % 4))) as u8)
                .collect()
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => slot().prop_map(Op::Manage),
        2 => slot().prop_map(Op::Insert),
        2 => slot().prop_map(Op::Eject),
        2 => slot().prop_map(Op::Plug),
        1 => slot().prop_map(Op::Unplug),
        4 => (offset(), prop_oneof![Just(4usize), Just(1), Just(2), 0usize..9])
            .prop_map(|(o, n)| Op::Read(o, n)),
        4 => (offset(), bytes()).prop_map(|(o, b)| Op::Write(o, b)),
        1 => Just(Op::Take),
    ]
}

/// What the registers and the bus must look like.
#[derive(Default)]
struct Model {
    up: u32,
    down: u32,
    managed: u32,
    /// Slots holding a device (slot 0: the host bridge).
    on_bus: u32,
    /// Slots the guest ejected, not yet collected.
    ejected: Vec<u8>,
}

struct Rig {
    bus: Arc<PciBus>,
    c: PciHotplugController,
    irq: EventFd,
    ej: EventFd,
    m: Model,
}

fn bit(s: u8) -> Option<u32> {
    (1..32).contains(&s).then(|| 1u32 << s)
}

impl Rig {
    fn new() -> Self {
        let bus = Arc::new(PciBus::new(BarWindows {
            mmio32: (0xc000_0000, 0x2000_0000),
            mmio64: (1 << 40, 1 << 30),
            io: (0x1000, 0xf000),
        }));
        let host = bus.add_device(Some(0), Arc::new(Mutex::new(HostBridge::new())));
        assert_eq!(host.ok(), Some(PciSlot(0)));
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let ej = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let c = PciHotplugController::new(
            bus.clone(),
            irq.try_clone().expect("eventfd"),
            ej.try_clone().expect("eventfd"),
        );
        Rig {
            bus,
            c,
            irq,
            ej,
            m: Model {
                on_bus: 1,
                ..Model::default()
            },
        }
    }

    fn request(
        &mut self,
        s: u8,
        r: Result<(), HotplugError>,
        apply: impl FnOnce(&mut Model, u32),
    ) -> Result<(), TestCaseError> {
        let raised = self.irq.read().is_ok();
        match bit(s) {
            None => prop_assert_eq!(r, Err(HotplugError::BadSlot(s))),
            Some(b) if self.m.managed & b == 0 => {
                prop_assert_eq!(r, Err(HotplugError::NotManaged(PciSlot(s))))
            }
            Some(b) => {
                prop_assert_eq!(r, Ok(()));
                apply(&mut self.m, b);
                prop_assert!(raised, "the interrupt was raised");
                return Ok(());
            }
        }
        prop_assert!(!raised, "a refused request raises nothing");
        Ok(())
    }

    fn read(&mut self, off: u64, n: usize) -> Result<(), TestCaseError> {
        let mut d = vec![0xa5u8; n];
        self.c.read(off, &mut d);
        let byte = (off & 3) as usize;
        let value = match off & !3 {
            REG_UP => self.m.up,
            REG_DOWN => self.m.down,
            REG_PRESENT => self.m.managed & self.m.on_bus,
            _ => 0,
        };
        let want: Vec<u8> = (0..n)
            .map(|i| value.to_le_bytes().get(byte + i).copied().unwrap_or(0))
            .collect();
        prop_assert_eq!(&d, &want, "read of {} bytes at {:#x}", n, off);
        // PCIU and PCID clear exactly the bytes the read covered.
        let covered = (byte..(byte + n).min(4)).fold(0u32, |m, i| m | (0xff << (8 * i)));
        match off & !3 {
            REG_UP => self.m.up &= !covered,
            REG_DOWN => self.m.down &= !covered,
            _ => {}
        }
        Ok(())
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), TestCaseError> {
        self.c.write(off, data);
        let mut named = 0u32;
        if off & !3 == REG_EJECT {
            for (i, d) in data.iter().enumerate() {
                let lane = (off & 3) as usize + i;
                if lane < 4 {
                    named |= u32::from(*d) << (8 * lane);
                }
            }
        }
        let taken = named & self.m.managed;
        for s in 1..32u8 {
            if taken & (1 << s) != 0 {
                self.m.ejected.push(s);
            }
        }
        self.m.managed &= !taken;
        self.m.up &= !taken;
        self.m.down &= !taken;
        self.m.on_bus &= !taken;
        prop_assert_eq!(
            self.ej.read().is_ok(),
            taken != 0,
            "the VMM is told iff the guest ejected a managed slot"
        );
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Manage(s) => {
                let r = self.c.manage(PciSlot(s));
                match bit(s) {
                    Some(b) => {
                        prop_assert_eq!(r, Ok(()));
                        self.m.managed |= b;
                    }
                    None => prop_assert_eq!(r, Err(HotplugError::BadSlot(s))),
                }
            }
            Op::Insert(s) => {
                let r = self.c.request_insert(PciSlot(s));
                self.request(s, r, |m, b| {
                    m.up |= b;
                    m.down &= !b;
                })?;
            }
            Op::Eject(s) => {
                let r = self.c.request_eject(PciSlot(s));
                self.request(s, r, |m, b| {
                    m.down |= b;
                    m.up &= !b;
                })?;
            }
            Op::Plug(s) => {
                let r = self
                    .bus
                    .add_device(Some(s), Arc::new(Mutex::new(HostBridge::new())));
                if r.is_ok() {
                    self.m.on_bus |= 1 << s;
                }
            }
            Op::Unplug(s) => {
                if s != 0 && self.bus.remove_device(PciSlot(s)).is_some() {
                    self.m.on_bus &= !(1u32 << s);
                }
            }
            Op::Read(off, n) => self.read(off, n)?,
            Op::Write(off, ref data) => self.write(off, data)?,
            Op::Take => {
                let got: Vec<u8> = self.c.take_ejected().iter().map(|e| e.slot.0).collect();
                prop_assert_eq!(got, std::mem::take(&mut self.m.ejected));
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.c.pending(), (self.m.up, self.m.down, self.m.managed));
        for s in 0..32u8 {
            prop_assert_eq!(
                self.bus.device(PciSlot(s)).is_some(),
                self.m.on_bus & (1 << s) != 0,
                "slot {} on the bus",
                s
            );
            prop_assert_eq!(
                self.c.is_managed(PciSlot(s)),
                bit(s).is_some_and(|b| self.m.managed & b != 0)
            );
        }
        prop_assert!(self.m.on_bus & 1 != 0, "the host bridge stays");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn random_register_accesses_and_requests_keep_the_invariants(
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let mut rig = Rig::new();
        rig.check()?;
        for op in &ops {
            rig.apply(op)?;
        }
    }
}
