//! A type-0 PCI configuration space held in memory: identity registers, BARs (with sizing and relocation
//! detection), the command register, the interrupt line and a capability list. Emulated devices use it as
//! their whole config space; a passthrough device can use it for the parts it virtualises (BARs).

use super::{merge_into_register, BarRegion, BarRelocation, BAR0_REG, CONFIG_REGS, NUM_BARS};

/// Address space and width of a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O port space.
    Io,
    /// 32-bit memory space.
    Mem32 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
    /// 64-bit memory space (uses this BAR and the next).
    Mem64 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
}

impl BarKind {
    /// True for memory BARs.
    pub fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }

    fn flag_bits(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Mem32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Mem64 { prefetchable } => 0x4 | (u32::from(prefetchable) << 3),
        }
    }
}

/// The definition of one BAR: its size (a power of two; at least 16 bytes for memory, 4 for I/O) and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarDef {
    /// Size in bytes.
    pub size: u64,
    /// Address space and width.
    pub kind: BarKind,
}

/// Standard config register offsets (in bytes).
const OFF_CAP_PTR: usize = 0x34;
const OFF_INT_LINE: usize = 0x3c;
const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// Command bits the guest may change: I/O, memory, bus master, parity error response, SERR#, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;
const FIRST_CAP_OFFSET: usize = 0x40;

/// An in-memory type-0 configuration space. See the module documentation.
pub struct PciConfig {
    regs: Box<[u32; CONFIG_REGS]>,
    write_mask: Box<[u32; CONFIG_REGS]>,
    bars: [Option<PciBarDef>; NUM_BARS],
    /// Per BAR register: the last full value written was all-ones (the guest is sizing it).
    sizing: [bool; NUM_BARS],
    /// Per BAR: the base last reported (or 0).
    placed: [u64; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfig {
    /// A header-type-0 function with the given identity. Class code = `class`:`subclass`:`prog_if`.
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8) -> Self {
        let mut regs = Box::new([0u32; CONFIG_REGS]);
        let mut write_mask = Box::new([0u32; CONFIG_REGS]);
        regs[0] = u32::from(vendor) | (u32::from(device) << 16);
        regs[2] =
            (u32::from(class) << 24) | (u32::from(subclass) << 16) | (u32::from(prog_if) << 8);
        write_mask[1] = COMMAND_WRITABLE;
        write_mask[OFF_INT_LINE / 4] = 0xff;
        Self {
            regs,
            write_mask,
            bars: [None; NUM_BARS],
            sizing: [false; NUM_BARS],
            placed: [0; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        }
    }

    /// Sets the revision id (config byte 0x08).
    pub fn set_revision(&mut self, revision: u8) {
        self.regs[2] = (self.regs[2] & !0xff) | u32::from(revision);
    }

    /// Sets the subsystem vendor and device ids.
    pub fn set_subsystem(&mut self, vendor: u16, device: u16) {
        self.regs[0x2c / 4] = u32::from(vendor) | (u32::from(device) << 16);
    }

    /// Declares BAR `index`. A 64-bit BAR also takes `index + 1`. Returns `false` (and changes nothing)
    /// when the index is taken or out of range, or the size is not a power of two of at least 16 (memory)
    /// or 4 (I/O) bytes.
    pub fn add_bar(&mut self, index: usize, def: PciBarDef) -> bool {
        let wide = matches!(def.kind, BarKind::Mem64 { .. });
        let min = if def.kind.is_memory() { 16 } else { 4 };
        let last = if wide { index + 1 } else { index };
        if last >= NUM_BARS
            || self.bars[index].is_some()
            || (wide && self.bars[index + 1].is_some())
            || (index > 0
                && matches!(
                    self.bars[index - 1],
                    Some(PciBarDef {
                        kind: BarKind::Mem64 { .. },
                        ..
                    })
                ))
            || !def.size.is_power_of_two()
            || def.size < min
            || (!wide && def.size > 1 << 31)
        {
            return false;
        }
        self.bars[index] = Some(def);
        let mask = !(def.size - 1);
        self.regs[BAR0_REG + index] = def.kind.flag_bits();
        self.write_mask[BAR0_REG + index] = match def.kind {
            BarKind::Io => (mask as u32) & 0xffff_fffc,
            _ => (mask as u32) & 0xffff_fff0,
        };
        if wide {
            self.write_mask[BAR0_REG + index + 1] = (mask >> 32) as u32;
        }
        true
    }

    /// Appends a capability with id `id` and `body` (the bytes after the id/next pair). Returns its offset,
    /// or `None` when the 256-byte legacy space is full. `writable` gives per-register write masks for the
    /// capability's registers (register 0 holds id/next; its mask applies to the upper 16 bits only).
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u32]) -> Option<usize> {
        let len = (2 + body.len()).div_ceil(4) * 4;
        let off = self.next_cap;
        if off + len > 0x100 {
            return None;
        }
        let mut bytes = vec![0u8; len];
        bytes[0] = id;
        bytes[2..2 + body.len()].copy_from_slice(body);
        for (i, chunk) in bytes.chunks(4).enumerate() {
            let mut w = [0u8; 4];
            w.copy_from_slice(chunk);
            self.regs[off / 4 + i] = u32::from_le_bytes(w);
            let mask = writable.get(i).copied().unwrap_or(0);
            self.write_mask[off / 4 + i] = if i == 0 { mask & 0xffff_0000 } else { mask };
        }
        match self.last_cap {
            None => {
                self.regs[OFF_CAP_PTR / 4] = off as u32;
                self.regs[1] |= STATUS_CAP_LIST;
            }
            Some(prev) => {
                let r = &mut self.regs[prev / 4];
                *r = (*r & !0xff00) | ((off as u32) << 8);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = off + len;
        Some(off)
    }

    /// Reads register `reg` (0 for out-of-range).
    pub fn read_register(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// The command register (low 16 bits of register 1).
    pub fn command(&self) -> u16 {
        self.regs[1] as u16
    }

    /// A guest write of `data` at byte `offset` of register `reg`; returns the BARs that moved.
    pub fn write_register(&mut self, reg: usize, offset: u8, data: &[u8]) -> Vec<BarRelocation> {
        if reg >= CONFIG_REGS || usize::from(offset) + data.len() > 4 {
            return Vec::new();
        }
        let old = self.regs[reg];
        let merged = merge_into_register(old, offset, data);
        let mask = self.write_mask[reg];
        self.regs[reg] = (old & !mask) | (merged & mask);
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            let slot = reg - BAR0_REG;
            self.sizing[slot] = merged == 0xffff_ffff;
            let owner = match self.bars[slot] {
                Some(_) => Some(slot),
                None if slot > 0 => match self.bars[slot - 1] {
                    Some(PciBarDef {
                        kind: BarKind::Mem64 { .. },
                        ..
                    }) => Some(slot - 1),
                    _ => None,
                },
                None => None,
            };
            if let Some(i) = owner {
                return self.check_relocation(i).into_iter().collect();
            }
        }
        Vec::new()
    }

    fn check_relocation(&mut self, index: usize) -> Option<BarRelocation> {
        let def = self.bars[index]?;
        let wide = matches!(def.kind, BarKind::Mem64 { .. });
        if self.sizing[index] || (wide && self.sizing[index + 1]) {
            return None;
        }
        let base = self.bar_base(index, def);
        if base == self.placed[index] {
            return None;
        }
        let old_base = self.placed[index];
        self.placed[index] = base;
        Some(BarRelocation {
            index: index as u8,
            old_base,
            new_base: base,
            size: def.size,
            kind: def.kind,
        })
    }

    fn bar_base(&self, index: usize, def: PciBarDef) -> u64 {
        let lo = u64::from(self.regs[BAR0_REG + index]);
        match def.kind {
            BarKind::Io => lo & !0x3,
            BarKind::Mem32 { .. } => lo & !0xf,
            BarKind::Mem64 { .. } => {
                (lo & !0xf) | (u64::from(self.regs[BAR0_REG + index + 1]) << 32)
            }
        }
    }

    /// The BARs as currently programmed.
    pub fn bars(&self) -> Vec<BarRegion> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                d.map(|def| BarRegion {
                    index: i as u8,
                    base: self.placed[i],
                    size: def.size,
                    kind: def.kind,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w32(c: &mut PciConfig, reg: usize, v: u32) -> Vec<BarRelocation> {
        c.write_register(reg, 0, &v.to_le_bytes())
    }

    #[test]
    fn identity_and_readonly_registers() {
        let mut c = PciConfig::new(0x8086, 0x10c9, 0x02, 0x00, 0x00);
        assert_eq!(c.read_register(0), 0x10c9_8086);
        assert_eq!(c.read_register(2) >> 8, 0x02_00_00);
        w32(&mut c, 0, 0xdead_beef);
        assert_eq!(c.read_register(0), 0x10c9_8086, "ids are read-only");
        w32(&mut c, 1, 0xffff_ffff);
        assert_eq!(c.command(), 0x0547);
    }

    #[test]
    fn bar32_sizing_then_placement_reports_one_relocation() {
        let mut c = PciConfig::new(1, 2, 0, 0, 0);
        assert!(c.add_bar(
            0,
            PciBarDef {
                size: 0x4000,
                kind: BarKind::Mem32 {
                    prefetchable: false
                }
            }
        ));
        assert!(
            w32(&mut c, BAR0_REG, 0xffff_ffff).is_empty(),
            "sizing is not a move"
        );
        assert_eq!(c.read_register(BAR0_REG), 0xffff_c000);
        let r = w32(&mut c, BAR0_REG, 0xc000_0000);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].old_base, r[0].new_base, r[0].size),
            (0, 0xc000_0000, 0x4000)
        );
        assert!(w32(&mut c, BAR0_REG, 0xffff_ffff).is_empty());
        assert!(
            w32(&mut c, BAR0_REG, 0xc000_0000).is_empty(),
            "restoring after sizing is not a move"
        );
        assert_eq!(c.bars()[0].base, 0xc000_0000);
    }

    #[test]
    fn bar64_linux_sizing_sequence_reports_nothing_transient() {
        let mut c = PciConfig::new(1, 2, 0, 0, 0);
        assert!(c.add_bar(
            2,
            PciBarDef {
                size: 1 << 20,
                kind: BarKind::Mem64 { prefetchable: true }
            }
        ));
        assert_eq!(c.read_register(BAR0_REG + 2), 0xc);
        // Placement: low then high.
        let mut moved = w32(&mut c, BAR0_REG + 2, 0x0010_0000);
        moved.extend(w32(&mut c, BAR0_REG + 3, 0x10));
        assert_eq!(moved.last().map(|r| r.new_base), Some(0x10_0010_0000));
        // Linux sizing: low ~0, high ~0, restore low, restore high.
        assert!(w32(&mut c, BAR0_REG + 2, !0).is_empty());
        assert!(w32(&mut c, BAR0_REG + 3, !0).is_empty());
        assert_eq!(c.read_register(BAR0_REG + 2), 0xfff0_000c);
        assert_eq!(c.read_register(BAR0_REG + 3), 0xffff_ffff);
        assert!(w32(&mut c, BAR0_REG + 2, 0x0010_0000).is_empty());
        assert!(w32(&mut c, BAR0_REG + 3, 0x10).is_empty());
        assert_eq!(c.bars()[0].base, 0x10_0010_0000);
        // A real move of the high half is reported.
        let r = w32(&mut c, BAR0_REG + 3, 0x20);
        assert_eq!(r[0].old_base, 0x10_0010_0000);
        assert_eq!(r[0].new_base, 0x20_0010_0000);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = PciConfig::new(1, 2, 0, 0, 0);
        let m64 = BarKind::Mem64 {
            prefetchable: false,
        };
        assert!(
            !c.add_bar(
                5,
                PciBarDef {
                    size: 0x1000,
                    kind: m64
                }
            ),
            "64-bit BAR needs two slots"
        );
        assert!(!c.add_bar(
            0,
            PciBarDef {
                size: 0x1001,
                kind: m64
            }
        ));
        assert!(c.add_bar(
            0,
            PciBarDef {
                size: 0x1000,
                kind: m64
            }
        ));
        assert!(
            !c.add_bar(
                1,
                PciBarDef {
                    size: 0x1000,
                    kind: BarKind::Io
                }
            ),
            "upper half is taken"
        );
        assert!(c.add_bar(
            2,
            PciBarDef {
                size: 0x20,
                kind: BarKind::Io
            }
        ));
        assert_eq!(c.read_register(BAR0_REG + 2), 1);
    }

    #[test]
    fn capability_list_is_linked() {
        let mut c = PciConfig::new(1, 2, 0, 0, 0);
        let a = c.add_capability(0x05, &[0; 12], &[]).unwrap_or(0);
        let b = c
            .add_capability(0x11, &[0; 10], &[0xffff_0000])
            .unwrap_or(0);
        assert_eq!((a, b), (0x40, 0x50));
        assert_ne!(c.read_register(1) & STATUS_CAP_LIST, 0);
        assert_eq!(c.read_register(OFF_CAP_PTR / 4) & 0xff, 0x40);
        assert_eq!((c.read_register(0x40 / 4) >> 8) & 0xff, 0x50);
        assert_eq!(c.read_register(0x50 / 4) & 0xffff, 0x0011);
        w32(&mut c, 0x50 / 4, 0xc000_ffff);
        assert_eq!(
            c.read_register(0x50 / 4),
            0xc000_0011,
            "id/next stay read-only"
        );
    }
}
