//! MSI-X emulation for a passthrough device: the capability's registers as the guest sees them and the
//! vector table the guest programs. The real device's table is programmed by the host kernel (VFIO) with
//! host vectors; the guest's table only decides where each vector is routed (a KVM GSI route) and whether it
//! is masked. Nothing here touches KVM or VFIO: [`MsixTable::write`] reports which vectors changed and the
//! device applies them through [`MsiRouting`](crate::pci::MsiRouting).

/// Bytes per table entry (PCI spec: message address lo/hi, data, vector control).
pub const ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: the vector is masked.
const VECTOR_MASKED: u32 = 1;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// The MSI-X capability of the device as read from its config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Offset of the capability in config space.
    pub offset: usize,
    /// Number of vectors (table size field + 1).
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u64,
    /// BAR holding the pending bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u64,
}

impl MsixCap {
    /// Parses the capability at `offset` from its three dwords (`dw0` holds id/next/message control).
    pub fn parse(offset: usize, dw0: u32, table: u32, pba: u32) -> Self {
        MsixCap {
            offset,
            vectors: ((dw0 >> 16) as u16 & 0x7ff) + 1,
            table_bar: (table & 7) as u8,
            table_offset: u64::from(table & !7),
            pba_bar: (pba & 7) as u8,
            pba_offset: u64::from(pba & !7),
        }
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }

    /// Size of the pending bit array in bytes (one bit per vector, in qwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    /// True when `[offset, offset+len)` of BAR `bar` falls inside the table.
    pub fn in_table(&self, bar: u8, offset: u64, len: u64) -> bool {
        bar == self.table_bar
            && offset >= self.table_offset
            && offset.saturating_add(len) <= self.table_offset + self.table_size()
    }

    /// Where a trapped guest access of `len` bytes at `offset` into BAR `bar` (of `bar_size` bytes)
    /// goes: inside the table, to the emulated table; empty, past the BAR's end, across the table's
    /// edge, or (a write) into the pending bit array, which software must not write, nowhere; anything
    /// else to the device.
    pub fn bar_access(
        &self,
        bar: u8,
        bar_size: u64,
        offset: u64,
        len: u64,
        write: bool,
    ) -> BarAccess {
        let Some(end) = offset
            .checked_add(len)
            .filter(|&end| len > 0 && end <= bar_size)
        else {
            return BarAccess::Dropped;
        };
        if self.in_table(bar, offset, len) {
            return BarAccess::Table(offset - self.table_offset);
        }
        let overlaps =
            |b: u8, start: u64, size: u64| b == bar && offset < start + size && start < end;
        if overlaps(self.table_bar, self.table_offset, self.table_size())
            || (write && overlaps(self.pba_bar, self.pba_offset, self.pba_size()))
        {
            return BarAccess::Dropped;
        }
        BarAccess::Device
    }
}

/// Where a trapped access to a passthrough device's BAR goes ([`MsixCap::bar_access`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarAccess {
    /// The emulated MSI-X table, at this byte offset into it.
    Table(u64),
    /// The device's BAR, through VFIO.
    Device,
    /// Nowhere: a read returns all-ones, a write is dropped.
    Dropped,
}

/// One vector as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MsixVector {
    /// Message address (64 bits).
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// The per-vector mask bit.
    pub masked: bool,
}

/// The guest's view of the MSI-X table (kept as bytes so any access width works).
#[derive(Clone, Debug)]
pub struct MsixTable {
    bytes: Vec<u8>,
}

impl MsixTable {
    /// A table of `vectors` entries in their reset state (all masked, as the spec requires).
    pub fn new(vectors: u16) -> Self {
        let mut bytes = vec![0u8; usize::from(vectors) * ENTRY_SIZE as usize];
        for e in bytes.chunks_mut(ENTRY_SIZE as usize) {
            e[12..16].copy_from_slice(&VECTOR_MASKED.to_le_bytes());
        }
        MsixTable { bytes }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.bytes.len() / ENTRY_SIZE as usize
    }

    /// True for a table without vectors.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Reads at byte `offset` of the table; bytes outside it read as 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes at byte `offset`; returns the indexes of the vectors whose address, data or mask changed.
    /// Bytes outside the table and the reserved bits of vector control are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<usize> {
        let mut changed = Vec::new();
        let Ok(start) = usize::try_from(offset) else {
            return changed;
        };
        for (i, d) in data.iter().enumerate() {
            let Some(pos) = start.checked_add(i) else {
                break;
            };
            let Some(b) = self.bytes.get_mut(pos) else {
                break;
            };
            // Only bit 0 of vector control (byte 12 of an entry) is writable.
            let value = match pos % ENTRY_SIZE as usize {
                12 => (*b & !1) | (d & 1),
                13..=15 => *b,
                _ => *d,
            };
            if *b != value {
                *b = value;
                let v = pos / ENTRY_SIZE as usize;
                if changed.last() != Some(&v) {
                    changed.push(v);
                }
            }
        }
        changed
    }

    /// The route vector `i` must have: its message, masked when the entry is masked, the function is
    /// masked, or MSI-X is disabled (the capability's message control).
    pub fn route(&self, i: usize, enabled: bool, function_masked: bool) -> Option<MsixVector> {
        let mut v = self.vector(i)?;
        v.masked |= function_masked || !enabled;
        Some(v)
    }

    /// Vector `i`, if it exists.
    pub fn vector(&self, i: usize) -> Option<MsixVector> {
        let start = i.checked_mul(ENTRY_SIZE as usize)?;
        let e = self
            .bytes
            .get(start..start.checked_add(ENTRY_SIZE as usize)?)?;
        let dw = |k: usize| u32::from_le_bytes([e[k], e[k + 1], e[k + 2], e[k + 3]]);
        Some(MsixVector {
            address: u64::from(dw(0)) | (u64::from(dw(4)) << 32),
            data: dw(8),
            masked: dw(12) & VECTOR_MASKED != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_capability() {
        // igb: 10 vectors, table in BAR3 at 0, PBA in BAR3 at 0x2000.
        let cap = MsixCap::parse(0x70, 0x0009_a011, 0x0000_0003, 0x0000_2003);
        assert_eq!(cap.vectors, 10);
        assert_eq!((cap.table_bar, cap.table_offset), (3, 0));
        assert_eq!((cap.pba_bar, cap.pba_offset), (3, 0x2000));
        assert_eq!(cap.table_size(), 160);
        assert_eq!(cap.pba_size(), 8);
        assert!(cap.in_table(3, 0, 16));
        assert!(cap.in_table(3, 156, 4));
        assert!(!cap.in_table(3, 158, 4));
        assert!(!cap.in_table(0, 0, 4));
        assert!(!cap.in_table(3, u64::MAX, 4));
    }

    #[test]
    fn vectors_start_masked_and_follow_dword_and_qword_writes() {
        let mut t = MsixTable::new(4);
        assert_eq!(t.len(), 4);
        assert!(t.vector(3).unwrap().masked);
        assert_eq!(t.write(16, &0xfee0_1000u32.to_le_bytes()), vec![1]);
        assert_eq!(t.write(20, &0u32.to_le_bytes()), Vec::<usize>::new());
        assert_eq!(t.write(24, &0x4041u32.to_le_bytes()), vec![1]);
        assert_eq!(t.write(28, &0u32.to_le_bytes()), vec![1]);
        let v = t.vector(1).unwrap();
        assert_eq!(
            v,
            MsixVector {
                address: 0xfee0_1000,
                data: 0x4041,
                masked: false
            }
        );
        // A qword write of address lo/hi at once.
        assert_eq!(t.write(32, &0x1_fee0_2000u64.to_le_bytes()), vec![2]);
        assert_eq!(t.vector(2).unwrap().address, 0x1_fee0_2000);
        let mut b = [0u8; 8];
        t.read(32, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1_fee0_2000);
    }

    #[test]
    fn routes_are_masked_by_entry_function_and_enable() {
        let mut t = MsixTable::new(2);
        t.write(0, &0xfee0_0000u32.to_le_bytes());
        t.write(8, &0x31u32.to_le_bytes());
        assert!(
            t.route(0, true, false).unwrap().masked,
            "entry still masked"
        );
        t.write(12, &0u32.to_le_bytes());
        let r = t.route(0, true, false).unwrap();
        assert_eq!((r.address, r.data, r.masked), (0xfee0_0000, 0x31, false));
        assert!(t.route(0, true, true).unwrap().masked, "function mask");
        assert!(t.route(0, false, false).unwrap().masked, "MSI-X disabled");
        assert!(t.route(2, true, false).is_none());
    }

    #[test]
    fn reserved_control_bits_and_out_of_range_accesses_are_ignored() {
        let mut t = MsixTable::new(2);
        assert_eq!(t.write(12, &0xffff_fffeu32.to_le_bytes()), vec![0]);
        let mut b = [0u8; 4];
        t.read(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0, "only bit 0 is writable");
        assert!(t.write(32, &[1, 2, 3, 4]).is_empty());
        assert!(t.write(u64::MAX, &[1, 2, 3, 4]).is_empty());
        let mut b = [0xaau8; 8];
        t.read(28, &mut b);
        assert_eq!(&b[4..], &[0, 0, 0, 0], "past the end reads 0");
        t.read(u64::MAX - 1, &mut b);
        // A write that straddles the end changes only what is inside.
        assert_eq!(t.write(30, &[0xff; 4]), Vec::<usize>::new());
        assert!(t.vector(5).is_none());
        assert!(t.vector(usize::MAX).is_none(), "no overflow");
        assert!(t.route(usize::MAX / 16 + 1, true, false).is_none());
    }

    #[test]
    fn bar_accesses_go_to_the_table_the_device_or_nowhere() {
        // igb: 10 vectors, table in BAR3 at 0 (160 bytes), PBA in BAR3 at 0x2000; BAR3 is 16 KiB.
        let cap = MsixCap::parse(0x70, 0x0009_a011, 0x0000_0003, 0x0000_2003);
        let at = |bar, off, len, write| cap.bar_access(bar, 0x4000, off, len, write);
        assert_eq!(at(3, 16, 4, true), BarAccess::Table(16));
        assert_eq!(at(3, 152, 8, false), BarAccess::Table(152));
        assert_eq!(at(3, 156, 8, false), BarAccess::Dropped, "across the end");
        assert_eq!(at(3, 160, 4, true), BarAccess::Device, "right after it");
        assert_eq!(at(3, 0x2000, 8, false), BarAccess::Device, "PBA reads");
        assert_eq!(at(3, 0x2004, 4, true), BarAccess::Dropped, "PBA writes");
        assert_eq!(at(3, 0x2008, 4, true), BarAccess::Device);
        assert_eq!(at(3, 0x3ffc, 8, false), BarAccess::Dropped, "past the BAR");
        assert_eq!(at(3, u64::MAX, 8, true), BarAccess::Dropped);
        assert_eq!(at(3, 0, 0, false), BarAccess::Dropped, "empty");
        assert_eq!(at(0, 0, 4, true), BarAccess::Device, "another BAR");
    }
}
