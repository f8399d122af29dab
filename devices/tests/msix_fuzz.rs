//! Property-based fuzzing of MSI-X emulation as a guest reaches it: random capabilities (any table size,
//! BAR and offset), trapped BAR accesses of any size at any offset (in the table, across its edges, in
//! the PBA, past the BAR's end), and the guest's table under random reads and writes of any width.
//!
//! Checked: the device never sees a table byte, a PBA write or a byte past the BAR's end, and an access
//! inside the table always reaches the emulated table; the table reads back what was written, masked by
//! the writable bits (only bit 0 of vector control), reads past its end are 0, a write reports exactly
//! the vectors whose bytes changed, and each vector's route is its entry, masked when the entry, the
//! function or MSI-X is.
//!
//! `PROPTEST_CASES` sets the number of cases (`scripts/test` uses 4000).

use devices::vfio_pci::msix::{BarAccess, MsixCap, MsixTable, MsixVector, ENTRY_SIZE};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

/// A capability: message control (table size), table and PBA dwords (BIR in the low 3 bits).
fn cap() -> impl Strategy<Value = MsixCap> {
    let offset = prop_oneof![
        Just(0u32),
        (0u32..16).prop_map(|p| p << 12),
        (0u32..0x1_0000).prop_map(|o| o & !7),
        any::<u32>(),
    ];
    (
        prop_oneof![0u32..16, 0u32..0x800],
        (offset.clone(), 0u32..8),
        (offset, 0u32..8),
    )
        .prop_map(|(size, (t, tb), (p, pb))| {
            MsixCap::parse(0x70, 0x11 | (size << 16), (t & !7) | tb, (p & !7) | pb)
        })
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(4u64),
        Just(8),
        Just(1),
        Just(2),
        Just(0),
        Just(3),
        0u64..64
    ]
}

/// An offset near the table's or the PBA's edges, or anywhere.
fn offset_near(cap: MsixCap) -> impl Strategy<Value = u64> {
    let (t, te) = (cap.table_offset, cap.table_offset + cap.table_size());
    let (p, pe) = (cap.pba_offset, cap.pba_offset + cap.pba_size());
    prop_oneof![
        (0u64..16).prop_map(move |d| (t + d).saturating_sub(8)),
        (0u64..16).prop_map(move |d| (te + d).saturating_sub(8)),
        (t..te),
        (0u64..16).prop_map(move |d| (p + d).saturating_sub(8)),
        (0u64..16).prop_map(move |d| (pe + d).saturating_sub(8)),
        0u64..0x2_0000,
        any::<u64>(),
    ]
}

fn bar_size() -> impl Strategy<Value = u64> {
    prop_oneof![(4u32..24).prop_map(|s| 1u64 << s), Just(0u64), any::<u64>(),]
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    let (a, a_end, b, b_end) = (
        u128::from(a),
        u128::from(a) + u128::from(a_len),
        u128::from(b),
        u128::from(b) + u128::from(b_len),
    );
    a < b_end && b < a_end
}

/// The table a test expects: `bytes` as the guest may have written them.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn new(vectors: u16) -> Self {
        let mut bytes = vec![0u8; usize::from(vectors) * ENTRY_SIZE as usize];
        for e in bytes.chunks_mut(ENTRY_SIZE as usize) {
            e[12] = 1;
        }
        Model { bytes }
    }

    /// Applies a write; returns the entries whose bytes changed.
    fn write(&mut self, offset: u64, data: &[u8]) -> Vec<usize> {
        let mut changed = Vec::new();
        for (i, &d) in data.iter().enumerate() {
            let pos = u128::from(offset) + i as u128;
            let Some(b) = usize::try_from(pos)
                .ok()
                .and_then(|p| self.bytes.get_mut(p))
            else {
                continue;
            };
            let p = pos as usize;
            let new = match p % 16 {
                12 => d & 1,
                13..=15 => 0,
                _ => d,
            };
            if *b != new {
                *b = new;
                if !changed.contains(&(p / 16)) {
                    changed.push(p / 16);
                }
            }
        }
        changed
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                usize::try_from(u128::from(offset) + i as u128)
                    .ok()
                    .and_then(|p| self.bytes.get(p))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn vector(&self, i: usize) -> MsixVector {
        let e = &self.bytes[i * 16..i * 16 + 16];
        let dw = |k: usize| u32::from_le_bytes([e[k], e[k + 1], e[k + 2], e[k + 3]]);
        MsixVector {
            address: u64::from(dw(0)) | (u64::from(dw(4)) << 32),
            data: dw(8),
            masked: e[12] & 1 != 0,
        }
    }
}

#[derive(Clone, Debug)]
enum TableOp {
    Write(u64, Vec<u8>),
    Read(u64, usize),
    Route(usize, bool, bool),
}

fn table_op(vectors: u16) -> impl Strategy<Value = TableOp> {
    let size = u64::from(vectors) * ENTRY_SIZE;
    let offset = prop_oneof![
        4 => (0..size + 32).prop_map(|o| o & !3),
        2 => 0..size + 32,
        1 => any::<u64>(),
        1 => Just(u64::MAX - 2),
    ];
    let data = prop_oneof![
        4 => any::<u32>().prop_map(|v| v.to_le_bytes().to_vec()),
        2 => any::<u64>().prop_map(|v| v.to_le_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..40),
        1 => Just(vec![0u8; 4]),
    ];
    prop_oneof![
        4 => (offset.clone(), data).prop_map(|(o, d)| TableOp::Write(o, d)),
        2 => (offset, 0usize..24).prop_map(|(o, n)| TableOp::Read(o, n)),
        1 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(i, e, m)| TableOp::Route(i, e, m)),
    ]
}

fn table_case() -> impl Strategy<Value = (u16, Vec<TableOp>)> {
    prop_oneof![1u16..8, 1u16..=2048]
        .prop_flat_map(|v| (Just(v), prop::collection::vec(table_op(v), 1..64)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn trapped_bar_accesses_reach_the_table_the_device_or_nothing(
        (cap, bar, bar_size, offset, len, write) in cap().prop_flat_map(|c| {
            (Just(c), prop_oneof![Just(c.table_bar), Just(c.pba_bar), 0u8..8], bar_size(),
             offset_near(c), len(), any::<bool>())
        })
    ) {
        let access = cap.bar_access(bar, bar_size, offset, len, write);
        let in_bar = len > 0 && u128::from(offset) + u128::from(len) <= u128::from(bar_size);
        let table = bar == cap.table_bar && overlaps(offset, len, cap.table_offset, cap.table_size());
        let pba = bar == cap.pba_bar && overlaps(offset, len, cap.pba_offset, cap.pba_size());
        let inside_table = bar == cap.table_bar
            && offset >= cap.table_offset
            && u128::from(offset) + u128::from(len)
                <= u128::from(cap.table_offset) + u128::from(cap.table_size());
        match access {
            BarAccess::Table(o) => {
                prop_assert!(in_bar && inside_table, "{:?}", access);
                prop_assert_eq!(o, offset - cap.table_offset);
                prop_assert!(o + len <= cap.table_size());
            }
            BarAccess::Device => {
                prop_assert!(in_bar, "the device sees nothing past the BAR's end");
                prop_assert!(!table, "the device never sees a table byte");
                prop_assert!(!(write && pba), "the device never sees a PBA write");
            }
            BarAccess::Dropped => {
                prop_assert!(!(in_bar && inside_table), "an access inside the table is emulated");
                prop_assert!(
                    !in_bar || table || (write && pba),
                    "an ordinary access inside the BAR reaches the device"
                );
            }
        }
    }

    #[test]
    fn parsed_capabilities_are_in_range(dw0: u32, table: u32, pba: u32) {
        let c = MsixCap::parse(0x70, dw0, table, pba);
        prop_assert!((1..=2048).contains(&c.vectors));
        prop_assert!(c.table_bar < 8 && c.pba_bar < 8);
        prop_assert_eq!(c.table_offset % 8, 0);
        prop_assert_eq!(c.pba_offset % 8, 0);
        prop_assert_eq!(c.table_size(), u64::from(c.vectors) * 16);
        prop_assert!(c.pba_size().is_multiple_of(8) && c.pba_size() * 8 >= u64::from(c.vectors));
        prop_assert!(c.in_table(c.table_bar, c.table_offset, c.table_size()));
        prop_assert!(!c.in_table(c.table_bar, c.table_offset, c.table_size() + 1));
    }

    #[test]
    fn the_table_reads_back_what_was_written_masked_by_the_writable_bits(
        (vectors, ops) in table_case()
    ) {
        let mut t = MsixTable::new(vectors);
        let mut m = Model::new(vectors);
        prop_assert_eq!(t.len(), usize::from(vectors));
        for op in &ops {
            match op {
                TableOp::Write(off, data) => {
                    let got = t.write(*off, data);
                    prop_assert_eq!(got, m.write(*off, data), "vectors reported as changed");
                }
                TableOp::Read(off, n) => {
                    let mut d = vec![0xa5u8; *n];
                    t.read(*off, &mut d);
                    prop_assert_eq!(d, m.read(*off, *n));
                }
                TableOp::Route(i, enabled, fmask) => {
                    let i = i % (usize::from(vectors) + 2);
                    let r = t.route(i, *enabled, *fmask);
                    if i < usize::from(vectors) {
                        let mut want = m.vector(i);
                        want.masked |= *fmask || !*enabled;
                        prop_assert_eq!(r, Some(want));
                    } else {
                        prop_assert_eq!(r, None);
                    }
                }
            }
        }
        for i in 0..usize::from(vectors) {
            prop_assert_eq!(t.vector(i), Some(m.vector(i)));
        }
        prop_assert_eq!(t.vector(usize::from(vectors)), None);
        prop_assert_eq!(t.vector(usize::MAX), None);
    }
}
