//! Runs of leaves mapped and unmapped over and over in the same few tables: what the writer keeps in a
//! table entry about where its table's entries are (`format::run_of`) must match the entries, or maps would
//! write over mappings and unmaps would miscount. Debug builds check every use of it against the entries;
//! this test drives those uses (maps and unmaps of runs, single entries, larger leaves over idle tables,
//! reclaims) and compares every answer with a reference model.

use iommu::pt::{Gather, IoPageTable, Prot, PAGE_1G, PAGE_2M, PAGE_4K};
use proptest::prelude::*;

mod common;
use common::pt_reference::Model;

const BASE: u64 = 1 << 40;
const PA: u64 = 1 << 44;

#[derive(Clone, Debug)]
enum Op {
    Map { iova: u64, len: u64 },
    Unmap { iova: u64, len: u64 },
    Reclaim,
}

/// A range of `n` granules from granule `s` of table `k`: 4 KiB granules in two leaf tables, 2 MiB ones in
/// two level-2 tables, 1 GiB ones in one level-3 table. Mostly within one table, often starting at a
/// multiple of 64 (runs next to each other), sometimes across two tables.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (
        prop_oneof![Just(PAGE_4K), Just(PAGE_2M), Just(PAGE_1G)],
        0..2u64,
        prop_oneof![0..512u64, (0..8u64).prop_map(|k| k * 64)],
        prop_oneof![1..=3u64, Just(64), 1..=512u64],
        prop::bool::weighted(0.1),
    )
        .prop_map(|(g, k, s, n, across)| {
            let k = if g == PAGE_1G { 0 } else { k };
            let room = if across && g != PAGE_1G {
                1024 - k * 512 - s
            } else {
                512 - s
            };
            (BASE + (k * 512 + s) * g, n.min(room) * g)
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => range().prop_map(|(iova, len)| Op::Map { iova, len }),
        3 => range().prop_map(|(iova, len)| Op::Unmap { iova, len }),
        1 => Just(Op::Reclaim),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn runs_mapped_and_unmapped_in_the_same_tables_agree_with_a_model(ops in prop::collection::vec(op(), 1..60)) {
        let t = IoPageTable::new();
        let mut model = Model::default();
        for op in &ops {
            match *op {
                Op::Map { iova, len } => {
                    let pa = PA + (iova - BASE);
                    let mut g = Gather::new();
                    let got = t.map(iova, pa, len, Prot::RW, &mut g).map(|s| s.leaves_written);
                    t.sync(&mut g);
                    prop_assert_eq!(got, model.map(iova, pa, len, Prot::RW), "{:?}", op);
                }
                Op::Unmap { iova, len } => {
                    let mut g = Gather::new();
                    let got = t.unmap(iova, len, &mut g);
                    t.sync(&mut g);
                    prop_assert_eq!(got, model.unmap(iova, len), "{:?}", op);
                }
                Op::Reclaim => {
                    t.reclaim_idle_tables();
                }
            }
            for (&s, l) in &model.leaves {
                let p = t.iova_to_phys(s + l.size - 1).map(|p| (p.paddr, p.page_size));
                prop_assert_eq!(p, Some((l.pa + l.size - 1, l.size)), "leaf at {:#x} after {:?}", s, op);
            }
        }
        let mut g = Gather::new();
        let bytes = t.unmap(0, 1 << 48, &mut g).unwrap();
        t.sync(&mut g);
        prop_assert_eq!(bytes, model.leaves.values().map(|l| l.size).sum::<u64>());
        let s = t.pool_stats();
        prop_assert_eq!((s.table_pages_in_use, s.table_pages_idle, s.table_pages_pending), (1, 0, 0));
    }
}
