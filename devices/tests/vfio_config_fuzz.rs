//! Property-based fuzzing of a passthrough device's config-space virtualisation ([`VfioConfig`]): random
//! config headers (random capability chains: overlapping, looping, truncated, any ids; random BARs and
//! region sizes) and then random guest config writes of any size at any offset. The device side is an
//! in-memory config space that records what reaches it (what VFIO's config region would see).
//!
//! Checked: building never panics (a malformed header is refused with an error); the capability list the
//! guest walks ends, shows PM/MSI-X/PCIe only, and is the list `shown_capabilities` reports; identity,
//! capability ids and pointers, the expansion ROM, the interrupt pin and MSI-X table/PBA offsets stay as
//! they were; guest writes reach the device only at the command/status, cache line/latency and the bodies
//! of shown PM/PCIe capabilities, never MSI-X message control, never the PCIe FLR bit; BAR registers
//! behave exactly as a [`PciConfig`] with the same BARs; MSI-X enable/function mask and the interrupt line
//! read back what the guest wrote.
//!
//! `PROPTEST_CASES` sets the number of cases (`scripts/test` uses 4000).

use std::cell::RefCell;

use devices::pci::{PciConfig, BAR0_REG, NUM_BARS};
use devices::vfio_pci::config::{ConfigError, ConfigIo, VfioConfig, LEGACY_SIZE};
use proptest::prelude::*;

const CAP_PM: u8 = 0x01;
const CAP_MSI: u8 = 0x05;
const CAP_PCIE: u8 = 0x10;
const CAP_MSIX: u8 = 0x11;

/// The real device's config space as VFIO shows it, with a log of the writes that reached it.
struct Hw {
    bytes: RefCell<[u8; LEGACY_SIZE]>,
    writes: RefCell<Vec<(u64, Vec<u8>)>>,
}

impl ConfigIo for Hw {
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = self.bytes.borrow();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| s.get(o + i))
                .copied()
                .unwrap_or(0xff);
        }
    }
    fn write_config(&self, offset: u64, data: &[u8]) {
        self.writes.borrow_mut().push((offset, data.to_vec()));
        let mut s = self.bytes.borrow_mut();
        for (i, d) in data.iter().enumerate() {
            if let Some(b) = usize::try_from(offset).ok().and_then(|o| s.get_mut(o + i)) {
                *b = *d;
            }
        }
    }
}

/// One capability of the generated chain: (dword index in 0x40..0x100, id, bytes after id/next).
type CapDef = (usize, u8, [u8; 10]);

fn cap_id() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => Just(CAP_MSIX),
        2 => Just(CAP_PM),
        2 => Just(CAP_PCIE),
        1 => Just(CAP_MSI),
        1 => any::<u8>(),
    ]
}

/// A header: random bytes, then a capability chain written over them, BAR registers and region sizes.
fn header() -> impl Strategy<Value = ([u8; LEGACY_SIZE], [u64; NUM_BARS])> {
    // Distinct offsets in any order (so chains go backwards too), sometimes the same offset twice.
    let offsets = prop_oneof![
        4 => prop::sample::subsequence((16usize..64).collect::<Vec<_>>(), 1..8).prop_shuffle(),
        1 => prop::collection::vec(16usize..64, 1..8),
    ];
    let bodies = prop::collection::vec((cap_id(), any::<[u8; 10]>()), 8);
    let caps = (offsets, bodies).prop_map(|(o, b)| {
        o.into_iter()
            .zip(b)
            .map(|(o, (id, body))| (o, id, body))
            .collect::<Vec<CapDef>>()
    });
    let bars = prop::collection::vec((any::<u32>(), 0u32..40, 0u8..8), NUM_BARS);
    (
        prop::collection::vec(any::<u8>(), LEGACY_SIZE),
        caps,
        bars,
        prop::bool::weighted(0.95),
        0u8..4,
    )
        .prop_map(|(raw, caps, bars, cap_list, last)| {
            let mut s = [0u8; LEGACY_SIZE];
            s.copy_from_slice(&raw);
            let mut sizes = [0u64; NUM_BARS];
            // BARs the MSI-X table may sit in.
            let mut memory = Vec::new();
            for (i, &(reg, shift, kind)) in bars.iter().enumerate() {
                // Mostly memory BARs of power-of-two sizes; sometimes I/O, absent or odd sizes.
                let low = match kind {
                    0..=3 => reg & !0xf,
                    4 => (reg & !0xf) | 0x4,
                    5 => (reg & !0x3) | 0x1,
                    _ => reg,
                };
                s[0x10 + 4 * i..0x14 + 4 * i].copy_from_slice(&low.to_le_bytes());
                sizes[i] = match kind {
                    7 => u64::from(reg),
                    _ if shift == 0 => 0,
                    _ => 1u64 << (shift + 3),
                };
                if kind <= 3 && (4..32).contains(&(shift + 3)) {
                    memory.push(i as u8);
                }
            }
            s[0x06] = if cap_list {
                s[0x06] | 0x10
            } else {
                s[0x06] & !0x10
            };
            s[0x34] = caps.first().map_or(s[0x34], |c| (c.0 * 4) as u8);
            // Bodies first, then ids and pointers, so that a body does not overwrite the chain.
            for &(dw, id, body) in &caps {
                let off = dw * 4;
                let len = body.len().min(LEGACY_SIZE - off - 2);
                s[off + 2..off + 2 + len].copy_from_slice(&body[..len]);
                if id == CAP_MSIX && off + 12 <= LEGACY_SIZE {
                    // Table and PBA mostly in a memory BAR the device has.
                    let pick = |b: u8| match memory.len() {
                        0 => b % 8,
                        n if b < 200 => memory[usize::from(b) % n],
                        _ => b % 8,
                    };
                    s[off + 4] = (s[off + 4] & !7) | pick(body[0]);
                    s[off + 8] = (s[off + 8] & !7) | pick(body[1]);
                }
            }
            for (k, &(dw, id, _)) in caps.iter().enumerate() {
                let off = dw * 4;
                s[off] = id;
                s[off + 1] = match caps.get(k + 1) {
                    Some(n) => (n.0 * 4) as u8,
                    // The last pointer: the end, a loop, or a pointer into the header.
                    None => [0, caps[0].0 as u8 * 4, 0x3c, s[off + 1]][usize::from(last)],
                };
            }
            (s, sizes)
        })
}

#[derive(Clone, Debug)]
enum Op {
    /// A config write: register, byte offset, bytes (any of them may be out of range).
    Write(usize, u8, Vec<u8>),
    /// A dword write at a capability the device has (index into its shown capabilities), at `dw`.
    CapWrite(usize, usize, u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..64, 0u8..4, prop::collection::vec(any::<u8>(), 1..=4))
            .prop_map(|(r, o, d)| Op::Write(r, o, d)),
        1 => (any::<usize>(), 0u8..8, prop::collection::vec(any::<u8>(), 0..9))
            .prop_map(|(r, o, d)| Op::Write(r % 2048, o, d)),
        3 => (any::<usize>(), 0usize..15, any::<u32>()).prop_map(|(c, dw, v)| Op::CapWrite(c, dw, v)),
    ]
}

struct Rig {
    c: VfioConfig,
    hw: Hw,
    /// A plain config space with the same BARs: what the BAR registers must do.
    bars: PciConfig,
    /// (register, value) that must never change.
    fixed: Vec<(usize, u32)>,
    /// Byte offsets a guest write may reach the device at.
    reachable: [bool; LEGACY_SIZE],
    /// Offsets of PCIe device control's high byte (bit 7: initiate FLR).
    flr: Vec<usize>,
    msix_ctl: usize,
}

fn cap_len(id: u8, s: &[u8; LEGACY_SIZE], off: usize) -> usize {
    let len = match id {
        CAP_PM => 8,
        CAP_MSIX => 12,
        CAP_PCIE if s[off + 2] & 0xf >= 2 => 0x3c,
        CAP_PCIE => 0x24,
        _ => 0,
    };
    len.min(LEGACY_SIZE - off)
}

impl Rig {
    fn new(s: &[u8; LEGACY_SIZE], sizes: &[u64; NUM_BARS]) -> Result<Option<Self>, TestCaseError> {
        let c = match VfioConfig::new(s, sizes) {
            Ok(c) => c,
            Err(
                ConfigError::NoMsiOrMsix
                | ConfigError::MsiOnly
                | ConfigError::BadMsixBar { .. }
                | ConfigError::MsixCapTruncated(_),
            ) => return Ok(None),
        };
        let hw = Hw {
            bytes: RefCell::new(*s),
            writes: RefCell::new(Vec::new()),
        };
        let mut bars = PciConfig::new(0, 0, 0, 0, 0);
        for (i, d) in c.bar_defs().iter().enumerate() {
            if let Some(d) = d {
                prop_assert!(bars.add_bar(i, *d), "BAR{} {:?} is a valid BAR", i, d);
            }
        }
        let msix = c.msix().ok_or_else(|| TestCaseError::fail("no MSI-X"))?;
        let mut reachable = [false; LEGACY_SIZE];
        reachable[4..8].fill(true);
        reachable[0x0c..0x0e].fill(true);
        let mut flr = Vec::new();
        for cap in c.shown_capabilities() {
            let len = cap_len(cap.id, s, cap.offset);
            if cap.id != CAP_MSIX {
                reachable[cap.offset + 2..cap.offset + len].fill(true);
            }
            if cap.id == CAP_PCIE && len > 9 {
                flr.push(cap.offset + 9);
            }
        }
        for cap in c.shown_capabilities() {
            reachable[cap.offset..cap.offset + 2].fill(false);
        }
        reachable[msix.offset..msix.offset + 12].fill(false);
        let mut rig = Rig {
            c,
            hw,
            bars,
            fixed: Vec::new(),
            reachable,
            flr,
            msix_ctl: msix.offset + 2,
        };
        let mut fixed = vec![0, 2, 0x28 / 4, 0x2c / 4, 0x30 / 4, 0x34 / 4];
        fixed.extend((msix.offset / 4 + 1)..(msix.offset / 4 + 3));
        let fixed = fixed
            .into_iter()
            .map(|r| (r, rig.read(r)))
            .collect::<Vec<_>>();
        rig.fixed = fixed;
        Ok(Some(rig))
    }

    fn read(&self, reg: usize) -> u32 {
        self.c.read_register(reg, &self.hw)
    }

    fn check(&self) -> Result<(), TestCaseError> {
        for &(reg, v) in &self.fixed {
            prop_assert_eq!(self.read(reg), v, "register {:#x} is read-only", reg * 4);
        }
        prop_assert_eq!(self.read(3) & 0x0080_0000, 0, "single-function");
        prop_assert_eq!(self.read(3) >> 24, 0, "no BIST");
        prop_assert_eq!((self.read(0x3c / 4) >> 8) & 0xff, 0, "no interrupt pin");
        prop_assert_ne!(self.read(1) & (0x10 << 16), 0, "status shows a list");
        for reg in [64, 65, 0x3ff, 0x400, usize::MAX] {
            prop_assert_eq!(self.read(reg), 0, "beyond the legacy space");
        }
        // The list the guest walks: ends, has only PM/MSI-X/PCIe, is what `shown_capabilities` says.
        let mut walked = Vec::new();
        let mut ptr = (self.read(0x34 / 4) & 0xff) as usize;
        while ptr != 0 {
            prop_assert!(walked.len() < 48, "the capability list loops");
            prop_assert!(ptr >= 0x40 && ptr.is_multiple_of(4), "pointer {:#x}", ptr);
            let dw = self.read(ptr / 4);
            walked.push(((dw & 0xff) as u8, ptr));
            ptr = ((dw >> 8) & 0xff) as usize;
        }
        let shown: Vec<_> = self
            .c
            .shown_capabilities()
            .iter()
            .map(|c| (c.id, c.offset))
            .collect();
        prop_assert_eq!(&walked, &shown);
        prop_assert!(walked
            .iter()
            .all(|(id, _)| [CAP_PM, CAP_MSIX, CAP_PCIE].contains(id)));
        prop_assert_eq!(
            walked.iter().filter(|(id, _)| *id == CAP_MSIX).count(),
            1,
            "one MSI-X capability"
        );
        // Only the bytes a guest may reach the device at were written, FLR never.
        for (off, data) in self.hw.writes.borrow().iter() {
            for (i, d) in data.iter().enumerate() {
                let pos = *off as usize + i;
                prop_assert!(
                    self.reachable.get(pos).copied().unwrap_or(false),
                    "a guest write reached the device at {:#x}",
                    pos
                );
                prop_assert!(
                    !self.flr.contains(&pos) || d & 0x80 == 0,
                    "the guest initiated an FLR"
                );
                prop_assert!(pos != 6 || d & 0x10 == 0, "status bit 4 is the VMM's");
            }
        }
        // MSI-X message control: the table size is read-only, the state is what the register says.
        let ctl = self.read(self.msix_ctl / 4) >> 16;
        let (en, fm) = self.c.msix_state();
        prop_assert_eq!((ctl & 0x8000 != 0, ctl & 0x4000 != 0), (en, fm));
        prop_assert_eq!(
            u32::from(self.c.msix().map_or(0, |m| m.vectors)),
            (ctl & 0x7ff) + 1
        );
        for i in 0..NUM_BARS {
            prop_assert_eq!(
                self.read(BAR0_REG + i),
                self.bars.read_register(BAR0_REG + i),
                "BAR{}",
                i
            );
        }
        prop_assert_eq!(self.c.bars(), self.bars.bars());
        Ok(())
    }

    fn write(&mut self, reg: usize, offset: u8, data: &[u8]) -> Result<(), TestCaseError> {
        let ctl_before = self.read(self.msix_ctl / 4);
        let line_before = self.read(0x3c / 4) & 0xff;
        let fx = self.c.write_register(reg, offset, data, &self.hw);
        let in_range = !data.is_empty() && usize::from(offset) + data.len() <= 4;
        let bar_fx = if in_range {
            self.bars.write_register(reg, offset, data)
        } else {
            Vec::new()
        };
        prop_assert_eq!(&fx.relocations, &bar_fx, "relocations");
        let ctl_hi = self.msix_ctl + 1;
        let start = reg.saturating_mul(4).saturating_add(usize::from(offset));
        let covers = |pos: usize| in_range && (start..start + data.len()).contains(&pos);
        prop_assert_eq!(fx.msix_control, covers(ctl_hi), "MSI-X control written");
        if covers(ctl_hi) {
            let d = data[ctl_hi - start];
            let now = self.read(self.msix_ctl / 4);
            prop_assert_eq!(
                now >> 24,
                ((ctl_before >> 24) & 0x3f) | u32::from(d & 0xc0),
                "enable and function mask read back"
            );
        }
        let line = self.read(0x3c / 4) & 0xff;
        if covers(0x3c) {
            prop_assert_eq!(line, u32::from(data[0x3c - start]), "interrupt line");
        } else {
            prop_assert_eq!(line, line_before, "interrupt line");
        }
        self.check()
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Write(reg, off, data) => self.write(*reg, *off, data),
            Op::CapWrite(k, dw, v) => {
                let caps = self.c.shown_capabilities();
                let cap = caps[k % caps.len()];
                let reg = (cap.offset / 4 + dw).min(LEGACY_SIZE / 4 - 1);
                self.write(reg, 0, &v.to_le_bytes())
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn random_headers_and_config_writes_keep_the_invariants(
        (snapshot, sizes) in header(),
        ops in prop::collection::vec(op(), 0..32),
    ) {
        let Some(mut rig) = Rig::new(&snapshot, &sizes)? else {
            return Ok(());
        };
        rig.check()?;
        for op in &ops {
            rig.apply(op)?;
        }
    }
}

/// How often the generated headers are usable (so the property above exercises writes, not only refusals).
#[test]
fn most_generated_headers_are_accepted() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = header();
    let accepted = (0..400)
        .filter(|_| {
            let (s, sizes) = strategy
                .new_tree(&mut runner)
                .map(|t| t.current())
                .unwrap_or(([0; LEGACY_SIZE], [0; NUM_BARS]));
            VfioConfig::new(&s, &sizes).is_ok()
        })
        .count();
    assert!(accepted >= 80, "only {accepted} of 400 headers accepted");
}
