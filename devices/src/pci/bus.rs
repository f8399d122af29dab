//! PCI bus 0: config access through the legacy 0xCF8/0xCFC ports and ECAM, and dispatch of trapped BAR
//! accesses to the device that owns the address. Only function 0 of each of the 32 device numbers exists.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::{
    read_from_register, BarKind, BarRelocation, PciDevice, PciDeviceError, BAR0_REG, CONFIG_REGS,
};

/// First port of the legacy configuration mechanism (CONFIG_ADDRESS).
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// First port of CONFIG_DATA (0xCFC..=0xCFF).
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
/// Number of device numbers on a bus.
pub const SLOTS: usize = 32;

/// A device number on bus 0 (0..=31); the BDF is 00:slot.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciSlot(pub u8);

impl std::fmt::Display for PciSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0000:00:{:02x}.0", self.0)
    }
}

/// Guest address windows from which the bus places BARs (the same windows the ACPI DSDT declares in the
/// host bridge's _CRS, so the guest keeps the placement).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarWindows {
    /// 32-bit memory window (start, size).
    pub mmio32: (u64, u64),
    /// 64-bit memory window (start, size).
    pub mmio64: (u64, u64),
    /// I/O port window (start, size).
    pub io: (u64, u64),
}

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum PciBusError {
    /// No free device number.
    #[error("PCI bus 0 is full (32 devices): remove a device first")]
    Full,
    /// The requested device number is taken.
    #[error("PCI slot {0} is already in use: pick another or let the bus choose")]
    SlotTaken(PciSlot),
    /// The device number is out of range.
    #[error("PCI device number {0} is out of range (0..=31)")]
    BadSlot(u8),
    /// A BAR does not fit the window left.
    #[error("no room for BAR{bar} ({size:#x} bytes) of {device} in the {window} window: use fewer or smaller devices")]
    NoRoom {
        /// Device name.
        device: String,
        /// BAR index.
        bar: u8,
        /// Size.
        size: u64,
        /// Which window.
        window: &'static str,
    },
    /// A device could not follow a BAR move.
    #[error(transparent)]
    Device(#[from] PciDeviceError),
}

/// Where a BAR's range is found: keyed by (base, slot, BAR index), so BARs that a guest places over each
/// other (Linux does, for a moment, while it sizes and moves 64-bit BARs one half at a time) are all kept
/// and none of them is lost when another lands on the same base.
type RangeKey = (u64, usize, u8);

/// The last byte of a BAR's range (inclusive, so a BAR that ends at 2^64 needs no overflowing sum).
type RangeLast = u64;

struct Table {
    devices: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    mem: BTreeMap<RangeKey, RangeLast>,
    io: BTreeMap<RangeKey, RangeLast>,
    next: [u64; 3], // bump pointers: mmio32, mmio64, io
    /// Ranges given back by removed devices: (window, base, size). Reused for BARs of the same size, so
    /// plugging and unplugging the same device again and again does not use up the windows.
    free: Vec<(usize, u64, u64)>,
}

/// PCI bus 0. Shared by the vCPU threads (all methods take `&self`).
pub struct PciBus {
    table: RwLock<Table>,
    config_address: Mutex<u32>,
    windows: BarWindows,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A device that panicked while locked leaves its state as it was; keep serving the guest.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciBus {
    /// An empty bus that places BARs from `windows`.
    pub fn new(windows: BarWindows) -> Self {
        Self {
            table: RwLock::new(Table {
                devices: (0..SLOTS).map(|_| None).collect(),
                mem: BTreeMap::new(),
                io: BTreeMap::new(),
                next: [windows.mmio32.0, windows.mmio64.0, windows.io.0],
                free: Vec::new(),
            }),
            config_address: Mutex::new(0),
            windows,
        }
    }

    fn read_table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_table(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Plugs `device` at `slot` (or the first free one), places its BARs in the windows by writing its BAR
    /// registers as firmware would, and returns the slot. The device's `move_bar` sees each placement.
    pub fn add_device(
        &self,
        slot: Option<u8>,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<PciSlot, PciBusError> {
        let index = {
            let mut t = self.write_table();
            let index = match slot {
                Some(s) if usize::from(s) >= SLOTS => return Err(PciBusError::BadSlot(s)),
                Some(s) if t.devices[usize::from(s)].is_some() => {
                    return Err(PciBusError::SlotTaken(PciSlot(s)))
                }
                Some(s) => usize::from(s),
                None => t
                    .devices
                    .iter()
                    .position(Option::is_none)
                    .ok_or(PciBusError::Full)?,
            };
            t.devices[index] = Some(device.clone());
            index
        };
        let result = self.place_bars(index, &device);
        if result.is_err() {
            self.remove_device(PciSlot(index as u8));
        }
        result.map(|()| PciSlot(index as u8))
    }

    fn place_bars(
        &self,
        index: usize,
        device: &Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciBusError> {
        let mut dev = lock(device);
        let mut bars = dev.bars();
        // Largest first keeps natural alignment without holes.
        bars.sort_by_key(|b| std::cmp::Reverse(b.size));
        for bar in bars {
            let (w, (start, size), name) = match bar.kind {
                BarKind::Mem32 { .. } => (0, self.windows.mmio32, "32-bit MMIO"),
                BarKind::Mem64 { .. } => (1, self.windows.mmio64, "64-bit MMIO"),
                BarKind::Io => (2, self.windows.io, "I/O"),
            };
            let base = {
                let mut t = self.write_table();
                if let Some(i) = t
                    .free
                    .iter()
                    .position(|&(fw, _, fs)| fw == w && fs == bar.size)
                {
                    let (_, base, _) = t.free.swap_remove(i);
                    base
                } else {
                    let base = t.next[w].next_multiple_of(bar.size);
                    if base + bar.size > start + size {
                        return Err(PciBusError::NoRoom {
                            device: dev.name(),
                            bar: bar.index,
                            size: bar.size,
                            window: name,
                        });
                    }
                    t.next[w] = base + bar.size;
                    base
                }
            };
            let reg = BAR0_REG + usize::from(bar.index);
            let mut moved = dev.write_config_register(reg, 0, &(base as u32).to_le_bytes());
            if matches!(bar.kind, BarKind::Mem64 { .. }) {
                moved.extend(dev.write_config_register(
                    reg + 1,
                    0,
                    &((base >> 32) as u32).to_le_bytes(),
                ));
            }
            for r in &moved {
                dev.move_bar(r)?;
            }
            self.apply_relocations(index, &moved);
        }
        Ok(())
    }

    /// Unplugs the device at `slot`, forgetting its BAR ranges, and returns it. The ranges its BARs held
    /// (where they lie inside the bus's windows) are reused for later BARs of the same size.
    pub fn remove_device(&self, slot: PciSlot) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let mut t = self.write_table();
        let index = usize::from(slot.0);
        let dev = t.devices.get_mut(index)?.take();
        let mut freed = Vec::new();
        for (io, map) in [(false, &t.mem), (true, &t.io)] {
            for (&(base, _, _), &last) in map.iter().filter(|((_, s, _), _)| *s == index) {
                let size = last - base + 1;
                let inside = |(s, l): (u64, u64)| base >= s && last < s + l;
                let w = if io {
                    inside(self.windows.io).then_some(2)
                } else if inside(self.windows.mmio32) {
                    Some(0)
                } else {
                    inside(self.windows.mmio64).then_some(1)
                };
                if let Some(w) = w {
                    freed.push((w, base, size));
                }
            }
        }
        t.free.extend(freed);
        t.mem.retain(|&(_, s, _), _| s != index);
        t.io.retain(|&(_, s, _), _| s != index);
        dev
    }

    /// The device at `slot`, if any.
    pub fn device(&self, slot: PciSlot) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.read_table()
            .devices
            .get(usize::from(slot.0))
            .cloned()
            .flatten()
    }

    fn apply_relocations(&self, index: usize, moved: &[BarRelocation]) {
        if moved.is_empty() {
            return;
        }
        let mut t = self.write_table();
        for r in moved {
            let map = if r.kind == BarKind::Io {
                &mut t.io
            } else {
                &mut t.mem
            };
            map.retain(|&(_, s, b), _| !(s == index && b == r.index));
            if r.new_base != 0 && r.size != 0 {
                let last = r.new_base.saturating_add(r.size - 1);
                map.insert((r.new_base, index, r.index), last);
            }
            log::debug!(
                "pci 0000:00:{index:02x}.0: BAR{} {:#x} -> {:#x} ({:#x} bytes)",
                r.index,
                r.old_base,
                r.new_base,
                r.size
            );
        }
    }

    fn config_read(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        let reg = offset / 4;
        if bus != 0 || func != 0 || reg >= CONFIG_REGS || (offset % 4) + data.len() > 4 {
            return;
        }
        let Some(device) = self.device(PciSlot(dev)) else {
            return;
        };
        let value = lock(&device).read_config_register(reg);
        read_from_register(value, (offset % 4) as u8, data);
    }

    fn config_write(
        &self,
        bus: u8,
        dev: u8,
        func: u8,
        offset: usize,
        data: &[u8],
    ) -> Result<Vec<BarRelocation>, PciBusError> {
        let reg = offset / 4;
        if bus != 0 || func != 0 || reg >= CONFIG_REGS || (offset % 4) + data.len() > 4 {
            return Ok(Vec::new());
        }
        let Some(device) = self.device(PciSlot(dev)) else {
            return Ok(Vec::new());
        };
        let moved = {
            let mut d = lock(&device);
            let moved = d.write_config_register(reg, (offset % 4) as u8, data);
            for r in &moved {
                d.move_bar(r)?;
            }
            moved
        };
        self.apply_relocations(usize::from(dev), &moved);
        Ok(moved)
    }

    /// ECAM read at `offset` from the ECAM base (bus << 20 | device << 15 | function << 12 | register).
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = decode_ecam(offset);
        self.config_read(bus, dev, func, reg, data);
    }

    /// ECAM write; returns the BARs that moved (already applied on the bus and in the device).
    pub fn ecam_write(&self, offset: u64, data: &[u8]) -> Result<Vec<BarRelocation>, PciBusError> {
        let (bus, dev, func, reg) = decode_ecam(offset);
        self.config_write(bus, dev, func, reg, data)
    }

    /// Port read. Returns `false` when no device answers at `port` (the caller then reads all-ones).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                data.copy_from_slice(&lock(&self.config_address).to_le_bytes());
                true
            }
            CONFIG_DATA_PORT..=0xcff => {
                let addr = *lock(&self.config_address);
                if addr & 0x8000_0000 == 0 {
                    data.fill(0xff);
                } else {
                    let (bus, dev, func, reg) = decode_cf8(addr);
                    self.config_read(
                        bus,
                        dev,
                        func,
                        reg + usize::from(port - CONFIG_DATA_PORT),
                        data,
                    );
                }
                true
            }
            _ => self.bar_access(true, u64::from(port), |d, bar, off| {
                d.read_bar(bar, off, data)
            }),
        }
    }

    /// Port write. Returns the BARs that moved, or `None` when no device answers at `port`.
    pub fn pio_write(
        &self,
        port: u16,
        data: &[u8],
    ) -> Result<Option<Vec<BarRelocation>>, PciBusError> {
        match port {
            CONFIG_ADDRESS_PORT if data.len() == 4 => {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                *lock(&self.config_address) = u32::from_le_bytes(v);
                Ok(Some(Vec::new()))
            }
            CONFIG_DATA_PORT..=0xcff => {
                let addr = *lock(&self.config_address);
                if addr & 0x8000_0000 == 0 {
                    return Ok(Some(Vec::new()));
                }
                let (bus, dev, func, reg) = decode_cf8(addr);
                self.config_write(
                    bus,
                    dev,
                    func,
                    reg + usize::from(port - CONFIG_DATA_PORT),
                    data,
                )
                .map(Some)
            }
            _ => Ok(self
                .bar_access(true, u64::from(port), |d, bar, off| {
                    d.write_bar(bar, off, data)
                })
                .then(Vec::new)),
        }
    }

    /// A trapped memory read at guest physical `addr`. Returns `false` when no BAR covers it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.bar_access(false, addr, |d, bar, off| d.read_bar(bar, off, data))
    }

    /// A trapped memory write at guest physical `addr`. Returns `false` when no BAR covers it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.bar_access(false, addr, |d, bar, off| d.write_bar(bar, off, data))
    }

    fn bar_access(&self, io: bool, addr: u64, f: impl FnOnce(&mut dyn PciDevice, u8, u64)) -> bool {
        let found = {
            let t = self.read_table();
            let map = if io { &t.io } else { &t.mem };
            // The range with the highest base at or below `addr` that still covers it. Overlaps are rare
            // and short-lived, and a bus holds a few dozen BARs, so the backward scan stays short.
            map.range(..=(addr, usize::MAX, u8::MAX))
                .rev()
                .find(|(_, &last)| addr <= last)
                .and_then(|(&(base, slot, bar), _)| {
                    Some((t.devices.get(slot)?.clone()?, bar, addr - base))
                })
        };
        match found {
            Some((dev, bar, off)) => {
                f(&mut *lock(&dev), bar, off);
                true
            }
            None => false,
        }
    }
}

fn decode_ecam(offset: u64) -> (u8, u8, u8, usize) {
    (
        ((offset >> 20) & 0xff) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

fn decode_cf8(addr: u32) -> (u8, u8, u8, usize) {
    (
        ((addr >> 16) & 0xff) as u8,
        ((addr >> 11) & 0x1f) as u8,
        ((addr >> 8) & 0x7) as u8,
        (addr & 0xfc) as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{BarRegion, HostBridge, PciBarDef, PciConfig};

    /// A device with one 4 KiB 32-bit BAR of scratch registers and one 64-bit BAR, that records moves.
    struct Scratch {
        config: PciConfig,
        mem: [u8; 64],
        moves: Vec<BarRelocation>,
    }

    impl Scratch {
        fn new() -> Self {
            let mut config = PciConfig::new(0x1234, 0x11e8, 0x00, 0xff, 0);
            config.add_bar(
                0,
                PciBarDef {
                    size: 0x1000,
                    kind: BarKind::Mem32 {
                        prefetchable: false,
                    },
                },
            );
            config.add_bar(
                2,
                PciBarDef {
                    size: 0x10_0000,
                    kind: BarKind::Mem64 { prefetchable: true },
                },
            );
            config.add_bar(
                4,
                PciBarDef {
                    size: 0x20,
                    kind: BarKind::Io,
                },
            );
            Self {
                config,
                mem: [0; 64],
                moves: Vec::new(),
            }
        }
    }

    impl PciDevice for Scratch {
        fn name(&self) -> String {
            "scratch".into()
        }
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.config.read_register(reg)
        }
        fn write_config_register(
            &mut self,
            reg: usize,
            offset: u8,
            data: &[u8],
        ) -> Vec<BarRelocation> {
            self.config.write_register(reg, offset, data)
        }
        fn bars(&self) -> Vec<BarRegion> {
            self.config.bars()
        }
        fn move_bar(&mut self, r: &BarRelocation) -> Result<(), PciDeviceError> {
            self.moves.push(*r);
            Ok(())
        }
        fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            let o = offset as usize + usize::from(bar) * 16;
            for (i, d) in data.iter_mut().enumerate() {
                *d = self.mem.get(o + i).copied().unwrap_or(0xff);
            }
        }
        fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
            let o = offset as usize + usize::from(bar) * 16;
            for (i, d) in data.iter().enumerate() {
                if let Some(m) = self.mem.get_mut(o + i) {
                    *m = *d;
                }
            }
        }
    }

    const WINDOWS: BarWindows = BarWindows {
        mmio32: (0xc000_0000, 0x2000_0000),
        mmio64: (0x10_0000_0000, 1 << 36),
        io: (0x1000, 0xf000),
    };

    fn bus_with_scratch() -> (PciBus, Arc<Mutex<Scratch>>) {
        let bus = PciBus::new(WINDOWS);
        assert_eq!(
            bus.add_device(Some(0), Arc::new(Mutex::new(HostBridge::new())))
                .ok(),
            Some(PciSlot(0))
        );
        let dev = Arc::new(Mutex::new(Scratch::new()));
        assert_eq!(bus.add_device(None, dev.clone()).ok(), Some(PciSlot(1)));
        (bus, dev)
    }

    fn cf8_read32(bus: &PciBus, dev: u8, off: u32) -> u32 {
        let addr = 0x8000_0000 | (u32::from(dev) << 11) | off;
        assert!(bus.pio_write(0xcf8, &addr.to_le_bytes()).is_ok());
        let mut v = [0u8; 4];
        assert!(bus.pio_read(0xcfc, &mut v));
        u32::from_le_bytes(v)
    }

    #[test]
    fn config_reads_through_both_mechanisms() {
        let (bus, _) = bus_with_scratch();
        assert_eq!(cf8_read32(&bus, 0, 0), 0x0d57_8086);
        assert_eq!(cf8_read32(&bus, 1, 0), 0x11e8_1234);
        assert_eq!(
            cf8_read32(&bus, 2, 0),
            0xffff_ffff,
            "empty slot reads all-ones"
        );
        let mut v = [0u8; 2];
        bus.ecam_read((1 << 15) | 2, &mut v);
        assert_eq!(u16::from_le_bytes(v), 0x11e8);
        bus.ecam_read((1 << 20) | (1 << 15), &mut v);
        assert_eq!(v, [0xff, 0xff], "bus 1 does not exist");
        // Byte access through 0xCFE reads the device-id low byte.
        let addr: u32 = 0x8000_0000 | (1 << 11);
        assert!(bus.pio_write(0xcf8, &addr.to_le_bytes()).is_ok());
        let mut b = [0u8; 1];
        assert!(bus.pio_read(0xcfe, &mut b));
        assert_eq!(b[0], 0xe8);
    }

    #[test]
    fn placement_and_guest_relocation_route_mmio_and_pio() {
        let (bus, dev) = bus_with_scratch();
        let bars = lock(&dev).bars();
        let base0 = bars
            .iter()
            .find(|b| b.index == 0)
            .map(|b| b.base)
            .unwrap_or(0);
        let base2 = bars
            .iter()
            .find(|b| b.index == 2)
            .map(|b| b.base)
            .unwrap_or(0);
        let io4 = bars
            .iter()
            .find(|b| b.index == 4)
            .map(|b| b.base)
            .unwrap_or(0);
        assert_eq!(base0 % 0x1000, 0);
        assert!((0xc000_0000..0xe000_0000).contains(&base0));
        assert_eq!(base2, 0x10_0000_0000);
        assert!(io4 >= 0x1000);
        assert_eq!(lock(&dev).moves.len(), 3, "placement goes through move_bar");

        assert!(bus.mmio_write(base0 + 4, &[0xaa, 0xbb]));
        let mut v = [0u8; 2];
        assert!(bus.mmio_read(base0 + 4, &mut v));
        assert_eq!(v, [0xaa, 0xbb]);
        assert!(bus.pio_write(io4 as u16, &[7]).is_ok_and(|r| r.is_some()));

        // The guest moves BAR0 through ECAM: the old range stops answering, the new one answers.
        let new = 0xd000_0000u32;
        let moved = bus
            .ecam_write((1 << 15) | 0x10, &new.to_le_bytes())
            .unwrap_or_default();
        assert_eq!(moved.len(), 1);
        assert_eq!(
            (moved[0].old_base, moved[0].new_base),
            (base0, u64::from(new))
        );
        assert!(!bus.mmio_read(base0 + 4, &mut v));
        assert!(bus.mmio_read(u64::from(new) + 4, &mut v));
        assert_eq!(v, [0xaa, 0xbb]);
        assert_eq!(
            lock(&dev).moves.last().map(|r| r.new_base),
            Some(u64::from(new))
        );

        // Sizing through 0xCF8/0xCFC does not move anything.
        let addr: u32 = 0x8000_0000 | (1 << 11) | 0x10;
        assert!(bus.pio_write(0xcf8, &addr.to_le_bytes()).is_ok());
        let sized = bus
            .pio_write(0xcfc, &[0xff; 4])
            .ok()
            .flatten()
            .unwrap_or_default();
        assert!(sized.is_empty());
        assert_eq!(cf8_read32(&bus, 1, 0x10), 0xffff_f000);
        assert!(bus.pio_write(0xcfc, &new.to_le_bytes()).is_ok());
        assert!(bus.mmio_read(u64::from(new) + 4, &mut v));
    }

    #[test]
    fn replugging_reuses_the_bar_ranges() {
        let (bus, first) = bus_with_scratch();
        let before = lock(&first).bars();
        for _ in 0..100 {
            assert!(bus.remove_device(PciSlot(1)).is_some());
            let dev = Arc::new(Mutex::new(Scratch::new()));
            assert_eq!(bus.add_device(None, dev.clone()).ok(), Some(PciSlot(1)));
            let mut now = lock(&dev).bars();
            let mut was = before.clone();
            now.sort_by_key(|b| b.index);
            was.sort_by_key(|b| b.index);
            assert_eq!(now, was, "the same ranges come back");
        }
        let mut v = [0u8; 2];
        assert!(bus.mmio_read(before[0].base, &mut v));
    }

    #[test]
    fn slots_errors_and_removal() {
        let (bus, _) = bus_with_scratch();
        assert!(matches!(
            bus.add_device(Some(1), Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciBusError::SlotTaken(PciSlot(1)))
        ));
        assert!(matches!(
            bus.add_device(Some(40), Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciBusError::BadSlot(40))
        ));
        assert!(bus.remove_device(PciSlot(1)).is_some());
        assert_eq!(cf8_read32(&bus, 1, 0), 0xffff_ffff);
        let mut v = [0u8; 4];
        assert!(!bus.mmio_read(0xc000_0000, &mut v));
    }
}
