//! Random sequences of map / unmap / translate against a plain reference model (a `BTreeMap` of leaves),
//! agreeing at every step. Honours PROPTEST_CASES (scripts/test sets 4000).
//!
//! The IOVA window is small (a few GiB at the bottom and at the top of the 48-bit space) and the ranges
//! are built from 4K/2M/1G multiples around boundaries, so overlaps, huge-leaf cuts and table frees happen
//! often.

use iommu::pt::{Access, Gather, IoPageTable, Prot, Translator, PAGE_1G, PAGE_2M, PAGE_4K};
use proptest::prelude::*;

mod common;
use common::pt_reference::Model;

#[derive(Clone, Debug)]
enum Op {
    Map {
        iova: u64,
        pa: u64,
        len: u64,
        prot: Prot,
    },
    Unmap {
        iova: u64,
        len: u64,
    },
    Translate {
        iova: u64,
        access: Access,
    },
    /// Free the idle tables (changes no translation).
    Reclaim,
}

const TOP: u64 = (1 << 48) - 4 * PAGE_1G;

fn place() -> impl Strategy<Value = u64> {
    (
        prop_oneof![Just(0u64), Just(TOP)],
        0..4u64,
        prop_oneof![Just(0u64), Just(1), Just(2), Just(255), Just(511)],
        prop_oneof![Just(0u64), Just(1), Just(2), Just(256), Just(511)],
    )
        .prop_map(|(base, g, m, p)| base + g * PAGE_1G + m * PAGE_2M + p * PAGE_4K)
}

fn length() -> impl Strategy<Value = u64> {
    (0..2u64, 0..4u64, 0..4u64)
        .prop_map(|(g, m, p)| g * PAGE_1G + m * PAGE_2M + p * PAGE_4K)
        .prop_filter("non-zero", |l| *l > 0)
}

fn prot() -> impl Strategy<Value = Prot> {
    prop_oneof![Just(Prot::READ), Just(Prot::WRITE), Just(Prot::RW)]
}

fn access() -> impl Strategy<Value = Access> {
    prop_oneof![Just(Access::Read), Just(Access::Write)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (place(), length(), prop_oneof![Just(0u64), Just(PAGE_4K)], prot()).prop_map(
            |(iova, len, skew, prot)| {
                // Output aligned like the IOVA (huge leaves), or skewed by 4K (4K leaves only: keep it short).
                let len = if skew != 0 { len.min(3 * PAGE_2M) } else { len };
                let len = if iova + len > 1 << 48 { (1 << 48) - iova } else { len };
                Op::Map { iova, pa: (iova % (8 * PAGE_1G)) + (1 << 40) + skew, len, prot }
            }
        ),
        2 => (place(), length()).prop_map(|(iova, len)| {
            let len = if iova + len > 1 << 48 { (1 << 48) - iova } else { len };
            Op::Unmap { iova, len }
        }),
        // Few distinct offsets, so the same pages are translated again after they change (stale IOTLB).
        3 => (place(), prop_oneof![Just(0u64), Just(0x18), Just(PAGE_4K + 0x20), Just(PAGE_2M - 8), 0..PAGE_2M], access())
            .prop_map(|(iova, off, access)| Op::Translate { iova: iova + off, access }),
        1 => Just(Op::Reclaim),
    ]
}

/// The translator (IOTLB, filled then hit) and the uncached walk agree with the model at `iovas`: probing the
/// range of every map and unmap right after it catches an IOTLB entry that outlived its unmap + sync.
fn probe(
    t: &IoPageTable,
    tr: &mut Translator,
    model: &Model,
    iovas: &[u64],
) -> Result<(), TestCaseError> {
    for &iova in iovas {
        for access in [Access::Read, Access::Write] {
            let want = model.translate(iova, access);
            prop_assert_eq!(
                tr.translate(iova, access),
                want,
                "translator at {:#x}",
                iova
            );
            prop_assert_eq!(t.translate(iova, access), want, "walk at {:#x}", iova);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn random_map_unmap_translate_agree_with_reference_model(ops in prop::collection::vec(op(), 1..40)) {
        let t = IoPageTable::new();
        let mut tr = t.translator();
        let mut model = Model::default();
        for op in &ops {
            match *op {
                Op::Map { iova, pa, len, prot } => {
                    let mut g = Gather::new();
                    let got = t.map(iova, pa, len, prot, &mut g).map(|s| s.leaves_written);
                    t.sync(&mut g);
                    prop_assert_eq!(got, model.map(iova, pa, len, prot), "{:?}", op);
                    probe(&t, &mut tr, &model, &[iova, iova + len - 1])?;
                }
                Op::Unmap { iova, len } => {
                    let mut g = Gather::new();
                    let got = t.unmap(iova, len, &mut g);
                    t.sync(&mut g);
                    prop_assert_eq!(got, model.unmap(iova, len), "{:?}", op);
                    probe(&t, &mut tr, &model, &[iova, iova + len - 1])?;
                }
                Op::Reclaim => {
                    t.reclaim_idle_tables();
                    let s = t.pool_stats();
                    prop_assert_eq!((s.table_pages_idle, s.table_pages_pending), (0, 0));
                }
                Op::Translate { iova, access } => {
                    let want = model.translate(iova, access);
                    prop_assert_eq!(tr.translate(iova, access), want, "translator {:?}", op);
                    prop_assert_eq!(tr.translate(iova, access), want, "translator again {:?}", op);
                    prop_assert_eq!(t.translate(iova, access), want, "walk {:?}", op);
                    let phys = t.iova_to_phys(iova);
                    let leaf = model.leaf_at(iova);
                    prop_assert_eq!(phys.map(|p| (p.paddr, p.page_size, p.prot)),
                        leaf.map(|(s, l)| (l.pa + iova - s, l.size, l.prot)), "iova_to_phys {:?}", op);
                }
            }
        }
        // Every leaf of the model is in the table, with its size.
        for (&s, l) in &model.leaves {
            let p = t.iova_to_phys(s + l.size - 1);
            prop_assert_eq!(p.map(|p| (p.paddr, p.page_size)), Some((l.pa + l.size - 1, l.size)));
        }
        // And unmapping everything (covering every table's span: no explicit reclaim) returns the pool to
        // its baseline.
        let mut g = Gather::new();
        let bytes = t.unmap(0, 1 << 48, &mut g).unwrap();
        t.sync(&mut g);
        prop_assert_eq!(bytes, model.leaves.values().map(|l| l.size).sum::<u64>());
        let s = t.pool_stats();
        prop_assert_eq!((s.table_pages_in_use, s.table_pages_idle, s.table_pages_pending), (1, 0, 0));
    }
}
