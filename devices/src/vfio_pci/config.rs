//! Config-space virtualisation of a passthrough device: which bits the guest reads from the real device,
//! which it reads from a virtual copy, and which of its writes reach the device.
//!
//! The model (as QEMU's hw/vfio and the kernel's vfio_pci_config.c do it): per byte of the 256-byte
//! legacy space, an *emulated* mask (bits served from the virtual copy) and a *writable* mask (emulated bits
//! the guest may change). Bits that are not emulated are read from and written to the device through VFIO.
//!
//! - Identity (ids, class, subsystem, header type without the multi-function bit) is emulated read-only.
//! - BARs are fully emulated by a [`PciConfig`]: sizing and relocation to the guest addresses the VMM's bus
//!   allocates; the device's own BARs stay where the host put them. The expansion ROM is hidden.
//! - Interrupt pin reads 0 (no INTx); interrupt line is a scratch register.
//! - Capabilities: PM, PCI Express and MSI-X are shown (the first of each), every other one is unlinked
//!   and reads as 0. A capability ends where the next one starts, so overlapping ones of a malformed
//!   device cannot undo each other's emulation. MSI is hidden (the guest uses MSI-X). The PCIe "initiate
//!   function level reset" bit is emulated as 0 and read-only: only the VMM resets the device (through
//!   VFIO), so the guest cannot reset it under the VMM's feet. MSI-X message control is emulated (enable and function mask are the VMM's to apply).
//! - The extended space (0x100..0x1000) reads as 0: no extended capability is shown.
//!
//! Nothing the guest writes can fail: out-of-range or malformed accesses are logged and dropped.

use super::msix::{MsixCap, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use crate::pci::{BarKind, BarRelocation, PciBarDef, PciConfig, BAR0_REG, CONFIG_REGS, NUM_BARS};

/// Size of the legacy config space that is virtualised byte by byte.
pub const LEGACY_SIZE: usize = 256;
/// Capability ids.
const CAP_PM: u8 = 0x01;
const CAP_MSI: u8 = 0x05;
const CAP_PCIE: u8 = 0x10;
const CAP_MSIX: u8 = 0x11;
/// Register index of the expansion ROM BAR.
const ROM_REG: usize = 0x30 / 4;

/// Access to the real device's config space (VFIO's config region). Offsets are in bytes.
pub trait ConfigIo {
    /// Reads `data.len()` bytes at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset`.
    fn write_config(&self, offset: u64, data: &[u8]);
}

/// Why a device cannot be virtualised.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Neither MSI nor MSI-X: this VMM does not emulate INTx for passthrough devices.
    #[error("the device has neither MSI nor MSI-X; this VMM delivers passthrough interrupts only through MSI-X (INTx is not supported): pass through a device with MSI-X")]
    NoMsiOrMsix,
    /// MSI but no MSI-X.
    #[error("the device has MSI but no MSI-X; this VMM delivers passthrough interrupts through MSI-X only: pass through a device with MSI-X")]
    MsiOnly,
    /// The MSI-X table or PBA lies in a BAR the device does not have.
    #[error("the device's MSI-X table (BAR{table_bar}) or PBA (BAR{pba_bar}) is not in a memory BAR it has")]
    BadMsixBar {
        /// Table BAR.
        table_bar: u8,
        /// PBA BAR.
        pba_bar: u8,
    },
    /// The MSI-X capability's 12 bytes do not fit in the config header or run into another capability.
    #[error("the device's MSI-X capability at {0:#x} runs past the 256-byte config header or into another capability: its config space is malformed; it cannot be passed through")]
    MsixCapTruncated(usize),
}

/// What a guest config write changed, for the device to act on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteEffects {
    /// BARs whose guest address changed.
    pub relocations: Vec<BarRelocation>,
    /// The MSI-X enable or function-mask bit was written.
    pub msix_control: bool,
}

/// A capability the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShownCap {
    /// Capability id.
    pub id: u8,
    /// Offset in config space.
    pub offset: usize,
}

/// The virtualised config space. See the module documentation.
pub struct VfioConfig {
    bars: PciConfig,
    bar_defs: [Option<PciBarDef>; NUM_BARS],
    virt: [u8; LEGACY_SIZE],
    emulated: [u8; LEGACY_SIZE],
    writable: [u8; LEGACY_SIZE],
    msix: Option<MsixCap>,
    shown: Vec<ShownCap>,
}

fn rd32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

/// The BAR kind a BAR register's low bits announce.
pub fn bar_kind(reg: u32) -> BarKind {
    if reg & 1 != 0 {
        BarKind::Io
    } else {
        let prefetchable = reg & 0x8 != 0;
        if reg & 0x6 == 0x4 {
            BarKind::Mem64 { prefetchable }
        } else {
            BarKind::Mem32 { prefetchable }
        }
    }
}

impl VfioConfig {
    /// Builds the virtual config space from a snapshot of the device's first 256 bytes and the sizes of
    /// its BAR regions as VFIO reports them (`bar_sizes[i]` for BAR i; 0 = absent).
    pub fn new(
        snapshot: &[u8; LEGACY_SIZE],
        bar_sizes: &[u64; NUM_BARS],
    ) -> Result<Self, ConfigError> {
        let s = snapshot;
        let mut bars = PciConfig::new(
            u16::from_le_bytes([s[0], s[1]]),
            u16::from_le_bytes([s[2], s[3]]),
            s[0xb],
            s[0xa],
            s[9],
        );
        let mut bar_defs = [None; NUM_BARS];
        let mut i = 0;
        while i < NUM_BARS {
            let reg = rd32(s, 0x10 + 4 * i);
            let kind = bar_kind(reg);
            let wide = matches!(kind, BarKind::Mem64 { .. });
            let size = bar_sizes[i];
            if size != 0 {
                // Shown with the device's own kind: a 64-bit BAR goes to the 64-bit window, which the
                // VMM places within the guest CPU's physical address width.
                let def = PciBarDef { size, kind };
                if bars.add_bar(i, def) {
                    bar_defs[i] = Some(def);
                } else {
                    log::warn!("vfio-pci: BAR{i} ({size:#x} bytes, {kind:?}) cannot be shown to the guest; hiding it");
                }
            }
            i += if wide { 2 } else { 1 };
        }

        let mut c = VfioConfig {
            bars,
            bar_defs,
            virt: *snapshot,
            emulated: [0; LEGACY_SIZE],
            writable: [0; LEGACY_SIZE],
            msix: None,
            shown: Vec::new(),
        };
        // Header: emulate identity, hide what the guest must not see.
        c.emulate_ro(0x00, 4); // vendor, device
        c.emulate_ro(0x08, 4); // revision, class
        c.virt[0x0e] &= 0x7f; // single-function
        c.emulate_ro(0x0e, 2); // header type, BIST
        c.virt[0x0f] = 0;
        c.zero_ro(0x28, 4); // CardBus CIS
        c.emulate_ro(0x2c, 4); // subsystem ids
        c.zero_ro(0x34, 8); // capability pointer (set below), reserved
        c.emulate(0x3c, 1, 0xff); // interrupt line: scratch
        c.zero_ro(0x3d, 1); // interrupt pin: none
        c.emulate_ro(0x3e, 2);
        // Capabilities: everything hidden unless shown below.
        c.zero_ro(0x40, LEGACY_SIZE - 0x40);

        let mut found = Vec::new();
        if s[0x06] & 0x10 != 0 {
            let mut ptr = usize::from(s[0x34] & 0xfc);
            let mut seen = [false; LEGACY_SIZE / 4];
            while (0x40..LEGACY_SIZE).contains(&ptr) && !seen[ptr / 4] {
                seen[ptr / 4] = true;
                found.push((s[ptr], ptr));
                ptr = usize::from(s[ptr + 1] & 0xfc);
            }
        }
        let has_msi = found.iter().any(|(id, _)| *id == CAP_MSI);
        // A capability ends where the next one (in offset order) starts, as QEMU's vfio does: bodies never
        // overlap, so what one emulates another cannot pass through.
        let room = |off: usize| {
            found
                .iter()
                .map(|&(_, o)| o)
                .filter(|&o| o > off)
                .min()
                .unwrap_or(LEGACY_SIZE)
                - off
        };
        if let Some(&(_, off)) = found.iter().find(|(id, _)| *id == CAP_MSIX) {
            if room(off) < 12 {
                return Err(ConfigError::MsixCapTruncated(off));
            }
            let cap = MsixCap::parse(off, rd32(s, off), rd32(s, off + 4), rd32(s, off + 8));
            let ok = |b: u8| {
                c.bar_defs
                    .get(usize::from(b))
                    .copied()
                    .flatten()
                    .is_some_and(|d| d.kind.is_memory())
            };
            if !ok(cap.table_bar) || !ok(cap.pba_bar) {
                return Err(ConfigError::BadMsixBar {
                    table_bar: cap.table_bar,
                    pba_bar: cap.pba_bar,
                });
            }
            c.msix = Some(cap);
        } else if has_msi {
            return Err(ConfigError::MsiOnly);
        } else {
            return Err(ConfigError::NoMsiOrMsix);
        }

        for &(id, off) in &found {
            let len = match id {
                CAP_PM => 8,
                CAP_MSIX => 12,
                CAP_PCIE => {
                    if s[off + 2] & 0xf >= 2 {
                        0x3c
                    } else {
                        0x24
                    }
                }
                _ => continue,
            };
            // Each kind is shown once, the first in the list: a second MSI-X would be one the VMM
            // does not serve.
            if c.shown.iter().any(|cap| cap.id == id) {
                log::warn!("vfio-pci: a second capability {id:#x} at {off:#x} is hidden");
                continue;
            }
            let len = len.min(room(off));
            // Body passes through; id and next pointer are the VMM's.
            c.virt[off..off + len].copy_from_slice(&s[off..off + len]);
            c.passthrough(off, len);
            c.emulate_ro(off, 2);
            if id == CAP_MSIX {
                // Message control: table size read-only, enable + function mask emulated.
                c.virt[off + 2] = s[off + 2];
                c.virt[off + 3] = s[off + 3] & 0x07;
                c.emulate(off + 2, 1, 0);
                c.emulate(off + 3, 1, 0xc0);
                c.emulate_ro(off + 4, 8);
            }
            c.shown.push(ShownCap { id, offset: off });
        }
        // PCIe device control bit 15: initiate FLR. Only the VMM resets the device, even when another
        // capability runs over the device control register.
        if let Some(cap) = c.shown.iter().find(|cap| cap.id == CAP_PCIE) {
            let devctl_hi = cap.offset + 9;
            if devctl_hi < LEGACY_SIZE {
                c.virt[devctl_hi] &= 0x7f;
                c.emulated[devctl_hi] |= 0x80;
                c.writable[devctl_hi] &= 0x7f;
            }
        }
        // Link the shown capabilities.
        let first = c.shown.first().map(|cap| cap.offset as u8).unwrap_or(0);
        c.virt[0x34] = first;
        for k in 0..c.shown.len() {
            let next = c.shown.get(k + 1).map(|n| n.offset as u8).unwrap_or(0);
            c.virt[c.shown[k].offset + 1] = next;
        }
        c.virt[0x06] = (c.virt[0x06] & !0x10) | if c.shown.is_empty() { 0 } else { 0x10 };
        c.emulated[0x06] |= 0x10;
        Ok(c)
    }

    fn emulate(&mut self, off: usize, len: usize, writable: u8) {
        for p in off..off + len {
            self.emulated[p] = 0xff;
            self.writable[p] = writable;
        }
    }
    fn emulate_ro(&mut self, off: usize, len: usize) {
        self.emulate(off, len, 0);
    }
    fn zero_ro(&mut self, off: usize, len: usize) {
        self.emulate(off, len, 0);
        self.virt[off..off + len].fill(0);
    }
    fn passthrough(&mut self, off: usize, len: usize) {
        self.emulated[off..off + len].fill(0);
        self.writable[off..off + len].fill(0);
    }

    /// The MSI-X capability, if the device has one (it always has after [`new`](Self::new) succeeded).
    pub fn msix(&self) -> Option<MsixCap> {
        self.msix
    }

    /// The capabilities the guest sees, in list order.
    pub fn shown_capabilities(&self) -> &[ShownCap] {
        &self.shown
    }

    /// The BARs shown to the guest (index, size, kind).
    pub fn bar_defs(&self) -> &[Option<PciBarDef>; NUM_BARS] {
        &self.bar_defs
    }

    /// The BARs as currently programmed by the guest (or the bus).
    pub fn bars(&self) -> Vec<crate::pci::BarRegion> {
        self.bars.bars()
    }

    /// The guest's MSI-X message control (enable, function mask).
    pub fn msix_state(&self) -> (bool, bool) {
        match self.msix {
            Some(cap) => {
                let ctl =
                    u16::from_le_bytes([self.virt[cap.offset + 2], self.virt[cap.offset + 3]]);
                (ctl & MSIX_ENABLE != 0, ctl & MSIX_FUNCTION_MASK != 0)
            }
            None => (false, false),
        }
    }

    /// Reads config register `reg` as the guest sees it.
    pub fn read_register(&self, reg: usize, dev: &dyn ConfigIo) -> u32 {
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            return self.bars.read_register(reg);
        }
        if reg == ROM_REG || reg >= LEGACY_SIZE / 4 {
            return 0;
        }
        let off = reg * 4;
        let emu = rd32(&self.emulated, off);
        let virt = rd32(&self.virt, off);
        if emu == u32::MAX {
            return virt;
        }
        let mut b = [0u8; 4];
        dev.read_config(off as u64, &mut b);
        (u32::from_le_bytes(b) & !emu) | (virt & emu)
    }

    /// A guest write of `data` at byte `offset` (0..=3) of register `reg`. Never fails: what the guest may
    /// not change is dropped (and logged at debug level).
    pub fn write_register(
        &mut self,
        reg: usize,
        offset: u8,
        data: &[u8],
        dev: &dyn ConfigIo,
    ) -> WriteEffects {
        let mut fx = WriteEffects::default();
        let offset = usize::from(offset);
        if reg >= CONFIG_REGS || data.is_empty() || offset + data.len() > 4 {
            log::warn!(
                "vfio-pci: dropped a malformed config write (register {reg:#x}, offset {offset}, {} bytes)",
                data.len()
            );
            return fx;
        }
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            fx.relocations = self.bars.write_register(reg, offset as u8, data);
            return fx;
        }
        if reg == ROM_REG || reg >= LEGACY_SIZE / 4 {
            log::debug!(
                "vfio-pci: ignored a config write at {:#x}",
                reg * 4 + offset
            );
            return fx;
        }
        let start = reg * 4 + offset;
        for (i, &d) in data.iter().enumerate() {
            let pos = start + i;
            let emu = self.emulated[pos];
            let wr = self.writable[pos] & emu;
            self.virt[pos] = (self.virt[pos] & !wr) | (d & wr);
            if emu != 0xff {
                // Emulated bits of a mixed byte are read-only or write-1-to-clear on the device: send 0.
                dev.write_config(pos as u64, &[d & !emu]);
            }
        }
        if let Some(cap) = self.msix {
            let ctl = cap.offset + 3;
            if (start..start + data.len()).contains(&ctl) {
                fx.msix_control = true;
            }
        }
        fx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A device's config space in memory: what VFIO would read and write (the real hardware side).
    struct Hw(RefCell<[u8; LEGACY_SIZE]>, RefCell<Vec<(u64, Vec<u8>)>>);

    impl ConfigIo for Hw {
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let s = self.0.borrow();
            for (i, d) in data.iter_mut().enumerate() {
                *d = s.get(offset as usize + i).copied().unwrap_or(0xff);
            }
        }
        fn write_config(&self, offset: u64, data: &[u8]) {
            self.1.borrow_mut().push((offset, data.to_vec()));
            let mut s = self.0.borrow_mut();
            for (i, d) in data.iter().enumerate() {
                if let Some(b) = s.get_mut(offset as usize + i) {
                    *b = *d;
                }
            }
        }
    }

    fn put(s: &mut [u8], off: usize, v: &[u8]) {
        s[off..off + v.len()].copy_from_slice(v);
    }

    /// An igb-like function: 8086:10c9, multi-function header, BAR0 mem32 128K, BAR2 io 32, BAR3 mem32 16K
    /// (MSI-X), expansion ROM, interrupt pin A; caps PM@40 -> MSI@50 -> MSI-X@70 -> PCIe@a0 -> VPD@e0.
    fn igb() -> [u8; LEGACY_SIZE] {
        let mut s = [0u8; LEGACY_SIZE];
        put(&mut s, 0, &[0x86, 0x80, 0xc9, 0x10]);
        put(&mut s, 4, &[0x00, 0x00, 0x10, 0x00]); // status: cap list
        put(&mut s, 8, &[0x01, 0x00, 0x00, 0x02]); // rev 1, class 02/00/00
        s[0x0e] = 0x80;
        put(&mut s, 0x10, &0xfeb0_0000u32.to_le_bytes());
        put(&mut s, 0x18, &0x0000_c001u32.to_le_bytes());
        put(&mut s, 0x1c, &0xfeb8_0000u32.to_le_bytes());
        put(&mut s, 0x2c, &[0x86, 0x80, 0x00, 0xa0]);
        put(&mut s, 0x30, &0xfea0_0000u32.to_le_bytes());
        s[0x34] = 0x40;
        s[0x3d] = 1;
        put(
            &mut s,
            0x40,
            &[CAP_PM, 0x50, 0x23, 0xc8, 0x00, 0x00, 0x00, 0x00],
        );
        put(&mut s, 0x50, &[CAP_MSI, 0x70, 0x80, 0x01]);
        put(&mut s, 0x70, &[CAP_MSIX, 0xa0, 0x09, 0x00]);
        put(&mut s, 0x74, &3u32.to_le_bytes());
        put(&mut s, 0x78, &0x2003u32.to_le_bytes());
        put(&mut s, 0xa0, &[CAP_PCIE, 0xe0, 0x02, 0x00]);
        put(&mut s, 0xa8, &[0x10, 0x28, 0x00, 0x00]); // device control
        put(&mut s, 0xe0, &[0x03, 0x00, 0x00, 0x00]); // VPD
        s
    }

    fn sizes() -> [u64; NUM_BARS] {
        [128 << 10, 0, 32, 16 << 10, 0, 0]
    }

    fn setup() -> (VfioConfig, Hw) {
        let s = igb();
        let c = VfioConfig::new(&s, &sizes()).unwrap();
        (c, Hw(RefCell::new(s), RefCell::new(Vec::new())))
    }

    #[test]
    fn identity_is_shown_and_header_is_trimmed() {
        let (c, hw) = setup();
        assert_eq!(c.read_register(0, &hw), 0x10c9_8086);
        assert_eq!(c.read_register(2, &hw), 0x0200_0001);
        assert_eq!(
            (c.read_register(3, &hw) >> 16) & 0xff,
            0,
            "not multi-function"
        );
        assert_eq!(c.read_register(ROM_REG, &hw), 0, "no expansion ROM");
        assert_eq!(
            (c.read_register(0x3c / 4, &hw) >> 8) & 0xff,
            0,
            "no INTx pin"
        );
        assert_eq!(c.read_register(0x100 / 4, &hw), 0, "no extended capability");
    }

    #[test]
    fn only_pm_msix_and_pcie_are_linked() {
        let (c, hw) = setup();
        let mut ids = Vec::new();
        assert_ne!(c.read_register(1, &hw) & (0x10 << 16), 0);
        let mut ptr = (c.read_register(0x34 / 4, &hw) & 0xff) as usize;
        while ptr != 0 {
            let dw = c.read_register(ptr / 4, &hw);
            ids.push((dw & 0xff) as u8);
            ptr = ((dw >> 8) & 0xff) as usize;
        }
        assert_eq!(ids, vec![CAP_PM, CAP_MSIX, CAP_PCIE]);
        assert_eq!(c.read_register(0x50 / 4, &hw), 0, "MSI is hidden");
        assert_eq!(c.read_register(0xe0 / 4, &hw), 0, "VPD is hidden");
        assert_eq!(c.msix().unwrap().vectors, 10);
    }

    #[test]
    fn bars_are_sized_and_relocated_without_touching_the_device() {
        let (mut c, hw) = setup();
        let fx = c.write_register(BAR0_REG, 0, &u32::MAX.to_le_bytes(), &hw);
        assert!(fx.relocations.is_empty(), "sizing is not a move");
        assert_eq!(c.read_register(BAR0_REG, &hw), !(128u32 << 10) + 1);
        assert_eq!(c.read_register(BAR0_REG + 2, &hw) & 1, 1, "BAR2 is I/O");
        let fx = c.write_register(BAR0_REG, 0, &0xc000_0000u32.to_le_bytes(), &hw);
        assert_eq!(fx.relocations.len(), 1);
        assert_eq!(fx.relocations[0].new_base, 0xc000_0000);
        assert_eq!(c.read_register(BAR0_REG, &hw), 0xc000_0000);
        assert!(
            hw.1.borrow().is_empty(),
            "the device's BARs stay where the host put them"
        );
        assert_eq!(c.bars().len(), 3);
    }

    #[test]
    fn a_64_bit_bar_is_shown_as_64_bit_whatever_its_size() {
        let mut s = igb();
        put(&mut s, 0x1c, &0x0000_0004u32.to_le_bytes()); // BAR3: 64-bit (BAR4 is its upper half)
        let hw = Hw(RefCell::new(s), RefCell::new(Vec::new()));
        for size in [16u64 << 10, 1 << 30] {
            let mut sz = sizes();
            sz[3] = size;
            let c = VfioConfig::new(&s, &sz).unwrap();
            assert_eq!(
                c.read_register(BAR0_REG + 3, &hw) & 0x7,
                0x4,
                "64-bit memory BAR"
            );
            assert!(matches!(
                c.bar_defs()[3],
                Some(PciBarDef {
                    kind: BarKind::Mem64 { .. },
                    size: got,
                }) if got == size
            ));
            assert_eq!(c.bar_defs()[4], None, "BAR4 is BAR3's upper half");
        }
    }

    #[test]
    fn command_passes_through_and_flr_does_not() {
        let (mut c, hw) = setup();
        c.write_register(1, 0, &[0x06, 0x04], &hw);
        assert_eq!(
            hw.0.borrow()[4],
            0x06,
            "memory + bus master reach the device"
        );
        assert_eq!(c.read_register(1, &hw) & 0xffff, 0x0406);
        // Initiate FLR (device control bit 15) is dropped, the rest passes.
        let devctl = 0xa8 / 4;
        c.write_register(devctl, 0, &[0x10, 0xa8], &hw);
        assert_eq!(hw.0.borrow()[0xa9], 0x28);
        assert_eq!(c.read_register(devctl, &hw) & 0x8000, 0);
    }

    #[test]
    fn msix_control_is_emulated() {
        let (mut c, hw) = setup();
        let reg = 0x70 / 4;
        assert_eq!(c.msix_state(), (false, false));
        let fx = c.write_register(reg, 2, &[0xff, 0xc0], &hw);
        assert!(fx.msix_control);
        assert_eq!(c.msix_state(), (true, true));
        let v = c.read_register(reg, &hw);
        assert_eq!(v >> 16, 0xc009, "table size stays 10 vectors");
        assert!(
            hw.1.borrow().is_empty(),
            "message control never reaches the device"
        );
        c.write_register(reg, 3, &[0x80], &hw);
        assert_eq!(c.msix_state(), (true, false));
        // The table offset is read-only.
        c.write_register(reg + 1, 0, &[0xff; 4], &hw);
        assert_eq!(c.read_register(reg + 1, &hw), 3);
    }

    #[test]
    fn identity_and_hidden_space_cannot_be_written() {
        let (mut c, hw) = setup();
        for reg in [0usize, 2, 0x2c / 4, 0x34 / 4, 0x50 / 4, 0xe0 / 4] {
            let before = c.read_register(reg, &hw);
            c.write_register(reg, 0, &[0x5a; 4], &hw);
            assert_eq!(c.read_register(reg, &hw), before, "register {reg:#x}");
        }
        assert!(hw.1.borrow().is_empty());
        // Header type and BIST are the VMM's; cache line size and latency timer pass through.
        c.write_register(3, 0, &[0x10, 0x20, 0x80, 0x40], &hw);
        assert_eq!(c.read_register(3, &hw), 0x0000_2010);
    }

    #[test]
    fn a_capability_list_that_runs_off_the_header_is_refused() {
        let mut s = igb();
        s[0xa1] = 0xfc; // PCIe -> an MSI-X capability in the last dword
        put(&mut s, 0xfc, &[CAP_MSIX, 0x00, 0x09, 0x00]);
        s[0x71] = 0xa0;
        s[0x70] = 0x09; // the first MSI-X capability becomes a vendor one
        assert_eq!(
            VfioConfig::new(&s, &sizes()).err(),
            Some(ConfigError::MsixCapTruncated(0xfc))
        );
    }

    /// Capability ids and offsets the guest finds walking the list.
    fn walk(c: &VfioConfig, hw: &Hw) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let mut ptr = (c.read_register(0x34 / 4, hw) & 0xff) as usize;
        while ptr != 0 && out.len() < 48 {
            let dw = c.read_register(ptr / 4, hw);
            out.push(((dw & 0xff) as u8, ptr));
            ptr = ((dw >> 8) & 0xff) as usize;
        }
        out
    }

    /// Found by tests/vfio_config_fuzz.rs: a second MSI-X capability in the last dword of the header was
    /// emulated past the end of the config arrays (a panic while opening the device).
    #[test]
    fn a_second_msix_capability_is_hidden() {
        let mut s = igb();
        s[0xa1] = 0xfc;
        put(&mut s, 0xfc, &[CAP_MSIX, 0x00, 0x09, 0x00]);
        let c = VfioConfig::new(&s, &sizes()).unwrap();
        let hw = Hw(RefCell::new(s), RefCell::new(Vec::new()));
        assert_eq!(
            walk(&c, &hw),
            vec![(CAP_PM, 0x40), (CAP_MSIX, 0x70), (CAP_PCIE, 0xa0)]
        );
        assert_eq!(c.read_register(0xfc / 4, &hw), 0);
    }

    /// Found by tests/vfio_config_fuzz.rs: a capability later in the list whose body covered MSI-X
    /// message control made it pass through, so the guest enabled MSI-X on the device behind the VMM.
    #[test]
    fn a_capability_running_over_msix_control_does_not_pass_it_through() {
        let mut s = igb();
        s[0x34] = 0x70;
        s[0x71] = 0x40;
        put(
            &mut s,
            0x40,
            &[CAP_PCIE, 0x00, 0x02, 0x00, 0, 0, 0, 0, 0x10, 0x28],
        );
        let (mut c, hw) = (
            VfioConfig::new(&s, &sizes()).unwrap(),
            Hw(RefCell::new(s), RefCell::new(Vec::new())),
        );
        assert_eq!(walk(&c, &hw), vec![(CAP_MSIX, 0x70), (CAP_PCIE, 0x40)]);
        let fx = c.write_register(0x70 / 4, 2, &[0xff, 0xc0], &hw);
        assert!(fx.msix_control);
        assert_eq!(c.msix_state(), (true, true));
        assert!(hw.1.borrow().is_empty(), "message control is the VMM's");
        // The PCIe capability ends where MSI-X starts: its body below still passes through.
        c.write_register(0x4c / 4, 0, &[0x12], &hw);
        assert_eq!(hw.1.borrow().len(), 1);
    }

    /// Found by tests/vfio_config_fuzz.rs: a PM capability right after the PCIe one, covering device
    /// control, passed the "initiate FLR" bit through to the device.
    #[test]
    fn a_capability_over_pcie_device_control_cannot_start_an_flr() {
        let mut s = igb();
        s[0x34] = 0x70;
        s[0xa1] = 0xa4;
        put(
            &mut s,
            0xa4,
            &[CAP_PM, 0x00, 0x23, 0xc8, 0x00, 0x00, 0x00, 0x00],
        );
        let (mut c, hw) = (
            VfioConfig::new(&s, &sizes()).unwrap(),
            Hw(RefCell::new(s), RefCell::new(Vec::new())),
        );
        assert_eq!(
            walk(&c, &hw),
            vec![(CAP_MSIX, 0x70), (CAP_PCIE, 0xa0), (CAP_PM, 0xa4)]
        );
        c.write_register(0xa8 / 4, 0, &[0xff; 4], &hw);
        assert!(hw
            .1
            .borrow()
            .iter()
            .all(|(o, d)| *o != 0xa9 || d[0] & 0x80 == 0));
        assert_eq!(hw.0.borrow()[0xa9] & 0x80, 0, "no FLR");
    }

    #[test]
    fn an_msix_capability_running_into_the_next_one_is_refused() {
        let mut s = igb();
        s[0x71] = 0x78;
        put(&mut s, 0x78, &[CAP_PCIE, 0x00, 0x02, 0x00]);
        assert_eq!(
            VfioConfig::new(&s, &sizes()).err(),
            Some(ConfigError::MsixCapTruncated(0x70))
        );
    }

    #[test]
    fn malformed_writes_never_panic() {
        let (mut c, hw) = setup();
        for reg in [0usize, 1, 4, 9, 12, 63, 64, 1023, 1024, usize::MAX] {
            for off in 0u8..6 {
                for len in 0..6 {
                    let data = vec![0xffu8; len];
                    c.write_register(reg, off, &data, &hw);
                    let _ = c.read_register(reg, &hw);
                }
            }
        }
        // Every byte pattern over the whole legacy space.
        for reg in 0..LEGACY_SIZE / 4 {
            for v in [0u32, u32::MAX, 0x5555_aaaa] {
                c.write_register(reg, 0, &v.to_le_bytes(), &hw);
            }
        }
    }

    #[test]
    fn devices_without_msix_are_refused() {
        let mut s = igb();
        s[0x50 + 1] = 0xa0; // MSI -> PCIe, skipping MSI-X
        assert_eq!(
            VfioConfig::new(&s, &sizes()).err(),
            Some(ConfigError::MsiOnly)
        );
        s[0x40 + 1] = 0xa0; // PM -> PCIe
        assert_eq!(
            VfioConfig::new(&s, &sizes()).err(),
            Some(ConfigError::NoMsiOrMsix)
        );
        s[6] = 0; // no capability list at all
        assert_eq!(
            VfioConfig::new(&s, &sizes()).err(),
            Some(ConfigError::NoMsiOrMsix)
        );
        // A capability loop does not hang.
        let mut s = igb();
        s[0xa1] = 0x40;
        assert!(VfioConfig::new(&s, &sizes()).is_ok());
        // MSI-X table in a BAR the device lacks.
        let mut sz = sizes();
        sz[3] = 0;
        assert!(matches!(
            VfioConfig::new(&igb(), &sz).err(),
            Some(ConfigError::BadMsixBar { .. })
        ));
    }
}
