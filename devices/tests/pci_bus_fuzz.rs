//! Property-based fuzzing of PCI config space as a guest reaches it: random sequences of 0xCF8/0xCFC port
//! accesses, ECAM accesses (any size, unaligned, out of range), trapped BAR accesses and BAR sizing,
//! driven through the real [`PciBus`] against the [`HostBridge`] and a device whose config space is a
//! [`PciConfig`] with random BARs. Checked after every access: nothing panics, read-only registers stay
//! as they were, the command register changes only in its writable bits, sizing reads the BAR's size
//! mask and reports no move, every reported relocation is a real move from where the BAR was, and every
//! placed BAR that overlaps nothing answers trapped accesses.
//!
//! `PROPTEST_CASES` sets the number of cases (`scripts/test` uses 4000).

use std::sync::{Arc, Mutex};

use devices::pci::{
    BarKind, BarRegion, BarRelocation, BarWindows, HostBridge, PciBarDef, PciBus, PciConfig,
    PciDevice, PciDeviceError, PciSlot, BAR0_REG, NUM_BARS,
};
use proptest::prelude::*;

const WINDOWS: BarWindows = BarWindows {
    mmio32: (0xc000_0000, 0x2000_0000),
    mmio64: (1 << 40, 1 << 40),
    io: (0x1000, 0xf000),
};

/// A device with a [`PciConfig`] config space that records every `move_bar` and answers BAR accesses.
struct FuzzDev {
    config: PciConfig,
    moves: Vec<BarRelocation>,
}

impl PciDevice for FuzzDev {
    fn name(&self) -> String {
        "fuzz".into()
    }
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_register(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u8, data: &[u8]) -> Vec<BarRelocation> {
        self.config.write_register(reg, offset, data)
    }
    fn bars(&self) -> Vec<BarRegion> {
        self.config.bars()
    }
    fn move_bar(&mut self, r: &BarRelocation) -> Result<(), PciDeviceError> {
        self.moves.push(*r);
        Ok(())
    }
    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One BAR request: 0 none, 1 I/O, 2 mem32, 3 mem64; the size is `1 << shift`.
fn bar_defs() -> impl Strategy<Value = Vec<(u8, u32, bool)>> {
    prop::collection::vec((0u8..4, 0u32..64, any::<bool>()), NUM_BARS)
}

fn def_of(kind: u8, shift: u32, pf: bool) -> Option<PciBarDef> {
    let (kind, lo, hi) = match kind {
        1 => (BarKind::Io, 2, 8),
        2 => (BarKind::Mem32 { prefetchable: pf }, 4, 26),
        3 => (BarKind::Mem64 { prefetchable: pf }, 4, 37),
        _ => return None,
    };
    Some(PciBarDef {
        size: 1u64 << (lo + shift % (hi - lo + 1)),
        kind,
    })
}

#[derive(Clone, Debug)]
enum Op {
    /// A dword write of CONFIG_ADDRESS.
    Cf8(u32),
    /// An access to 0xcf8..=0xcff of any size (port offset, size, value, write?).
    Port(u16, usize, u32, bool),
    /// An ECAM access (offset from the ECAM base, size, value, write?).
    Ecam(u64, usize, u64, bool),
    /// Linux's sizing sequence on BAR slot `n % bars` (both halves at once or one after the other).
    Size(usize, bool),
    /// A trapped memory or I/O access (address, size, write?, io?).
    Bar(u64, usize, bool, bool),
    /// The guest places BAR slot `n % bars` (dword writes, high half first or not) at: 0 where another
    /// BAR is, 1 the top of its address space, 2 zero, 3 `raw`.
    Place(usize, u8, u64, bool),
}

fn value() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(u32::MAX),
        Just(0xffff_fffe),
        Just(0x8000_0000),
        Just(0xc000_0000),
        (0u32..32).prop_map(|s| 1u32 << s),
        any::<u32>(),
    ]
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        Just(2),
        Just(4),
        Just(4),
        Just(0),
        Just(3),
        Just(8)
    ]
}

fn ecam_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        // Devices 0..=2 (host bridge, the fuzz device, an empty slot), the header and BARs most often.
        (0u64..3, 0u64..0x40).prop_map(|(d, o)| (d << 15) | o),
        (0u64..3, 0u64..0x1000).prop_map(|(d, o)| (d << 15) | o),
        // Other functions, buses, and anything at all.
        0u64..(1 << 21),
        any::<u64>(),
    ]
}

fn cf8_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        (0u32..3, 0u32..0x40).prop_map(|(d, o)| 0x8000_0000 | (d << 11) | o),
        (0u32..3, 0u32..0x100).prop_map(|(d, o)| 0x8000_0000 | (d << 11) | o),
        any::<u32>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => cf8_value().prop_map(Op::Cf8),
        3 => (0u16..8, size(), value(), any::<bool>()).prop_map(|(p, s, v, w)| Op::Port(p, s, v, w)),
        6 => (ecam_offset(), size(), (value(), value()), any::<bool>())
            .prop_map(|(o, s, (a, b), w)| Op::Ecam(o, s, u64::from(a) | (u64::from(b) << 32), w)),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(n, both)| Op::Size(n, both)),
        2 => (prop_oneof![0xc000_0000u64..0xc100_0000, (1u64 << 40)..(1u64 << 40) + (1 << 37), 0u64..0x10000, any::<u64>()],
              size(), any::<bool>(), any::<bool>())
            .prop_map(|(a, s, w, io)| Op::Bar(a, s, w, io)),
        3 => (any::<usize>(), 0u8..4, any::<u64>(), any::<bool>()).prop_map(|(n, w, raw, hi)| Op::Place(n, w, raw, hi)),
    ]
}

struct Rig {
    bus: PciBus,
    dev: Arc<Mutex<FuzzDev>>,
    /// Per BAR index: (definition, base the guest last placed it at).
    model: Vec<(u8, PciBarDef, u64)>,
    /// Registers that must never change: (device, register, value).
    fixed: Vec<(u8, usize, u32)>,
    /// Command/status of each device at start.
    command: [u32; 2],
}

fn ecam_read(bus: &PciBus, dev: u8, reg: usize) -> u32 {
    let mut v = [0u8; 4];
    bus.ecam_read((u64::from(dev) << 15) | (reg as u64 * 4), &mut v);
    u32::from_le_bytes(v)
}

fn ecam_write(bus: &PciBus, dev: u8, reg: usize, v: u32) -> Vec<BarRelocation> {
    match bus.ecam_write((u64::from(dev) << 15) | (reg as u64 * 4), &v.to_le_bytes()) {
        Ok(r) => r,
        Err(e) => panic!("ECAM write failed: {e}"),
    }
}

impl Rig {
    fn new(defs: &[(u8, u32, bool)]) -> Option<Self> {
        let mut config = PciConfig::new(0x1234, 0x5678, 0x02, 0x00, 0x00);
        config.set_subsystem(0xabcd, 0xef01);
        let mut model = Vec::new();
        for (i, &(k, s, pf)) in defs.iter().enumerate() {
            if let Some(def) = def_of(k, s, pf) {
                if config.add_bar(i, def) {
                    model.push((i as u8, def, 0));
                }
            }
        }
        let bus = PciBus::new(WINDOWS);
        bus.add_device(Some(0), Arc::new(Mutex::new(HostBridge::new())))
            .ok()?;
        let dev = Arc::new(Mutex::new(FuzzDev {
            config,
            moves: Vec::new(),
        }));
        // Large BAR sets may not fit the windows: that is a clean error, not a case to fuzz.
        match bus.add_device(Some(1), dev.clone()) {
            Ok(PciSlot(1)) => {}
            Ok(other) => panic!("placed at {other}"),
            Err(devices::pci::PciBusError::NoRoom { .. }) => return None,
            Err(e) => panic!("plug failed: {e}"),
        }
        let placed = std::mem::take(&mut lock(&dev).moves);
        for r in placed {
            let m = model.iter_mut().find(|m| m.0 == r.index)?;
            assert_eq!(r.old_base, m.2);
            m.2 = r.new_base;
        }
        let mut fixed = Vec::new();
        for d in 0..2u8 {
            for reg in [0usize, 2, 3, 0x2c / 4, 0x30 / 4, 0x34 / 4] {
                fixed.push((d, reg, ecam_read(&bus, d, reg)));
            }
        }
        let command = [ecam_read(&bus, 0, 1), ecam_read(&bus, 1, 1)];
        Some(Rig {
            bus,
            dev,
            model,
            fixed,
            command,
        })
    }

    /// Applies the relocations an access reported; checks they are exactly what the device was told and
    /// that each is a real move from where the BAR was.
    fn moved(&mut self, reported: &[BarRelocation]) -> Result<(), TestCaseError> {
        let told = std::mem::take(&mut lock(&self.dev).moves);
        prop_assert_eq!(
            reported,
            &told[..],
            "the device is told exactly what the bus reports"
        );
        for r in reported {
            let Some(m) = self.model.iter_mut().find(|m| m.0 == r.index) else {
                return Err(TestCaseError::fail(format!(
                    "relocation of BAR{} that does not exist",
                    r.index
                )));
            };
            prop_assert_ne!(
                r.old_base,
                r.new_base,
                "a relocation that is not a move: {:?}",
                r
            );
            prop_assert_eq!(r.old_base, m.2, "old base is where the BAR was: {:?}", r);
            prop_assert_eq!((r.size, r.kind), (m.1.size, m.1.kind));
            m.2 = r.new_base;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        for &(d, reg, v) in &self.fixed {
            prop_assert_eq!(
                ecam_read(&self.bus, d, reg),
                v,
                "read-only register {:#x} of device {}",
                reg * 4,
                d
            );
        }
        for d in 0..2u8 {
            let now = ecam_read(&self.bus, d, 1);
            prop_assert_eq!(
                now & !0x0547,
                self.command[usize::from(d)] & !0x0547,
                "command/status of device {}",
                d
            );
        }
        let bars = lock(&self.dev).bars();
        for m in &self.model {
            let b = bars.iter().find(|b| b.index == m.0).map(|b| b.base);
            prop_assert_eq!(b, Some(m.2), "the device's view of BAR{}", m.0);
        }
        // A placed BAR that overlaps no other answers at its first and last byte.
        for m in &self.model {
            let (base, size) = (m.2, m.1.size);
            if base == 0 {
                continue;
            }
            let end = base.saturating_add(size);
            let overlaps = self.model.iter().any(|o| {
                o.0 != m.0
                    && o.2 != 0
                    && o.1.kind.is_memory() == m.1.kind.is_memory()
                    && o.2 < end
                    && base < o.2.saturating_add(o.1.size)
            });
            if overlaps {
                continue;
            }
            let mut d = [0u8; 1];
            if m.1.kind.is_memory() {
                prop_assert!(
                    self.bus.mmio_read(base, &mut d),
                    "BAR{} at {:#x} answers",
                    m.0,
                    base
                );
                prop_assert!(
                    self.bus.mmio_read(end - 1, &mut d),
                    "BAR{} answers at its end",
                    m.0
                );
            } else if end <= 0x1_0000 && !(0xcf8..0xd00).contains(&base) {
                prop_assert!(
                    self.bus.pio_read(base as u16, &mut d),
                    "I/O BAR{} at {:#x} answers",
                    m.0,
                    base
                );
            }
        }
        Ok(())
    }

    fn size_bar(&mut self, n: usize, both: bool) -> Result<(), TestCaseError> {
        if self.model.is_empty() {
            return Ok(());
        }
        let (index, def, base) = self.model[n % self.model.len()];
        let reg = BAR0_REG + usize::from(index);
        let wide = matches!(def.kind, BarKind::Mem64 { .. });
        let mask = !(def.size - 1);
        let flags = match def.kind {
            BarKind::Io => 1,
            BarKind::Mem32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Mem64 { prefetchable } => 4 | (u32::from(prefetchable) << 3),
        };
        let low_bits = if def.kind == BarKind::Io { 0x3 } else { 0xf };
        let want_lo = (mask as u32 & !low_bits) | flags;
        let want_hi = (mask >> 32) as u32;
        let mut moved = Vec::new();
        if wide && both {
            moved.extend(ecam_write(&self.bus, 1, reg, u32::MAX));
            moved.extend(ecam_write(&self.bus, 1, reg + 1, u32::MAX));
            prop_assert_eq!(ecam_read(&self.bus, 1, reg), want_lo);
            prop_assert_eq!(ecam_read(&self.bus, 1, reg + 1), want_hi);
            moved.extend(ecam_write(&self.bus, 1, reg, base as u32));
            moved.extend(ecam_write(&self.bus, 1, reg + 1, (base >> 32) as u32));
        } else {
            moved.extend(ecam_write(&self.bus, 1, reg, u32::MAX));
            prop_assert_eq!(ecam_read(&self.bus, 1, reg), want_lo);
            moved.extend(ecam_write(&self.bus, 1, reg, base as u32));
            if wide {
                moved.extend(ecam_write(&self.bus, 1, reg + 1, u32::MAX));
                prop_assert_eq!(ecam_read(&self.bus, 1, reg + 1), want_hi);
                moved.extend(ecam_write(&self.bus, 1, reg + 1, (base >> 32) as u32));
            }
        }
        prop_assert!(
            moved.is_empty(),
            "sizing BAR{} and restoring it is not a move: {:?}",
            index,
            moved
        );
        self.moved(&moved)
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Cf8(v) => {
                let r = self.bus.pio_write(0xcf8, &v.to_le_bytes());
                prop_assert!(matches!(r, Ok(Some(ref m)) if m.is_empty()));
                let mut back = [0u8; 4];
                prop_assert!(self.bus.pio_read(0xcf8, &mut back));
                prop_assert_eq!(u32::from_le_bytes(back), v, "CONFIG_ADDRESS reads back");
            }
            Op::Port(p, size, v, write) => {
                let bytes = u64::from(v).to_le_bytes();
                let port = 0xcf8 + p;
                if write {
                    match self.bus.pio_write(port, &bytes[..size]) {
                        Ok(Some(m)) => self.moved(&m)?,
                        Ok(None) => self.moved(&[])?,
                        Err(e) => {
                            return Err(TestCaseError::fail(format!("port write failed: {e}")))
                        }
                    }
                } else {
                    let mut d = vec![0u8; size];
                    self.bus.pio_read(port, &mut d);
                }
            }
            Op::Ecam(off, size, v, write) => {
                let bytes = v.to_le_bytes();
                if write {
                    match self.bus.ecam_write(off, &bytes[..size]) {
                        Ok(m) => self.moved(&m)?,
                        Err(e) => {
                            return Err(TestCaseError::fail(format!("ECAM write failed: {e}")))
                        }
                    }
                } else {
                    let mut d = vec![0u8; size];
                    self.bus.ecam_read(off, &mut d);
                    // Beyond bus 0, function 0, or device 2 (empty): all-ones.
                    let (bus, dev, func) =
                        ((off >> 20) & 0xff, (off >> 15) & 0x1f, (off >> 12) & 7);
                    if bus != 0 || func != 0 || dev >= 2 || (off & 3) as usize + size > 4 {
                        prop_assert!(
                            d.iter().all(|&b| b == 0xff),
                            "absent config reads all-ones: {:x?}",
                            d
                        );
                    }
                }
            }
            Op::Size(n, both) => self.size_bar(n, both)?,
            Op::Place(n, which, raw, high_first) => {
                if self.model.is_empty() {
                    return self.check();
                }
                let (index, def, _) = self.model[n % self.model.len()];
                let top = match def.kind {
                    BarKind::Mem64 { .. } => 0u64.wrapping_sub(def.size),
                    _ => (1u64 << 32) - def.size,
                };
                let other = self.model[(raw as usize) % self.model.len()].2;
                let base = match which {
                    0 => other,
                    1 => top,
                    2 => 0,
                    _ => raw & !(def.size - 1),
                };
                let reg = BAR0_REG + usize::from(index);
                let mut moved = Vec::new();
                if matches!(def.kind, BarKind::Mem64 { .. }) && high_first {
                    moved.extend(ecam_write(&self.bus, 1, reg + 1, (base >> 32) as u32));
                }
                moved.extend(ecam_write(&self.bus, 1, reg, base as u32));
                if matches!(def.kind, BarKind::Mem64 { .. }) && !high_first {
                    moved.extend(ecam_write(&self.bus, 1, reg + 1, (base >> 32) as u32));
                }
                self.moved(&moved)?;
            }
            Op::Bar(addr, size, write, io) => {
                let data = vec![0xa5u8; size];
                let mut d = vec![0u8; size];
                match (io, write) {
                    (false, false) => {
                        self.bus.mmio_read(addr, &mut d);
                    }
                    (false, true) => {
                        self.bus.mmio_write(addr, &data);
                    }
                    (true, false) => {
                        self.bus.pio_read(addr as u16, &mut d);
                    }
                    (true, true) => {
                        let r = self.bus.pio_write(addr as u16, &data);
                        match r {
                            Ok(Some(m)) => self.moved(&m)?,
                            Ok(None) => self.moved(&[])?,
                            Err(e) => {
                                return Err(TestCaseError::fail(format!("port write failed: {e}")))
                            }
                        }
                    }
                }
            }
        }
        self.check()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn random_config_and_bar_accesses_keep_the_invariants(
        defs in bar_defs(),
        ops in prop::collection::vec(op(), 1..48),
    ) {
        let Some(mut rig) = Rig::new(&defs) else {
            return Ok(());
        };
        rig.check()?;
        for op in &ops {
            rig.apply(op)?;
        }
    }
}

/// Found by the fuzzing above: a 64-bit BAR of 8 GiB or more placed at the very top of the address
/// space ends at 2^64, which overflowed the bus's end-of-range sum (a panic in debug builds).
#[test]
fn a_large_64_bit_bar_at_the_top_of_the_address_space_does_not_overflow() {
    let defs = [
        (3u8, 33 - 4, false),
        (0, 0, false),
        (0, 0, false),
        (0, 0, false),
        (0, 0, false),
        (0, 0, false),
    ];
    let mut rig = Rig::new(&defs).expect("an 8 GiB BAR fits the 64-bit window");
    let reg = BAR0_REG;
    let mut moved = ecam_write(&rig.bus, 1, reg + 1, 0xffff_fffe);
    moved.extend(ecam_write(&rig.bus, 1, reg, 0));
    assert!(rig.moved(&moved).is_ok());
    assert_eq!(rig.model[0].2, 0xffff_fffe_0000_0000);
    let mut d = [0u8; 4];
    assert!(
        rig.bus.mmio_read(u64::MAX - 3, &mut d),
        "the BAR answers up to the last byte"
    );
    assert!(rig.check().is_ok());
}
