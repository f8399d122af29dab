//! Baseline 1 of the DMA-map benchmark: an interval map of IOVA ranges in a `BTreeMap`, the structure
//! peer VMMs keep per virtio-iommu domain, behind an `RwLock` so that translation from device threads can
//! run while another thread maps (what `IoPageTable` offers with `&self`).
//!
//! Same map / unmap / translate semantics as the page table: map refuses overlaps; unmap removes what lies
//! in the range, skips holes, returns the bytes unmapped and refuses to cut a mapping (an interval map has
//! no page size, so it refuses cutting any interval, where the page table only refuses cutting a 2M/1G
//! leaf: the benchmark never cuts); translate returns the exact output address or a fault.

use std::collections::BTreeMap;
use std::sync::RwLock;

use iommu::pt::{Access, Prot, TranslateFault};

#[derive(Clone, Copy)]
struct Mapping {
    end: u64,
    pa: u64,
    prot: Prot,
}

/// Why the interval map refused a call.
#[derive(Debug, PartialEq, Eq)]
pub enum IntervalError {
    Overlap { iova: u64 },
    Cut { iova: u64 },
}

#[derive(Default)]
pub struct IntervalMap {
    map: RwLock<BTreeMap<u64, Mapping>>,
}

impl IntervalMap {
    pub fn map(&self, iova: u64, pa: u64, len: u64, prot: Prot) -> Result<(), IntervalError> {
        let end = iova + len;
        let mut m = self.map.write().unwrap();
        if let Some((&s, mp)) = m.range(..end).next_back() {
            if mp.end > iova {
                return Err(IntervalError::Overlap { iova: s.max(iova) });
            }
        }
        m.insert(iova, Mapping { end, pa, prot });
        Ok(())
    }

    pub fn unmap(&self, iova: u64, len: u64) -> Result<u64, IntervalError> {
        let end = iova + len;
        let mut m = self.map.write().unwrap();
        if let Some((&s, mp)) = m.range(..iova).next_back() {
            if mp.end > iova {
                return Err(IntervalError::Cut { iova: s });
            }
        }
        if let Some((&s, mp)) = m.range(..end).next_back() {
            if mp.end > end {
                return Err(IntervalError::Cut { iova: s });
            }
        }
        let mut bytes = 0;
        while let Some(s) = m.range(iova..end).next().map(|(s, _)| *s) {
            let mp = m.remove(&s).unwrap();
            bytes += mp.end - s;
        }
        Ok(bytes)
    }

    #[inline]
    pub fn translate(&self, iova: u64, access: Access) -> Result<u64, TranslateFault> {
        let m = self.map.read().unwrap();
        match m.range(..=iova).next_back() {
            Some((&s, mp)) if mp.end > iova => {
                if mp.prot.allows(access) {
                    Ok(mp.pa + (iova - s))
                } else {
                    Err(TranslateFault::Permission { iova, access })
                }
            }
            _ => Err(TranslateFault::NotMapped { iova }),
        }
    }
}
