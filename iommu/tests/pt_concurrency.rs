//! Translation takes no global lock: translators on several threads keep getting correct results while
//! another thread maps and unmaps elsewhere in the same table (allocating and freeing table pages, bumping
//! the generation on every sync, reclaiming idle tables).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use iommu::pt::{Access, Gather, IoPageTable, Prot, TranslateFault, PAGE_1G, PAGE_2M, PAGE_4K};

const STABLE: u64 = 1 << 40; // mapped before the threads start, never touched
const CHURN: u64 = 2 << 40; // mapped and unmapped by the writer

/// Output address the writer always uses for a churned IOVA, so readers can check any translation.
fn churn_pa(iova: u64) -> u64 {
    (iova - CHURN) + (7 << 40)
}

#[test]
fn translate_concurrently_while_another_thread_maps_and_unmaps_elsewhere() {
    let t = Arc::new(IoPageTable::new());
    let mut g = Gather::new();
    // Stable region: 4K leaves (misaligned paddr), a 2M leaf and a 1G leaf.
    t.map(STABLE, 0x10_0000_1000, 4 * PAGE_2M, Prot::RW, &mut g)
        .unwrap();
    t.map(
        STABLE + PAGE_1G,
        0x20_0000_0000,
        PAGE_2M,
        Prot::READ,
        &mut g,
    )
    .unwrap();
    t.map(
        STABLE + 2 * PAGE_1G,
        0x40_0000_0000,
        PAGE_1G,
        Prot::WRITE,
        &mut g,
    )
    .unwrap();
    t.sync(&mut g);
    let stop = Arc::new(AtomicBool::new(false));
    let iterations: u64 = if cfg!(debug_assertions) {
        3_000
    } else {
        30_000
    };

    let writer = {
        let (t, stop) = (t.clone(), stop.clone());
        thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut syncs = 0u64;
            for i in 0..iterations {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Sizes and places that allocate and free leaf and directory tables.
                let (iova, len) = match i % 6 {
                    0 => (CHURN + (x % 4096) * PAGE_4K, PAGE_4K * (1 + x % 8)),
                    1 => (CHURN + PAGE_1G * (1 + x % 8) + (x % 512) * PAGE_2M, PAGE_2M),
                    2 => (CHURN + PAGE_1G * (16 + x % 4), PAGE_1G),
                    // Runs of leaves written and cleared with wide stores: 256 x 4K, 64 x 2M.
                    3 => (
                        CHURN + PAGE_1G * (20 + x % 4) + (x % 512) * PAGE_2M + (1 << 20),
                        1 << 20,
                    ),
                    4 => (
                        CHURN + PAGE_1G * (9 + x % 4) + (x % 8) * 64 * PAGE_2M,
                        64 * PAGE_2M,
                    ),
                    _ => (CHURN + (x % 64) * PAGE_2M + PAGE_4K, 3 * PAGE_4K),
                };
                let mut g = Gather::new();
                if t.map(iova, churn_pa(iova), len, Prot::RW, &mut g).is_ok() {
                    t.sync(&mut g);
                }
                if i % 3 != 0 {
                    let mut g = Gather::new();
                    t.unmap(iova, len, &mut g).unwrap();
                    t.sync(&mut g);
                    syncs += 1;
                }
                if i % 64 == 0 {
                    let mut g = Gather::new();
                    t.unmap(CHURN, 32 * PAGE_1G, &mut g).unwrap();
                    t.sync(&mut g);
                }
                if i % 64 == 32 {
                    // Frees the tables emptied by the single unmaps above (idle, still linked).
                    t.reclaim_idle_tables();
                }
            }
            stop.store(true, Ordering::Release);
            syncs
        })
    };

    let readers: Vec<_> = (0..3u64)
        .map(|r| {
            let (t, stop) = (t.clone(), stop.clone());
            thread::spawn(move || {
                let mut tr = t.translator();
                let mut n = 0u64;
                let mut x = 0x1234_5678_9abc_def1u64 ^ r;
                while !stop.load(Ordering::Acquire) || n < 1000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = x % (4 * PAGE_2M);
                    // The stable mappings never change.
                    assert_eq!(
                        tr.translate(STABLE + off, Access::Write),
                        Ok(0x10_0000_1000 + off)
                    );
                    assert_eq!(
                        t.translate(STABLE + off, Access::Read),
                        Ok(0x10_0000_1000 + off)
                    );
                    let off2 = x % PAGE_2M;
                    assert_eq!(
                        tr.translate(STABLE + PAGE_1G + off2, Access::Read),
                        Ok(0x20_0000_0000 + off2)
                    );
                    assert_eq!(
                        tr.translate(STABLE + PAGE_1G + off2, Access::Write),
                        Err(TranslateFault::Permission {
                            iova: STABLE + PAGE_1G + off2,
                            access: Access::Write
                        })
                    );
                    let off3 = x % PAGE_1G;
                    assert_eq!(
                        t.iova_to_phys(STABLE + 2 * PAGE_1G + off3).map(|x| x.paddr),
                        Some(0x40_0000_0000 + off3)
                    );
                    // The churned region is either unmapped or mapped where the writer maps it.
                    let c = CHURN + (x >> 20) % (24 * PAGE_1G);
                    match tr.translate(c, Access::Read) {
                        Ok(pa) => assert_eq!(pa, churn_pa(c), "torn or stale translation"),
                        Err(e) => assert_eq!(e, TranslateFault::NotMapped { iova: c }),
                    }
                    if let Some(tr) = t.iova_to_phys(c) {
                        assert_eq!(tr.paddr, churn_pa(c));
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();

    let syncs = writer.join().unwrap();
    for r in readers {
        assert!(r.join().unwrap() >= 1000);
    }
    assert!(syncs > 0);
    // Everything the writer did is undone: only the stable region's tables remain.
    let mut g = Gather::new();
    t.unmap(CHURN, 32 * PAGE_1G, &mut g).unwrap();
    t.sync(&mut g);
    let mut g = Gather::new();
    t.unmap(STABLE, 3 * PAGE_1G, &mut g).unwrap();
    t.sync(&mut g);
    // Those unmaps do not cover the level-3 tables' spans: the tables stay linked, idle, until reclaimed.
    t.reclaim_idle_tables();
    assert_eq!(t.pool_stats().table_pages_in_use, 1);
}

/// A walker that raced with an unmap may still be inside a table page after that page was freed and
/// reused, at another level, by a later map. Leaves written there in the page's new life must never be
/// followed as table pointers: here every reused page is filled with 4 KiB leaves whose output addresses
/// are not memory of this process, so a walker that followed one would crash. Readers translate in the
/// region whose tables are freed again and again; they must only ever see its one mapping or nothing.
#[test]
fn stale_walkers_never_follow_leaves_of_a_page_reused_at_another_level() {
    const A: u64 = 1 << 39; // its level-3, level-2 and level-1 tables are freed by every round
    const B: u64 = 3 << 39; // reuses them, filled with 4K leaves
    const A_PA: u64 = 0x5000_0000;
    const POISON: u64 = 0xd_ead0_0000_1000; // 4K-aligned, not 2M-aligned: 4K leaves only; not our memory
    let t = Arc::new(IoPageTable::new());
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = if cfg!(debug_assertions) {
        4_000
    } else {
        40_000
    };

    // More readers than CPUs, so that readers are preempted in the middle of walks and resume stale.
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (t, stop) = (t.clone(), stop.clone());
            thread::spawn(move || {
                let mut tr = t.translator();
                let mut seen = 0u64;
                while !stop.load(Ordering::Acquire) {
                    for off in [0, 0x10, PAGE_4K - 1] {
                        match tr.translate(A + off, Access::Read) {
                            Ok(pa) => {
                                assert_eq!(
                                    pa,
                                    A_PA + off,
                                    "a stale walk returned a wrong translation"
                                );
                                seen += 1;
                            }
                            Err(e) => assert_eq!(e, TranslateFault::NotMapped { iova: A + off }),
                        }
                        if let Some(x) = t.iova_to_phys(A + off) {
                            assert_eq!(x.paddr, A_PA + off);
                        }
                    }
                }
                seen
            })
        })
        .collect();

    // B's level-3 and level-2 tables stay (a mapping kept there), so each round's 6 MiB of 4K leaves at B
    // needs exactly three new leaf tables: the three pages A's tables just gave back, whatever their order.
    let mut g = Gather::new();
    t.map(B + 100 * PAGE_2M, POISON, PAGE_4K, Prot::READ, &mut g)
        .unwrap();
    t.sync(&mut g);
    for _ in 0..rounds {
        let mut g = Gather::new();
        t.map(A, A_PA, PAGE_4K, Prot::READ, &mut g).unwrap();
        t.sync(&mut g);
        // Unmapping A's whole 512 GiB span unlinks its three tables; the sync makes them reusable.
        let mut g = Gather::new();
        t.unmap(A, 1 << 39, &mut g).unwrap();
        t.sync(&mut g);
        // B takes them back as leaf tables full of 4K leaves (no PS bit: read at a directory level they
        // would look like table links).
        let mut g = Gather::new();
        t.map(B, POISON, 3 * PAGE_2M, Prot::READ, &mut g).unwrap();
        t.sync(&mut g);
        let mut g = Gather::new();
        t.unmap(B, 3 * PAGE_2M, &mut g).unwrap();
        t.sync(&mut g);
    }
    let mut g = Gather::new();
    t.unmap(B, 1 << 39, &mut g).unwrap();
    t.sync(&mut g);
    stop.store(true, Ordering::Release);
    let seen: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(seen > 0, "the readers saw A mapped");
    assert_eq!(
        t.pool_stats().table_pages_in_use,
        1,
        "only the root is left"
    );
}
