//! Property test: random sequences of map / unmap / translate through the domain manager and the
//! `soft` instance (real page tables, cached and uncached DMA paths) agree at every step with a plain
//! model: a map of leaves chosen by the greedy "largest page that alignment and length allow" rule.
//! Cases: `PROPTEST_CASES` (scripts/test runs thousands).

use std::collections::BTreeMap;
use std::sync::Arc;

use iommu::core::{Access, DeviceDesc, IommuCore, OwnerId, Prot, Target};
use iommu::soft::{Fault, SoftIommu};
use proptest::prelude::*;

const K4: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;
const SPACE: u64 = 4 * G1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leaf {
    size: u64,
    pa: u64,
    prot: Prot,
}

#[derive(Default)]
struct Model {
    leaves: BTreeMap<u64, Leaf>,
}

impl Model {
    fn leaf_at(&self, iova: u64) -> Option<(u64, Leaf)> {
        self.leaves
            .range(..=iova)
            .next_back()
            .filter(|(s, l)| iova < **s + l.size)
            .map(|(s, l)| (*s, *l))
    }

    fn overlaps(&self, iova: u64, end: u64) -> bool {
        self.leaf_at(iova).is_some() || self.leaves.range(iova..end).next().is_some()
    }

    fn map(&mut self, iova: u64, pa: u64, len: u64, prot: Prot) -> bool {
        if self.overlaps(iova, iova + len) {
            return false;
        }
        let mut off = 0;
        while off < len {
            let size = [G1, M2, K4]
                .into_iter()
                .find(|s| {
                    (iova + off) & (s - 1) == 0 && (pa + off) & (s - 1) == 0 && off + s <= len
                })
                .unwrap_or(K4);
            self.leaves.insert(
                iova + off,
                Leaf {
                    size,
                    pa: pa + off,
                    prot,
                },
            );
            off += size;
        }
        true
    }

    fn unmap(&mut self, iova: u64, len: u64) -> Option<u64> {
        let end = iova + len;
        for edge in [iova, end] {
            if let Some((s, _)) = self.leaf_at(edge) {
                if s < edge {
                    return None;
                }
            }
        }
        let inside: Vec<u64> = self.leaves.range(iova..end).map(|(s, _)| *s).collect();
        let mut bytes = 0;
        for s in inside {
            if let Some(l) = self.leaves.remove(&s) {
                bytes += l.size;
            }
        }
        Some(bytes)
    }

    fn translate(&self, iova: u64, access: Access) -> Result<u64, Fault> {
        match self.leaf_at(iova) {
            None => Err(Fault::NotMapped),
            Some((s, l)) => {
                let ok = match access {
                    Access::Read => l.prot.read,
                    Access::Write => l.prot.write,
                };
                if ok {
                    Ok(l.pa + (iova - s))
                } else {
                    Err(Fault::Permission)
                }
            }
        }
    }
}

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
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..SPACE / G1).prop_map(|n| n * G1),
        (0..64u64).prop_map(|n| G1 - 8 * M2 + n * M2),
        (0..SPACE / M2).prop_map(|n| n * M2),
        (0..2048u64).prop_map(|n| n * K4),
        (0..SPACE / K4).prop_map(|n| n * K4),
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        (1..64u64).prop_map(|n| n * K4),
        (1..8u64).prop_map(|n| n * M2),
        (0..3u64, 0..3u64, 0..4u64).prop_map(|(g, m, k)| (g * G1 + m * M2 + k * K4).max(K4)),
        (1..1024u64).prop_map(|n| n * K4),
    ]
}

fn prot() -> impl Strategy<Value = Prot> {
    prop_oneof![Just(Prot::RW), Just(Prot::READ), Just(Prot::WRITE)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (addr(), prop_oneof![Just(None), addr().prop_map(Some)], length(), prot()).prop_map(
            |(iova, pa, len, prot)| {
                let len = len.min(SPACE - iova);
                match pa {
                    // Usually congruent with the IOVA modulo 1 GiB (huge pages possible) ...
                    None => Op::Map { iova, pa: iova + 8 * G1, len, prot },
                    // ... sometimes any address (mostly 4K leaves: keep those short).
                    Some(pa) => Op::Map { iova, pa, len: len.min(16 * M2), prot },
                }
            }
        ),
        2 => (addr(), length()).prop_map(|(iova, len)| Op::Unmap {
            iova,
            len: len.min(SPACE - iova)
        }),
        4 => (addr(), 0..K4, prop_oneof![Just(Access::Read), Just(Access::Write)]).prop_map(
            |(iova, off, access)| Op::Translate {
                iova: iova + off,
                access
            }
        ),
    ]
}

proptest! {
    #[test]
    fn map_unmap_translate_agree_with_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let core = IommuCore::new();
        let soft = SoftIommu::new();
        let inst = core.register(soft.clone()).unwrap();
        let dev = core.probe_device(inst, DeviceDesc::with_rid("dma-test", 0x30)).unwrap();
        let g = core.group_of(dev).unwrap();
        let vm = OwnerId(1);
        core.claim_dma_owner(g, vm).unwrap();
        let dom = core.alloc_paging(inst).unwrap();
        core.attach(g, vm, Target::Paging(&dom)).unwrap();
        let mut port = soft.port(dev, None);
        let mut model = Model::default();
        let mut touched: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                Op::Map { iova, pa, len, prot } => {
                    let want = model.map(iova, pa, len, prot);
                    let got = core.map(&dom, iova, pa, len, prot);
                    prop_assert_eq!(got.is_ok(), want, "map {:#x}+{:#x}: {:?}", iova, len, got);
                    touched.extend([iova, iova + len - K4, iova + len / 2]);
                }
                Op::Unmap { iova, len } => {
                    let want = model.unmap(iova, len);
                    let got = core.unmap(&dom, iova, len).ok();
                    prop_assert_eq!(got, want, "unmap {:#x}+{:#x}", iova, len);
                    touched.extend([iova, iova + len - K4]);
                }
                Op::Translate { iova, access } => {
                    let want = model.translate(iova, access);
                    prop_assert_eq!(soft.translate(dev, None, iova, access), want);
                    prop_assert_eq!(port.translate(iova, access), want);
                    prop_assert_eq!(
                        core.iova_to_phys(&dom, iova).unwrap(),
                        model.leaf_at(iova).map(|(s, l)| l.pa + (iova - s))
                    );
                }
            }
            // Every address an operation touched, through the cached path (IOTLB coherence).
            for &iova in touched.iter().rev().take(12) {
                prop_assert_eq!(port.translate(iova, Access::Read), model.translate(iova, Access::Read));
            }
        }
        let _ = Arc::strong_count(&soft);
    }
}
