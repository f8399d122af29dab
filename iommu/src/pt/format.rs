//! The entry encoding of iovmm's stage-2 I/O page tables, and nothing else.
//!
//! This follows the Intel VT-d second-stage format, 4-level variant, as described in the
//! "Intel Virtualization Technology for Directed I/O Architecture Specification":
//! - section 3.7 "Second-Stage Translation" (the walk: 4 levels of 512 entries, 48-bit input,
//!   super pages at the directory levels),
//! - section 9.8 "Second-Stage Paging Entries" (the bits of each entry).
//!
//! Spec names and our levels (level = how many table levels sit below and including the entry's own):
//!
//! | level | spec name            | one entry spans | may be a leaf             |
//! |-------|----------------------|-----------------|---------------------------|
//! | 4     | SS-PML4E             | 512 GiB         | no (always a table)       |
//! | 3     | SS-PDPE (PS=1: 1 GiB)| 1 GiB           | yes, with PS (bit 7) set  |
//! | 2     | SS-PDE  (PS=1: 2 MiB)| 2 MiB           | yes, with PS (bit 7) set  |
//! | 1     | SS-PTE               | 4 KiB           | always a leaf             |
//!
//! Bits used:
//! - bit 0 `R` (read) and bit 1 `W` (write). An entry with neither is not present (the spec's rule), so
//!   a present entry always has R or W set. Table entries (non-leaf) carry R|W so that the leaf alone
//!   decides the permission (the spec ANDs permissions along the walk).
//! - bit 7 `PS`: leaf at levels 2 and 3. At level 1 the entry is always a leaf and bit 7 stays clear.
//! - bits 51:12 `ADDR`: the output address of a leaf, or the next-level table's address. iovmm's tables
//!   live in the VMM's own memory, so a table entry holds the host virtual address of the next table
//!   (user-space addresses are below 2^47 on x86-64 Linux, so they fit).
//! - bits 61:52: ignored by hardware in non-leaf entries. iovmm keeps, in each *table* entry, the number
//!   of non-zero entries in the table it points to (0..=512), so an emptied table is freed without
//!   scanning it. Leaf entries leave these bits clear.
//! - bits 63, 62, 11:8 and 6:3: ignored by hardware in non-leaf entries (bit 8 is the accessed flag when
//!   second-stage accessed/dirty flags are enabled, which nothing that walks these tables does). iovmm
//!   keeps in them, when it knows it, where the non-zero entries of the table it points to are: bit 63
//!   `RUN` says they are exactly the `count` entries from index `lo` on, all leaves; `lo` (9 bits) is bits
//!   6:3 (its bits 3:0), 11:8 (7:4) and 62 (8). Writers use it to map and unmap runs of entries without
//!   reading them ([`run_of`]). Leaf entries leave these bits clear.
//!
//! Only this module knows these bits; the walker in `walk.rs` asks it.

use super::Prot;

/// Number of levels of the table (4-level second-stage, 48-bit input address).
pub const LEVELS: u32 = 4;
/// Entries per table (one 4 KiB page of 8-byte entries).
pub const ENTRIES: usize = 512;

/// Read permission (spec: R, bit 0).
pub const R: u64 = 1 << 0;
/// Write permission (spec: W, bit 1).
pub const W: u64 = 1 << 1;
/// Page size: the entry is a leaf at level 2 or 3 (spec: PS, bit 7).
pub const PS: u64 = 1 << 7;
/// Output / next-table address (spec: ADDR, bits 51:12).
pub const ADDR_MASK: u64 = ((1u64 << 52) - 1) & !0xfff;
/// Highest output address bit + 1 (addresses must be below `1 << OA_BITS`).
pub const OA_BITS: u32 = 52;
const COUNT_SHIFT: u32 = 52;
const COUNT_MASK: u64 = 0x3ff;
/// One unit of the software child count kept in bits 61:52 of a table entry.
pub const COUNT_ONE: u64 = 1 << COUNT_SHIFT;
/// In a table entry: its table's non-zero entries are one run of leaves, starting at the index kept in
/// [`RUN_LO`] (software bit 63).
pub const RUN: u64 = 1 << 63;
/// The software bits of a table entry that hold the first index of its table's run (see [`run_of`]).
pub const RUN_LO: u64 = (0xf << 3) | (0xf << 8) | (1 << 62);

/// log2 of the span of one entry at `level`.
#[inline(always)]
pub const fn level_shift(level: u32) -> u32 {
    12 + 9 * (level - 1)
}

/// Bytes of IOVA spanned by one entry at `level`.
#[inline(always)]
pub const fn level_size(level: u32) -> u64 {
    1u64 << level_shift(level)
}

/// Index of `iova` in a table at `level`.
#[inline(always)]
pub const fn index(iova: u64, level: u32) -> usize {
    ((iova >> level_shift(level)) & (ENTRIES as u64 - 1)) as usize
}

/// Whether an entry at `level` may be a leaf (levels 1, 2, 3: 4 KiB, 2 MiB, 1 GiB).
#[inline(always)]
pub const fn can_be_leaf(level: u32) -> bool {
    level <= 3
}

/// Whether the entry is present (R or W set).
#[inline(always)]
pub const fn is_present(e: u64) -> bool {
    e & (R | W) != 0
}

/// Whether a present entry at `level` is a leaf.
#[inline(always)]
pub const fn is_leaf(level: u32, e: u64) -> bool {
    level == 1 || e & PS != 0
}

/// The address field (output address of a leaf, next table of a table entry).
#[inline(always)]
pub const fn addr(e: u64) -> u64 {
    e & ADDR_MASK
}

/// Permission bits for `prot`.
#[inline(always)]
pub const fn prot_bits(prot: Prot) -> u64 {
    (if prot.read { R } else { 0 }) | (if prot.write { W } else { 0 })
}

/// The permission of a leaf.
#[inline(always)]
pub const fn prot_of(e: u64) -> Prot {
    Prot {
        read: e & R != 0,
        write: e & W != 0,
    }
}

/// The flags of a leaf at `level` with permission bits `perm` (from [`prot_bits`]):
/// OR them with the output address.
#[inline(always)]
pub const fn leaf_flags(level: u32, perm: u64) -> u64 {
    if level > 1 {
        perm | PS
    } else {
        perm
    }
}

/// A table entry pointing at `table_addr`, whose table holds `count` non-zero entries.
#[inline(always)]
pub const fn table_entry(table_addr: u64, count: u64) -> u64 {
    table_addr | R | W | (count << COUNT_SHIFT)
}

/// The software count of non-zero entries of the table a table entry points to.
#[inline(always)]
pub const fn count(e: u64) -> u64 {
    (e >> COUNT_SHIFT) & COUNT_MASK
}

/// Where the non-zero entries of the table a table entry points to are, when the writer knows it: `Some(lo)`
/// when they are exactly entries `lo..lo + count(e)`, all of them leaves.
#[inline(always)]
pub const fn run_of(e: u64) -> Option<usize> {
    if e & RUN == 0 {
        return None;
    }
    Some((((e >> 3) & 0xf) | ((e >> 8) & 0xf) << 4 | ((e >> 62) & 1) << 8) as usize)
}

/// Table entry `e` with its run set to `run` (see [`run_of`]).
#[inline(always)]
pub const fn with_run(e: u64, run: Option<usize>) -> u64 {
    let e = e & !(RUN | RUN_LO);
    match run {
        None => e,
        Some(lo) => {
            let lo = lo as u64;
            e | RUN | (lo & 0xf) << 3 | ((lo >> 4) & 0xf) << 8 | ((lo >> 8) & 1) << 62
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_levels_span_4k_2m_1g_512g() {
        assert_eq!(level_size(1), 4 << 10);
        assert_eq!(level_size(2), 2 << 20);
        assert_eq!(level_size(3), 1 << 30);
        assert_eq!(level_size(4), 512 << 30);
        assert_eq!(level_shift(LEVELS) + 9, 48);
    }

    #[test]
    fn format_leaf_and_table_entries_round_trip() {
        let e = 0x1234_5000 | leaf_flags(2, prot_bits(Prot::READ));
        assert!(is_present(e) && is_leaf(2, e));
        assert_eq!(addr(e), 0x1234_5000);
        assert_eq!(prot_of(e), Prot::READ);
        let t = table_entry(0x7f00_0000_0000, 512);
        assert!(is_present(t) && !is_leaf(3, t));
        assert_eq!(addr(t), 0x7f00_0000_0000);
        assert_eq!(count(t), 512);
        assert_eq!(count(t - COUNT_ONE), 511);
        assert!(!is_present(0));
        assert_eq!(run_of(t), None);
        for lo in [0, 1, 15, 16, 255, 256, 300, 511] {
            let r = with_run(t, Some(lo));
            assert_eq!(run_of(r), Some(lo));
            assert!(is_present(r) && !is_leaf(3, r));
            assert_eq!((addr(r), count(r)), (0x7f00_0000_0000, 512));
            assert_eq!(with_run(r, None), t);
        }
    }
}
