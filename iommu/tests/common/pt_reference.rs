//! The reference model the page-table property tests compare `iommu::pt` with: leaves in a `BTreeMap`,
//! mapped with the largest page size that alignment and length allow, overlaps refused, huge leaves never
//! cut. Deliberately plain: no tables, no concurrency.

#![allow(dead_code)] // each test file uses part of it

use std::collections::BTreeMap;

use iommu::pt::{Access, Prot, PtError, TranslateFault, PAGE_SIZES};

#[derive(Clone, Copy, Debug)]
pub struct Leaf {
    pub size: u64,
    pub pa: u64,
    pub prot: Prot,
}

/// The reference: leaves keyed by their first IOVA.
#[derive(Default)]
pub struct Model {
    pub leaves: BTreeMap<u64, Leaf>,
}

impl Model {
    pub fn leaf_at(&self, iova: u64) -> Option<(u64, Leaf)> {
        self.leaves
            .range(..=iova)
            .next_back()
            .filter(|(s, l)| iova < *s + l.size)
            .map(|(s, l)| (*s, *l))
    }

    pub fn first_mapped(&self, iova: u64, end: u64) -> Option<u64> {
        if self.leaf_at(iova).is_some() {
            return Some(iova);
        }
        self.leaves.range(iova..end).next().map(|(s, _)| *s)
    }

    pub fn map(&mut self, iova: u64, pa: u64, len: u64, prot: Prot) -> Result<u64, PtError> {
        if let Some(first) = self.first_mapped(iova, iova + len) {
            return Err(PtError::Overlap { iova: first });
        }
        let (mut at, mut n) = (0, 0);
        while at < len {
            let size = *PAGE_SIZES
                .iter()
                .rev()
                .find(|&&s| ((iova + at) | (pa + at)).is_multiple_of(s) && len - at >= s)
                .unwrap();
            self.leaves.insert(
                iova + at,
                Leaf {
                    size,
                    pa: pa + at,
                    prot,
                },
            );
            at += size;
            n += 1;
        }
        Ok(n)
    }

    pub fn unmap(&mut self, iova: u64, len: u64) -> Result<u64, PtError> {
        let end = iova + len;
        for edge in [iova, end] {
            if let Some((s, l)) = self.leaf_at(edge) {
                if s < edge {
                    return Err(PtError::PartialHugeUnmap {
                        iova: s,
                        page_size: l.size,
                    });
                }
            }
        }
        let gone: Vec<u64> = self.leaves.range(iova..end).map(|(s, _)| *s).collect();
        Ok(gone
            .into_iter()
            .map(|s| self.leaves.remove(&s).unwrap().size)
            .sum())
    }

    pub fn translate(&self, iova: u64, access: Access) -> Result<u64, TranslateFault> {
        match self.leaf_at(iova) {
            None => Err(TranslateFault::NotMapped { iova }),
            Some((_, l)) if !l.prot.allows(access) => {
                Err(TranslateFault::Permission { iova, access })
            }
            Some((s, l)) => Ok(l.pa + (iova - s)),
        }
    }
}
