//! The stage-2 page table rules (shared/DESIGN.md "Stage-2 I/O page tables", issue 2), one test or more per
//! rule, each named after it.

use iommu::pt::{
    Access, Gather, IoPageTable, MapStats, Prot, PtError, TranslateFault, PAGE_1G, PAGE_2M,
    PAGE_4K, PAGE_SIZES,
};

const TIB: u64 = 1 << 40;

fn map(t: &IoPageTable, iova: u64, pa: u64, len: u64, prot: Prot) -> Result<MapStats, PtError> {
    let mut g = Gather::new();
    let r = t.map(iova, pa, len, prot, &mut g);
    t.sync(&mut g);
    r
}

fn unmap(t: &IoPageTable, iova: u64, len: u64) -> Result<u64, PtError> {
    let mut g = Gather::new();
    let r = t.unmap(iova, len, &mut g);
    t.sync(&mut g);
    r
}

/// Independent statement of the page-size rule (iommu_pgsize): at every step, the largest size that the
/// alignment of iova|paddr and the remaining length allow. Returns the leaf sizes in order.
fn expected_leaves(mut iova: u64, mut pa: u64, mut len: u64) -> Vec<u64> {
    let mut out = Vec::new();
    while len > 0 {
        let size = *PAGE_SIZES
            .iter()
            .rev()
            .find(|&&s| (iova | pa).is_multiple_of(s) && len >= s)
            .unwrap();
        out.push(size);
        iova += size;
        pa += size;
        len -= size;
    }
    out
}

/// Every translation of the 4 KiB pages in `[iova, iova + len)`.
fn snapshot(t: &IoPageTable, iova: u64, len: u64, step: u64) -> Vec<Option<(u64, u64)>> {
    (0..len / step)
        .map(|i| {
            t.iova_to_phys(iova + i * step)
                .map(|tr| (tr.paddr, tr.page_size))
        })
        .collect()
}

#[test]
fn map_picks_largest_page_size_alignment_and_length_allow() {
    let cases = [
        // (iova, paddr, len)
        (TIB, 16 * TIB, PAGE_4K),
        (TIB, 16 * TIB, PAGE_2M),
        (TIB, 16 * TIB, PAGE_1G),
        (TIB, 16 * TIB + PAGE_4K, PAGE_2M), // paddr misaligned: 4K only
        (TIB + PAGE_2M, 16 * TIB, PAGE_1G), // iova only 2M aligned: 2M only
        (TIB, 16 * TIB, PAGE_1G + PAGE_2M + PAGE_4K),
        (
            TIB + PAGE_1G - PAGE_4K,
            16 * TIB + PAGE_1G - PAGE_4K,
            PAGE_1G + 2 * PAGE_4K + PAGE_2M,
        ),
        (
            TIB + PAGE_2M - 3 * PAGE_4K,
            16 * TIB - 3 * PAGE_4K,
            3 * PAGE_2M,
        ),
        (TIB + (1 << 20), 16 * TIB + (1 << 20), 1 << 20), // 1M aligned, not 2M: 256 x 4K
    ];
    for (iova, pa, len) in cases {
        let t = IoPageTable::new();
        let st = map(&t, iova, pa, len, Prot::RW).unwrap();
        let want = expected_leaves(iova, pa, len);
        let count = |s| want.iter().filter(|&&x| x == s).count() as u64;
        assert_eq!(
            st.leaves_written,
            want.len() as u64,
            "{iova:#x} {pa:#x} {len:#x}"
        );
        assert_eq!(
            (st.leaves_4k, st.leaves_2m, st.leaves_1g),
            (count(PAGE_4K), count(PAGE_2M), count(PAGE_1G)),
            "{iova:#x} {pa:#x} {len:#x}"
        );
        // And each leaf really has that size in the table.
        let mut at = 0;
        for size in want {
            let tr = t.iova_to_phys(iova + at).unwrap();
            assert_eq!(tr.page_size, size, "leaf at {:#x}", iova + at);
            at += size;
        }
    }
}

#[test]
fn map_writes_runs_of_leaves_in_one_call() {
    let t = IoPageTable::new();
    // 256 x 4K in one table: one call, 256 leaves, 3 new tables (levels 3, 2, 1).
    let st = map(&t, TIB + (1 << 20), 16 * TIB + (1 << 20), 1 << 20, Prot::RW).unwrap();
    assert_eq!(
        (st.leaves_written, st.leaves_4k, st.tables_allocated),
        (256, 256, 3)
    );
    // A run across two leaf tables: 1024 pages, two more leaf tables under the same level-2 table.
    let st = map(
        &t,
        TIB + 3 * PAGE_2M,
        16 * TIB + PAGE_4K,
        2 * PAGE_2M,
        Prot::RW,
    )
    .unwrap();
    assert_eq!((st.leaves_4k, st.tables_allocated), (1024, 2));
    for i in 0..1024 {
        let tr = t.iova_to_phys(TIB + 3 * PAGE_2M + i * PAGE_4K).unwrap();
        assert_eq!(tr.paddr, 16 * TIB + PAGE_4K + i * PAGE_4K);
    }
    // A guest's 64 GiB, 1 GiB aligned: at most 64 leaves.
    let st = map(&t, 4 * TIB, 0, 64 * PAGE_1G, Prot::RW).unwrap();
    assert_eq!((st.leaves_written, st.leaves_1g), (64, 64));
    // 256 x 2M and 256 x 1G: one run each.
    let st = map(&t, 8 * TIB, 8 * TIB, 256 * PAGE_2M, Prot::RW).unwrap();
    assert_eq!(st.leaves_2m, 256);
    let st = map(&t, 9 * TIB, 9 * TIB, 256 * PAGE_1G, Prot::RW).unwrap();
    assert_eq!(st.leaves_1g, 256);
}

#[test]
fn overlapping_map_is_refused_and_table_unchanged() {
    let t = IoPageTable::new();
    let base = TIB;
    map(&t, base, 0x1000_0000, 16 * PAGE_4K, Prot::RW).unwrap(); // 4K leaves
    map(&t, base + PAGE_1G, 2 * PAGE_1G, PAGE_2M, Prot::READ).unwrap(); // one 2M leaf
    map(&t, base + 2 * PAGE_1G, 4 * PAGE_1G, PAGE_1G, Prot::WRITE).unwrap(); // one 1G leaf
    let window = 4 * PAGE_1G;
    let before = snapshot(&t, base, window, PAGE_4K);
    let pool = t.pool_stats();
    let refused = [
        // (iova, len, first mapped iova)
        (base, 16 * PAGE_4K, base),
        (base + 5 * PAGE_4K, PAGE_4K, base + 5 * PAGE_4K),
        (base - 4 * PAGE_4K, 5 * PAGE_4K, base),
        (base + 15 * PAGE_4K, 4 * PAGE_4K, base + 15 * PAGE_4K),
        (base - PAGE_2M, 4 * PAGE_2M, base), // would be 2M leaves over a table holding 4K leaves
        (base + PAGE_1G + PAGE_4K, PAGE_4K, base + PAGE_1G + PAGE_4K), // inside a 2M leaf
        (base + PAGE_1G - PAGE_2M, 2 * PAGE_2M, base + PAGE_1G),
        (base + PAGE_1G, PAGE_1G, base + PAGE_1G), // a 1G leaf over a table holding a 2M leaf
        (
            base + 2 * PAGE_1G + PAGE_2M,
            PAGE_2M,
            base + 2 * PAGE_1G + PAGE_2M,
        ), // inside a 1G leaf
        (base + PAGE_1G + PAGE_2M, 2 * PAGE_1G, base + 2 * PAGE_1G), // free part first, then the 1G leaf
    ];
    for (iova, len, first) in refused {
        // paddr aligned like the iova so the largest leaves would be used.
        let r = map(&t, iova, iova, len, Prot::RW);
        assert_eq!(
            r,
            Err(PtError::Overlap { iova: first }),
            "map {iova:#x}+{len:#x}"
        );
        assert_eq!(
            snapshot(&t, base, window, PAGE_4K),
            before,
            "table changed by {iova:#x}"
        );
        let after = t.pool_stats();
        assert_eq!(after.table_pages_in_use, pool.table_pages_in_use);
        assert_eq!(after.table_pages_pending, 0);
    }
    // Right next to the mappings is fine.
    map(&t, base + 16 * PAGE_4K, 0, PAGE_4K, Prot::RW).unwrap();
    map(&t, base + PAGE_1G + PAGE_2M, 0, PAGE_2M, Prot::RW).unwrap();
}

#[test]
fn partial_unmap_of_huge_leaf_is_refused_no_silent_split() {
    for (size, sub) in [(PAGE_2M, PAGE_4K), (PAGE_1G, PAGE_4K), (PAGE_1G, PAGE_2M)] {
        let t = IoPageTable::new();
        let leaf = TIB + 3 * PAGE_1G;
        map(&t, leaf, 7 * PAGE_1G, size, Prot::RW).unwrap();
        let before = snapshot(&t, leaf - PAGE_1G, 3 * PAGE_1G, PAGE_2M);
        let refused = [
            (leaf, sub),                  // head
            (leaf + sub, sub),            // middle
            (leaf + size - sub, sub),     // tail
            (leaf - sub, 2 * sub),        // across the start
            (leaf + size - sub, 2 * sub), // across the end
            (leaf + sub, size),           // from inside to past the end
        ];
        for (iova, len) in refused {
            assert_eq!(
                unmap(&t, iova, len),
                Err(PtError::PartialHugeUnmap {
                    iova: leaf,
                    page_size: size
                }),
                "unmap {iova:#x}+{len:#x} of a {size:#x} leaf"
            );
            assert_eq!(t.iova_to_phys(leaf + sub).unwrap().page_size, size);
            assert_eq!(snapshot(&t, leaf - PAGE_1G, 3 * PAGE_1G, PAGE_2M), before);
        }
        // The whole leaf (with margins) unmaps.
        assert_eq!(unmap(&t, leaf - size, 3 * size), Ok(size));
        assert_eq!(t.iova_to_phys(leaf), None);
    }
    // 4K leaves can be unmapped one by one out of a run.
    let t = IoPageTable::new();
    map(&t, TIB, 0, 8 * PAGE_4K, Prot::RW).unwrap();
    assert_eq!(unmap(&t, TIB + 3 * PAGE_4K, PAGE_4K), Ok(PAGE_4K));
    assert_eq!(t.iova_to_phys(TIB + 3 * PAGE_4K), None);
    assert!(t.iova_to_phys(TIB + 4 * PAGE_4K).is_some());
}

#[test]
fn unmap_skips_holes_and_returns_bytes_unmapped() {
    let t = IoPageTable::new();
    map(&t, TIB, 0, PAGE_4K, Prot::RW).unwrap();
    map(&t, TIB + PAGE_2M, PAGE_2M, PAGE_2M, Prot::RW).unwrap();
    map(&t, TIB + PAGE_1G, PAGE_1G, PAGE_1G, Prot::RW).unwrap();
    assert_eq!(unmap(&t, TIB, 2 * PAGE_1G), Ok(PAGE_4K + PAGE_2M + PAGE_1G));
    assert_eq!(unmap(&t, TIB, 2 * PAGE_1G), Ok(0));
}

/// A leaf table holding as many entries as the unmapped run is long, with a hole in the run and one entry
/// outside it: the bytes returned count only what the run held (regression: a shortcut once trusted the
/// table's count).
#[test]
fn unmap_counts_holes_when_the_table_count_equals_the_run_length() {
    let t = IoPageTable::new();
    let base = TIB + 8 * PAGE_2M;
    map(&t, base, 0, 10 * PAGE_4K, Prot::RW).unwrap();
    map(&t, base + 11 * PAGE_4K, 0, 245 * PAGE_4K, Prot::RW).unwrap();
    map(&t, base + 300 * PAGE_4K, 0, PAGE_4K, Prot::RW).unwrap();
    // 256 entries live; the run [0, 256) holds 255 of them.
    assert_eq!(unmap(&t, base, 256 * PAGE_4K), Ok(255 * PAGE_4K));
    assert!(t.iova_to_phys(base + 300 * PAGE_4K).is_some());
    assert_eq!(unmap(&t, base, PAGE_2M), Ok(PAGE_4K));
    // The same with 2 MiB leaves in a level-2 table.
    let base = 2 * TIB;
    map(&t, base, base, 10 * PAGE_2M, Prot::RW).unwrap();
    map(&t, base + 11 * PAGE_2M, base, 245 * PAGE_2M, Prot::RW).unwrap();
    map(&t, base + 300 * PAGE_2M, base, PAGE_2M, Prot::RW).unwrap();
    assert_eq!(unmap(&t, base, 256 * PAGE_2M), Ok(255 * PAGE_2M));
    assert_eq!(unmap(&t, base, PAGE_1G), Ok(PAGE_2M));
}

#[test]
fn iova_to_phys_for_each_leaf_size() {
    for (i, &size) in PAGE_SIZES.iter().enumerate() {
        let t = IoPageTable::new();
        let iova = TIB + 5 * size;
        let pa = 3 * PAGE_1G + 7 * size;
        let prot = [Prot::READ, Prot::WRITE, Prot::RW][i];
        map(&t, iova, pa, size, prot).unwrap();
        let offsets = [0, 8, PAGE_4K - 1, PAGE_4K, size / 2 + 0x123, size - 1];
        for off in offsets.into_iter().filter(|&o| o < size) {
            let tr = t.iova_to_phys(iova + off).unwrap();
            assert_eq!(tr.paddr, pa + off, "size {size:#x} off {off:#x}");
            assert_eq!(tr.page_size, size);
            assert_eq!(tr.prot, prot);
        }
        assert_eq!(t.iova_to_phys(iova - 1), None);
        assert_eq!(t.iova_to_phys(iova + size), None);
        assert_eq!(t.iova_to_phys(u64::MAX), None);
    }
}

#[test]
fn translate_enforces_read_and_write_permission() {
    let t = IoPageTable::new();
    let mut tr = t.translator();
    for (i, prot) in [Prot::READ, Prot::WRITE, Prot::RW].into_iter().enumerate() {
        for &size in &PAGE_SIZES {
            let iova = TIB * (i as u64 + 1) + 3 * size;
            map(&t, iova, iova, size, prot).unwrap();
            for access in [Access::Read, Access::Write] {
                let want = if prot.allows(access) {
                    Ok(iova + 0x10)
                } else {
                    Err(TranslateFault::Permission {
                        iova: iova + 0x10,
                        access,
                    })
                };
                // Uncached walk, IOTLB miss, then IOTLB hit: all enforce the permission.
                assert_eq!(
                    t.translate(iova + 0x10, access),
                    want,
                    "{prot:?} {access:?}"
                );
                tr.invalidate();
                assert_eq!(
                    tr.translate(iova + 0x10, access),
                    want,
                    "{prot:?} {access:?} miss"
                );
                assert_eq!(
                    tr.translate(iova + 0x10, access),
                    want,
                    "{prot:?} {access:?} hit"
                );
            }
        }
    }
    assert!(tr.stats().hits > 0 && tr.stats().misses > 0);
    assert_eq!(
        tr.translate(0x1000, Access::Read),
        Err(TranslateFault::NotMapped { iova: 0x1000 })
    );
}

#[test]
fn map_refuses_bad_arguments_with_typed_errors() {
    let t = IoPageTable::new();
    let mut g = Gather::new();
    assert_eq!(t.map(0, 0, 0, Prot::RW, &mut g), Err(PtError::ZeroLength));
    assert!(matches!(
        t.map(0x800, 0, PAGE_4K, Prot::RW, &mut g),
        Err(PtError::Unaligned { .. })
    ));
    assert!(matches!(
        t.map(0, 0x800, PAGE_4K, Prot::RW, &mut g),
        Err(PtError::Unaligned { .. })
    ));
    assert!(matches!(
        t.map(0, 0, 0x800, Prot::RW, &mut g),
        Err(PtError::Unaligned { .. })
    ));
    assert!(matches!(
        t.map((1 << 48) - PAGE_4K, 0, 2 * PAGE_4K, Prot::RW, &mut g),
        Err(PtError::OutOfRange { .. })
    ));
    assert!(matches!(
        t.map(u64::MAX - 0xfff, 0, PAGE_4K, Prot::RW, &mut g),
        Err(PtError::OutOfRange { .. })
    ));
    assert!(matches!(
        t.map(0, (1 << 52) - PAGE_4K, 2 * PAGE_4K, Prot::RW, &mut g),
        Err(PtError::OutputOutOfRange { .. })
    ));
    let none = Prot {
        read: false,
        write: false,
    };
    assert_eq!(
        t.map(0, 0, PAGE_4K, none, &mut g),
        Err(PtError::NoPermission)
    );
    assert_eq!(t.unmap(0, 0, &mut g), Err(PtError::ZeroLength));
    assert!(matches!(
        t.unmap(1 << 48, PAGE_4K, &mut g),
        Err(PtError::OutOfRange { .. })
    ));
    assert_eq!(g.range(), None);
    // The top of the IOVA space is usable.
    map(&t, (1 << 48) - PAGE_1G, 0, PAGE_1G, Prot::RW).unwrap();
    assert_eq!(t.iova_to_phys((1 << 48) - 1).unwrap().paddr, PAGE_1G - 1);
}

#[test]
fn gather_and_sync_once_per_call_invalidates_once() {
    let t = IoPageTable::new();
    let g0 = t.invalidations();
    // A map has nothing to invalidate: sync is free.
    let mut g = Gather::new();
    t.map(TIB, 0, 64 * PAGE_2M + 300 * PAGE_4K, Prot::RW, &mut g)
        .unwrap();
    assert!(!g.needs_flush());
    t.sync(&mut g);
    assert_eq!(t.invalidations(), g0);
    // One unmap touching many leaves and several tables gathers everything; one sync invalidates once.
    let mut g = Gather::new();
    let bytes = t.unmap(TIB, PAGE_1G, &mut g).unwrap();
    assert_eq!(bytes, 64 * PAGE_2M + 300 * PAGE_4K);
    assert!(g.needs_flush());
    assert_eq!(g.range(), Some(TIB..TIB + PAGE_1G));
    assert!(
        g.freed_pages() >= 2,
        "leaf tables freed: {}",
        g.freed_pages()
    );
    assert_eq!(t.invalidations(), g0, "nothing invalidated before sync");
    assert_eq!(t.pool_stats().table_pages_pending, g.freed_pages());
    t.sync(&mut g);
    assert_eq!(t.invalidations(), g0 + 1);
    assert_eq!(t.pool_stats().table_pages_pending, 0);
    assert!(
        !g.needs_flush() && g.range().is_none(),
        "sync empties the gather"
    );
    // Unmapping nothing needs no invalidation.
    let mut g = Gather::new();
    assert_eq!(t.unmap(TIB, PAGE_1G, &mut g), Ok(0));
    t.sync(&mut g);
    assert_eq!(t.invalidations(), g0 + 1);
}

#[test]
fn iotlb_invalidation_takes_effect_at_sync_not_before() {
    let t = IoPageTable::new();
    let mut tr = t.translator();
    map(&t, TIB, 0x5000, PAGE_4K, Prot::RW).unwrap();
    assert_eq!(tr.translate(TIB + 8, Access::Read), Ok(0x5008));
    let mut g = Gather::new();
    t.unmap(TIB, PAGE_4K, &mut g).unwrap();
    // Gathered, not yet synced: the cached translation is still served (as a hardware IOTLB would).
    assert_eq!(tr.translate(TIB + 8, Access::Read), Ok(0x5008));
    t.sync(&mut g);
    assert_eq!(
        tr.translate(TIB + 8, Access::Read),
        Err(TranslateFault::NotMapped { iova: TIB + 8 })
    );
}

#[test]
fn iotlb_never_stale_after_unmap_and_sync() {
    let t = IoPageTable::new();
    let mut trs: Vec<_> = (0..3).map(|_| t.translator()).collect();
    for round in 0..200u64 {
        let size = PAGE_SIZES[(round % 3) as usize];
        let iova = TIB + (round % 7) * PAGE_1G;
        let pa = (round + 1) * PAGE_1G;
        let prot = if round % 2 == 0 { Prot::RW } else { Prot::READ };
        map(&t, iova, pa, size, prot).unwrap();
        for tr in trs.iter_mut() {
            assert_eq!(tr.translate(iova + 0x40, Access::Read), Ok(pa + 0x40));
            assert_eq!(tr.translate(iova + 0x40, Access::Read), Ok(pa + 0x40));
            let w = tr.translate(iova + 0x40, Access::Write);
            assert_eq!(w.is_ok(), prot.write);
        }
        assert_eq!(unmap(&t, iova, size), Ok(size));
        for tr in trs.iter_mut() {
            assert_eq!(
                tr.translate(iova + 0x40, Access::Read),
                Err(TranslateFault::NotMapped { iova: iova + 0x40 }),
                "round {round}: stale IOTLB entry after unmap + sync"
            );
        }
    }
    assert!(trs[0].stats().hits >= 200);
}

/// Table pages do not leak. Since tables emptied by unmaps that cover only part of their span stay linked
/// (idle, as in Linux, so that single-page map/unmap pairs do not allocate), "baseline" means: right after an
/// unmap that covers every table's span (round 2), or after piecewise unmaps (rounds 0 and 1) and an explicit
/// [`IoPageTable::reclaim_idle_tables`]. Either way every page but the root must be back in the pool.
#[test]
fn pool_usage_returns_to_baseline_after_unmapping_everything() {
    let t = IoPageTable::new();
    let empty = t.pool_stats();
    assert_eq!(empty.table_pages_in_use, 1, "an empty table is its root");
    let maps = [
        (TIB, 0, PAGE_4K),
        (TIB + (1 << 20), 1 << 20, 1 << 20),
        (TIB + PAGE_1G, PAGE_4K, PAGE_2M * 3), // misaligned: 4K leaves over 3 leaf tables
        (2 * TIB, 0, 5 * PAGE_1G + 3 * PAGE_2M + 5 * PAGE_4K),
        ((1 << 48) - PAGE_2M, 0, PAGE_2M),
    ];
    for round in 0..3 {
        for &(iova, pa, len) in &maps {
            map(&t, iova, pa, len, Prot::RW).unwrap();
        }
        assert!(t.pool_stats().table_pages_in_use > 5);
        match round {
            // Unmap each mapping on its own...
            0 => {
                for &(iova, _, len) in &maps {
                    assert_eq!(unmap(&t, iova, len), Ok(len));
                }
            }
            // ... 4K at a time where possible...
            1 => {
                for &(iova, pa, len) in &maps {
                    let mut at = 0;
                    while at < len {
                        let size = t.iova_to_phys(iova + at).unwrap().page_size;
                        assert_eq!(unmap(&t, iova + at, size), Ok(size));
                        at += size;
                    }
                    let _ = pa;
                }
            }
            // ... or the whole IOVA space at once.
            _ => {
                let total: u64 = maps.iter().map(|m| m.2).sum();
                assert_eq!(unmap(&t, 0, 1 << 48), Ok(total));
            }
        }
        let s = t.pool_stats();
        if round < 2 {
            // Piecewise unmaps leave the emptied tables linked, idle.
            assert!(s.table_pages_idle > 0, "round {round}: {s:?}");
            assert!(s.table_pages_in_use > 1, "round {round}: {s:?}");
            let freed = t.reclaim_idle_tables();
            assert_eq!(freed + 1, s.table_pages_in_use, "round {round}: {s:?}");
        }
        let s = t.pool_stats();
        assert_eq!(s.table_pages_in_use, 1, "round {round}: {s:?}");
        assert_eq!(s.table_pages_idle, 0, "round {round}: {s:?}");
        assert_eq!(s.table_pages_pending, 0, "round {round}: {s:?}");
        assert_eq!(s.table_pages_free + 1, s.table_pages_reserved);
        // Nothing is left mapped, and reclaiming again finds nothing.
        assert_eq!(t.reclaim_idle_tables(), 0);
        for &(iova, _, len) in &maps {
            assert_eq!(t.iova_to_phys(iova), None);
            assert_eq!(t.iova_to_phys(iova + len - 1), None);
        }
    }
}

/// Tables freed by an unmap (here one covering the whole 512 GiB span of the level-3 table) stay pending,
/// unusable, until the sync that makes them reusable.
#[test]
fn table_pages_freed_by_unmap_wait_for_sync_before_reuse() {
    let t = IoPageTable::new();
    map(&t, TIB, 0, PAGE_4K, Prot::RW).unwrap();
    let reserved = t.pool_stats().table_pages_reserved;
    let mut g = Gather::new();
    t.unmap(TIB, 512 * PAGE_1G, &mut g).unwrap();
    let s = t.pool_stats();
    assert_eq!((s.table_pages_in_use, s.table_pages_pending), (1, 3));
    assert_eq!(g.freed_pages(), 3);
    // Mapping before the sync cannot reuse the pending pages.
    let mut g2 = Gather::new();
    t.map(TIB, 0, PAGE_4K, Prot::RW, &mut g2).unwrap();
    assert_eq!(t.pool_stats().table_pages_pending, 3);
    t.sync(&mut g);
    let s = t.pool_stats();
    assert_eq!((s.table_pages_in_use, s.table_pages_pending), (4, 0));
    assert_eq!(s.table_pages_reserved, reserved);
}

/// A single-page map + unmap in strict mode (a NIC driver's pattern) allocates and frees no table: the
/// unmap leaves the emptied leaf table linked (idle), the next map there reuses it, and the unmap's sync
/// frees no page (so it takes no lock).
#[test]
fn single_page_churn_reuses_idle_tables_without_allocating() {
    let t = IoPageTable::new();
    let mut tr = t.translator();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let pages: Vec<u64> = (0..2000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            TIB + (x % 64) * PAGE_2M + (x >> 20) % 512 * PAGE_4K
        })
        .collect();
    // Warm: every 2 MiB region of the window gets its leaf table.
    for r in 0..64 {
        map(&t, TIB + r * PAGE_2M, 0, PAGE_4K, Prot::RW).unwrap();
        assert_eq!(unmap(&t, TIB + r * PAGE_2M, PAGE_4K), Ok(PAGE_4K));
    }
    let before = t.pool_stats();
    assert_eq!(before.table_pages_idle, 64, "{before:?}");
    for &iova in &pages {
        let mut g = Gather::new();
        let st = t
            .map(iova, iova + 16 * TIB, PAGE_4K, Prot::RW, &mut g)
            .unwrap();
        assert_eq!((st.leaves_4k, st.tables_allocated), (1, 0));
        t.sync(&mut g);
        assert_eq!(
            tr.translate(iova + 8, Access::Read),
            Ok(iova + 16 * TIB + 8)
        );
        let mut g = Gather::new();
        assert_eq!(t.unmap(iova, PAGE_4K, &mut g), Ok(PAGE_4K));
        assert_eq!(g.freed_pages(), 0);
        assert!(g.needs_flush());
        t.sync(&mut g);
        assert_eq!(
            tr.translate(iova + 8, Access::Read),
            Err(TranslateFault::NotMapped { iova: iova + 8 })
        );
    }
    let after = t.pool_stats();
    assert_eq!(
        (
            after.table_pages_in_use,
            after.table_pages_idle,
            after.table_pages_reserved
        ),
        (
            before.table_pages_in_use,
            before.table_pages_idle,
            before.table_pages_reserved
        )
    );
    assert_eq!(after.generation, before.generation + pages.len() as u64);
}

/// A map whose page size rule gives a 2 MiB or 1 GiB leaf where idle tables sit replaces them (nothing is
/// mapped there, so it is not an overlap); the replaced tables are freed at the map's sync.
#[test]
fn larger_leaf_replaces_idle_tables() {
    let t = IoPageTable::new();
    // Idle leaf table under a 2 MiB entry.
    map(&t, TIB + 5 * PAGE_4K, 0, PAGE_4K, Prot::RW).unwrap();
    assert_eq!(unmap(&t, TIB + 5 * PAGE_4K, PAGE_4K), Ok(PAGE_4K));
    assert_eq!(t.pool_stats().table_pages_idle, 1);
    let mut g = Gather::new();
    let st = t.map(TIB, 16 * TIB, PAGE_2M, Prot::READ, &mut g).unwrap();
    assert_eq!((st.leaves_2m, st.leaves_written), (1, 1));
    assert_eq!(g.freed_pages(), 1);
    t.sync(&mut g);
    let s = t.pool_stats();
    assert_eq!((s.table_pages_idle, s.table_pages_pending), (0, 0));
    let tr = t.iova_to_phys(TIB + 5 * PAGE_4K + 3).unwrap();
    assert_eq!(
        (tr.paddr, tr.page_size),
        (16 * TIB + 5 * PAGE_4K + 3, PAGE_2M)
    );
    // Idle tables two levels deep under a 1 GiB entry (a level-2 table whose only entry is an idle leaf
    // table), next to the 2 MiB leaf: a 1 GiB map over them is refused only because of that leaf.
    map(&t, TIB + PAGE_1G + PAGE_2M + PAGE_4K, 0, PAGE_4K, Prot::RW).unwrap();
    assert_eq!(
        unmap(&t, TIB + PAGE_1G + PAGE_2M + PAGE_4K, PAGE_4K),
        Ok(PAGE_4K)
    );
    assert_eq!(
        map(&t, TIB, 0, PAGE_1G, Prot::RW),
        Err(PtError::Overlap { iova: TIB })
    );
    let in_use = t.pool_stats().table_pages_in_use;
    let mut g = Gather::new();
    let st = t
        .map(TIB + PAGE_1G, 32 * TIB, PAGE_1G, Prot::RW, &mut g)
        .unwrap();
    assert_eq!((st.leaves_1g, st.leaves_written), (1, 1));
    assert_eq!(g.freed_pages(), 2);
    t.sync(&mut g);
    let s = t.pool_stats();
    assert_eq!((s.table_pages_in_use, s.table_pages_idle), (in_use - 2, 0));
    assert_eq!(
        t.iova_to_phys(TIB + PAGE_1G + PAGE_2M + PAGE_4K)
            .unwrap()
            .page_size,
        PAGE_1G
    );
    // And everything still unmaps back to the root.
    assert_eq!(unmap(&t, 0, 1 << 48), Ok(PAGE_2M + PAGE_1G));
    assert_eq!(t.pool_stats().table_pages_in_use, 1);
}

/// Idle tables are bounded: once they exceed max(1024, the non-idle tables in use), the unmap that made
/// one more idle frees them all, and translations are unaffected.
#[test]
fn idle_tables_are_reclaimed_beyond_their_limit() {
    let t = IoPageTable::new();
    map(&t, 4 * TIB, 0, PAGE_4K, Prot::RW).unwrap(); // stays mapped
    let mut reclaimed = false;
    for r in 0..3000u64 {
        // Each 4K page in its own 2 MiB region: one leaf table each, idle after the unmap.
        let iova = TIB + r * PAGE_2M + (r % 512) * PAGE_4K;
        map(&t, iova, 0, PAGE_4K, Prot::RW).unwrap();
        assert_eq!(unmap(&t, iova, PAGE_4K), Ok(PAGE_4K));
        let s = t.pool_stats();
        assert!(
            s.table_pages_idle <= 1024.max(s.table_pages_in_use - s.table_pages_idle),
            "{s:?}"
        );
        reclaimed |= s.table_pages_idle == 0;
        assert_eq!(
            s.table_pages_pending, 0,
            "the unmap's sync made them reusable"
        );
    }
    assert!(reclaimed, "never reached the idle limit");
    // At most ~1030 pages were ever in use; the pool grows in chunks of up to 512 pages.
    assert!(t.pool_stats().table_pages_reserved <= 1536);
    assert_eq!(t.iova_to_phys(4 * TIB + 8).unwrap().paddr, 8);
    t.reclaim_idle_tables();
    // The root, and the three tables of the page still mapped.
    assert_eq!(t.pool_stats().table_pages_in_use, 4);
}
